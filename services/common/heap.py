"""The C heap: glibc keeps what a run frees for the next one, so a process's resident memory
stays at its largest run's unless it is handed back."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0): hand every arena's free pages back to the system. A no-op where
    the C library is not glibc."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return (lambda: trim(0)) if trim is not None else (lambda: None)


malloc_trim = _malloc_trim()
