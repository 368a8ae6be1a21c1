"""Requests that are not what they claim: bytes that do not parse are the caller's fault
(INVALID_ARGUMENT), and a request without the token is refused before it is read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from styleblend.v1 import styleblend_pb2 as pb
from styleblend.v1 import styleblend_pb2_grpc

from tests.conftest import ROOT, Graph, sample
from tests.reliability.processes import free_port, health_status

MiB = 1024 * 1024
GARBAGE = b"\xff\xff\xff\xff not a protobuf message"  # a field tag that runs past the end


def raw_unary(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def test_bytes_that_do_not_parse_are_invalid_argument_on_a_unary_call(graph: Graph) -> None:
    with grpc.insecure_channel(graph.address) as channel:
        call = raw_unary(channel, "/styleblend.v1.StyleBlend/GetInfo")
        with pytest.raises(grpc.RpcError) as caught:
            call(GARBAGE, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid styleblend.v1.GetInfoRequest" in str(caught.value.details())
        # The server is none the worse for it.
        assert pb.GetInfoResponse.FromString(call(b"", timeout=30)).model == "vgg19"


def test_bytes_that_do_not_parse_are_invalid_argument_on_a_stream(graph: Graph) -> None:
    with grpc.insecure_channel(graph.address) as channel:
        blend: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            "/styleblend.v1.StyleBlend/Blend", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(blend(GARBAGE, timeout=10))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid styleblend.v1.BlendRequest" in str(caught.value.details())
        session: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            "/styleblend.v1.StyleBlend/Session",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(session(iter([GARBAGE]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid styleblend.v1.SessionRequest" in str(caught.value.details())


def test_a_later_message_that_does_not_parse_ends_the_session(graph: Graph) -> None:
    """The gateway follows a session's later messages in a thread of its own; a message that
    does not parse there ends the session with INVALID_ARGUMENT, not a session running on."""
    start = pb.SessionRequest(
        start=pb.BlendRequest(
            sources=[
                pb.Source(data=sample("content/chelsea.jpg"), style_weight=0, content_weight=1),
                pb.Source(data=sample("style/starry_night.jpg"), style_weight=1, content_weight=0),
            ],
            max_side_px=48,
            fast=pb.FastOptions(model="test-model"),
        )
    )
    sent = threading.Event()

    def requests() -> Iterator[bytes]:
        yield start.SerializeToString()
        sent.wait(10)  # the garbage follows once the session is running
        yield GARBAGE
        time.sleep(10)  # the caller's side stays open: the server must end the call itself

    with grpc.insecure_channel(graph.address) as channel:
        session: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            "/styleblend.v1.StyleBlend/Session",
            request_serializer=None,
            response_deserializer=None,
        )
        call = session(requests(), timeout=10)
        first = pb.SessionResponse.FromString(next(call))
        assert first.event.HasField("preview")
        sent.set()
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "not a valid styleblend.v1.SessionRequest" in str(caught.value.details())


def test_an_internal_service_says_the_same(graph: Graph) -> None:
    from tests.conftest import internal_metadata

    with grpc.insecure_channel(f"127.0.0.1:{graph.features.port}") as channel:
        extract = raw_unary(channel, "/styleblend.internal.v1.FeaturesService/Extract")
        with pytest.raises(grpc.RpcError) as caught:
            extract(GARBAGE, metadata=internal_metadata(graph), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid styleblend.internal.v1.ExtractRequest" in str(caught.value.details())


# --- refused before it is read ---------------------------------------------------------------

TOKEN = "correct-horse-battery-staple"
LARGE = 48 * MiB  # under the gateway's default 64 MiB request limit, so gRPC lets it in


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} for process {pid}")


def peak_rss(pid: int) -> int:
    """The most resident memory the process has held since the last `reset_peak` (VmHWM)."""
    return _status_kib(pid, "VmHWM") * 1024


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the process's resident memory now (proc(5), clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture(scope="module")
def gateway_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """A gateway with a token as its own process, as `styleblend up` runs it; nothing behind
    it is needed, since nothing here gets past the token."""
    port = free_port()
    env = {
        **os.environ,
        "STYLEBLEND_HOST": "127.0.0.1",
        "STYLEBLEND_GATEWAY_PORT": str(port),
        "STYLEBLEND_HTTP_PORT": "0",
        "STYLEBLEND_GATEWAY_TOKEN": TOKEN,
        "MALLOC_ARENA_MAX": "2",  # RSS that means what is held (see tests/reliability)
    }
    log = tmp_path_factory.mktemp("gateway-log") / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "services", "gateway"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while health_status(address, 1.0) != health_pb2.HealthCheckResponse.SERVING:
            assert process.poll() is None, Path(log).read_text()
            assert time.monotonic() < deadline, "the gateway did not start in 120 s"
            time.sleep(0.2)
        yield process.pid, address
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def refused_blend(address: str, size: int) -> grpc.RpcError:
    request = pb.BlendRequest(
        sources=[pb.Source(data=b"\0" * size, style_weight=1.0, content_weight=1.0)]
    )
    with (
        grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", 64 * MiB)]
        ) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        list(styleblend_pb2_grpc.StyleBlendStub(channel).Blend(request, timeout=60))
    return caught.value


def test_an_unauthenticated_request_is_refused_before_it_is_read(
    gateway_process: tuple[int, str],
) -> None:
    """Decoding a message of N bytes costs the server the N bytes gRPC received, plus N more
    for the decoded copy of the image and Python's objects: at least 2N at the peak. Refused
    from its metadata alone, the call costs at most what gRPC buffers before it sees the
    refusal, which flow control keeps to a window of a few MiB; N/4 leaves room for that and
    for noise, and is still well below what reading the message takes."""
    pid, address = gateway_process
    warm = refused_blend(address, 1 * MiB)  # threads, channels and buffers exist from here on
    assert warm.code() == grpc.StatusCode.UNAUTHENTICATED
    reset_peak(pid)
    before = peak_rss(pid)
    refused = refused_blend(address, LARGE)
    growth = peak_rss(pid) - before
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, refused.details()
    assert "needs a token" in str(refused.details())
    print(f"peak RSS growth for a refused {LARGE // MiB} MiB Blend: {growth / MiB:.1f} MiB")
    assert growth < LARGE / 4, f"{growth / MiB:.1f} MiB for a refused {LARGE // MiB} MiB request"
    assert health_status(address) == health_pb2.HealthCheckResponse.SERVING
