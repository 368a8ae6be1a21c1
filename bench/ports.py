"""Loopback ports for the graphs that tests and benchmarks start as processes.

A port from bind(("127.0.0.1", 0)) lies in the kernel's ephemeral range, where any outgoing
connection made before the server binds may be given it, and the kernel may hand the same one
out again; a graph of a dozen processes then fails at start now and then. These ports lie below
that range and are never handed out twice in one process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 10000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()
_draw = random.Random()  # not the tests' seeded generator: two runs at once must differ


def _ephemeral_start() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _kernel_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def free_port() -> int:
    """A loopback TCP port nothing listens on now, not one this process handed out before."""
    top = _ephemeral_start()
    while True:
        port = _draw.randrange(LOWEST, top) if top > LOWEST + 1000 else _kernel_port()
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
