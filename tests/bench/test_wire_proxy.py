"""bench.wire's byte-counting proxy against a plain TCP echo server: every byte goes through
unchanged both ways, the counts are exact per connection, and closing ends everything. Then the
bench itself, tiny, against the real processes, so it does not rot between the runs that
matter; it asserts no number beyond what must hold."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.wire import ROOT, Flow, Proxies, Settings, markdown, run


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo() -> Iterator[str]:
    server = EchoServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def receive(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(65536, size - got))
        assert chunk, "closed early"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send while reading, so a payload larger than the sockets' buffers cannot deadlock."""
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    echoed = receive(sock, len(payload))
    sender.join()
    return echoed


def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_bytes_pass_unchanged_and_are_counted_exactly(echo: str) -> None:
    payloads = [b"x", bytes(range(256)) * 4, os.urandom(3 * 1024 * 1024 + 17)]
    with Proxies() as proxies:
        proxy = proxies.add("client→echo", echo)
        assert proxy.address != echo
        first = connect(proxy.address)
        for payload in payloads:
            assert exchange(first, payload) == payload
        second = connect(proxy.address)
        assert exchange(second, b"hello") == b"hello"
        expected = sum(map(len, payloads))
        wait_for(lambda: proxy.totals() == (expected + 5, expected + 5))
        assert proxy.flows() == [
            Flow(sent=expected, received=expected, open=True),
            Flow(sent=5, received=5, open=True),
        ]
        assert proxies.totals() == {"client→echo": (expected + 5, expected + 5)}
        # A client's close goes through: the echo server closes, the proxy drops the flow.
        first.shutdown(socket.SHUT_WR)
        assert first.recv(1) == b""
        first.close()
        wait_for(lambda: not proxy.flows()[0].open)
        assert proxy.flows()[0] == Flow(sent=expected, received=expected, open=False)
        second.sendall(b"!")
        assert receive(second, 1) == b"!"
    # Closing the proxies ends the connection still open, and nothing listens any more.
    second.settimeout(10)
    assert second.recv(1) == b""
    second.close()
    with pytest.raises(OSError):
        connect(proxy.address).close()
    assert not any(t.name == "wire-proxies" for t in threading.enumerate())


def test_one_way_half_close_lets_the_other_way_finish(echo: str) -> None:
    """The caller stops sending; what is still on its way back arrives, all of it counted."""
    payload = os.urandom(1024 * 1024)
    with Proxies() as proxies:
        proxy = proxies.add("a→b", echo)
        sock = connect(proxy.address)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert receive(sock, len(payload)) == payload
        assert sock.recv(1) == b""
        sock.close()
        wait_for(lambda: proxy.flows() == [Flow(len(payload), len(payload), open=False)])


def test_a_target_that_does_not_listen_closes_the_callers_connection() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{probe.getsockname()[1]}"
    with Proxies() as proxies:
        proxy = proxies.add("a→nobody", nobody)
        sock = connect(proxy.address)
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):  # a reset is a close too
            assert sock.recv(1) == b""
        sock.close()
        wait_for(lambda: proxy.flows() == [Flow(0, 0, open=False)])


def test_a_quick_run_against_the_processes_counts_more_than_the_images(
    vgg19_dir: Path, tmp_path: Path
) -> None:
    """The whole bench at 64 px, five iterations, a preview each, two sessions at once, on this
    checkout's services as processes: every part of the report is there and makes sense."""
    settings = Settings(
        sizes=(64,),
        iterations=5,
        preview_every=1,
        sessions=2,
        sessions_size=64,
        sessions_iterations=2,
    )
    report = run(settings, ROOT, vgg19_dir.parent, tmp_path)

    assert json.loads((tmp_path / "wire.json").read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / "wire.md").read_text() == markdown(report)
    row = report["sizes"]["64"]
    plain, moved = row["no_updates"], row["updates"]
    assert row["same_run_shape"] and plain["iterations"] == 5 and plain["results"] == 1
    assert plain["previews"] >= 1 and plain["image_bytes"] > 0
    # The images reach the client through the gateway's upstream link, with more besides them.
    assert plain["gateway_upstream"] > plain["image_bytes"]
    assert row["upstream_minus_images"] == plain["gateway_upstream"] - plain["image_bytes"]
    assert plain["links"]["client→gateway"]["received"] > plain["image_bytes"]
    # Previews come from the reconstruction (the result's PNG gains the recipe at the gateway).
    previews_out = plain["links"]["gateway→reconstruction"]["received"]
    assert 0 < previews_out <= plain["links"]["client→gateway"]["received"]
    assert moved["gateway_upstream"] > plain["gateway_upstream"]
    assert row["per_update"]["gateway_upstream"] > 0
    beyond = plain["beyond_images"]
    assert beyond["gateway_upstream"] > 0 and beyond["client"] > 0
    assert set(row["per_update_beyond_images"]) == {
        "gateway_upstream",
        "service_to_service",
        "client",
    }
    # Nobody calls the gateway but the client; whatever else talks is service to service.
    assert all(
        not (link["sent"] or link["received"])
        for name, link in plain["links"].items()
        if name.endswith("→gateway") and not name.startswith("client")
    )
    assert plain["service_to_service"] >= 0
    moves = row["latency"]["moves"]
    assert [m["update_id"] for m in moves] == [1, 2, 3]
    assert [m["sent_after_iteration"] for m in moves] == [1, 2, 3]
    for m in moves:
        assert 0 < m["to_progress_ms"] <= m["to_preview_ms"]
        assert m["first_carried_at_iteration"] > m["sent_after_iteration"]
    memory = report["memory"]
    assert set(memory["idle_kib"]) == {"features", "blending", "reconstruction", "gateway"}
    concurrent = memory["concurrent"]
    assert concurrent["results"] == 2 and concurrent["all_overlapped"]
    assert concurrent["peak_rss_kib"]["gateway"] >= memory["idle_after_start_kib"]["gateway"] / 2
    assert "| 64 px | gateway→features |" in markdown(report)
