"""Coalescing, written once: of the updates due at one point, only the latest matters.

An update replaces every target, and each is planned on top of the ones before it, so applying
the earlier ones first would change nothing the latest does not. The gateway asks it which
queued updates get targets made (those due as soon as possible); the reconstruction, which of
the due updates takes effect at an iteration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

U = TypeVar("U")


def coalesced(updates: Sequence[U], due: Callable[[U], bool]) -> tuple[list[U], list[U]]:
    """(the due updates in arrival order: the last is the one that matters, the ones before it
    stand in should it be refused), (the others, in arrival order)."""
    return [u for u in updates if due(u)], [u for u in updates if not due(u)]
