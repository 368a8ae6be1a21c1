"""The ports graphs under test are started on: distinct, free, clear of outgoing connections."""

from __future__ import annotations

import itertools
import socket

import pytest

from bench import ports


def test_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    handed = [ports.free_port() for _ in range(300)]
    assert len(set(handed)) == len(handed)
    top = ports._ephemeral_start()
    assert all(ports.LOWEST <= port < top for port in handed), (top, sorted(handed)[-3:])
    for port in handed[:20]:
        with socket.socket() as server:
            server.bind(("127.0.0.1", port))  # raises if it was not free


def test_a_port_someone_listens_on_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        draws = itertools.chain([busy, busy], itertools.count(ports.LOWEST))
        monkeypatch.setattr(ports._draw, "randrange", lambda low, high: next(draws))
        monkeypatch.setattr(ports, "_ephemeral_start", lambda: 65535)
        got = ports.free_port()
        assert got != busy and got >= ports.LOWEST
