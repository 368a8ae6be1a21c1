"""Concurrent sessions per client and in total, and request strings that never become paths."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from styleblend.internal.v1 import features_pb2, features_pb2_grpc
from styleblend.v1 import styleblend_pb2 as pb
from styleblend.v1 import styleblend_pb2_grpc

from services.common import wire
from services.common.errors import ResourceExhausted
from services.common.security import SessionSlots, client_identity, peer_host
from tests.conftest import Graph, address, internal_metadata, sample, start_gateway

CAT, STARRY = "content/chelsea.jpg", "style/starry_night.jpg"


def fast_start(model: str = "test-model") -> pb.BlendRequest:
    """A session of the fast network alone: one cheap image, then it waits for `finish`."""
    return pb.BlendRequest(
        sources=[
            pb.Source(data=sample(CAT), style_weight=0.0, content_weight=1.0),
            pb.Source(data=sample(STARRY), style_weight=1.0, content_weight=0.0),
        ],
        max_side_px=48,
        fast=pb.FastOptions(model=model),
    )


class OpenSession:
    """A Session call held open until `finish` or `cancel`."""

    def __init__(self, stub: styleblend_pb2_grpc.StyleBlendStub, client: str = "") -> None:
        self.outgoing: queue.Queue[pb.SessionRequest | None] = queue.Queue()
        self.outgoing.put(pb.SessionRequest(start=fast_start()))
        metadata = (("x-styleblend-client", client),) if client else ()
        self.call = stub.Session(self._requests(), metadata=metadata, timeout=60)

    def _requests(self) -> Iterator[pb.SessionRequest]:
        while (request := self.outgoing.get()) is not None:
            yield request

    def first(self) -> pb.BlendEvent:
        return next(self.call).event

    def finish(self) -> list[pb.BlendEvent]:
        self.outgoing.put(pb.SessionRequest(finish=pb.FinishSession()))
        events = [response.event for response in self.call]
        self.outgoing.put(None)
        return events

    def cancel(self) -> None:
        self.call.cancel()
        self.outgoing.put(None)


def refused(stub: styleblend_pb2_grpc.StyleBlendStub, client: str = "") -> grpc.RpcError:
    session = OpenSession(stub, client)
    with pytest.raises(grpc.RpcError) as caught:
        session.first()
    session.cancel()
    return caught.value


def test_sessions_are_limited_per_client_and_in_total(graph: Graph) -> None:
    upstreams = {
        name: address(getattr(graph, name)) for name in ("features", "blending", "reconstruction")
    }
    gateway, _ = start_gateway(upstreams, max_sessions=2, max_sessions_per_client=1)
    stub = styleblend_pb2_grpc.StyleBlendStub(grpc.insecure_channel(address(gateway)))
    try:
        first = OpenSession(stub)
        assert first.first().preview.fast
        error = refused(stub)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 are running for client 127.0.0.1, the limit of 1 per client" in str(
            error.details()
        )
        # Blend counts too: it holds a reconstruction or a network for as long.
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Blend(fast_start(), timeout=30))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Another browser behind the studio's bridge (on loopback) is another client.
        second = OpenSession(stub, client="203.0.113.7")
        assert second.first().preview.fast
        error = refused(stub, client="203.0.113.8")
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 are running, the limit of 2 in total" in str(error.details())
        # A finished session and a cancelled one give their slots back.
        assert first.finish()[-1].HasField("result")
        second.cancel()
        deadline = time.monotonic() + 10
        while True:
            again = OpenSession(stub)
            try:
                assert again.first().preview.fast
                break
            except grpc.RpcError:
                again.cancel()
                assert time.monotonic() < deadline, "the cancelled session kept its slot"
                time.sleep(0.1)
        third = OpenSession(stub, client="203.0.113.8")
        assert third.first().preview.fast
        again.cancel()
        third.cancel()
    finally:
        gateway.stop(0)


def test_session_slots_count_and_release_once() -> None:
    slots = SessionSlots(total=3, per_client=2)
    a1, a2 = slots.acquire("a"), slots.acquire("a")
    with pytest.raises(ResourceExhausted, match="limit of 2 per client"):
        slots.acquire("a")
    b1 = slots.acquire("b")
    with pytest.raises(ResourceExhausted, match="limit of 3 in total"):
        slots.acquire("c")
    a1()
    a1()  # twice: a callback and a finally may both release
    assert slots.active == 2
    with slots.slot("c"):
        assert slots.active == 3
    assert slots.active == 2
    a2(), b1()
    assert slots.active == 0


def test_sessions_from_many_threads_never_exceed_the_limit() -> None:
    slots = SessionSlots(total=5, per_client=5)
    peak, lock = [0], threading.Lock()

    def work() -> None:
        for _ in range(200):
            try:
                with slots.slot("x"), lock:
                    peak[0] = max(peak[0], slots.active)
            except ResourceExhausted:
                pass

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] <= 5 and slots.active == 0


def test_who_a_client_is() -> None:
    assert peer_host("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert peer_host("ipv6:[::1]:5555") == "::1"
    assert peer_host("unix:/tmp/socket") == "unix:/tmp/socket"
    named = (("x-styleblend-client", "198.51.100.4"),)
    # Only a bridge on this machine may speak for a browser; a remote peer is who it is.
    assert client_identity("ipv4:127.0.0.1:4000", named) == "198.51.100.4"
    assert client_identity("ipv6:[::1]:4000", named) == "198.51.100.4"
    assert client_identity("ipv4:10.1.2.3:4000", named) == "10.1.2.3"
    assert client_identity("ipv4:127.0.0.1:4000", ()) == "127.0.0.1"


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/etc/passwd", "test-model/../test-model", "$(id)", "vgg19"]
)
def test_a_fast_model_name_is_only_ever_looked_up_among_those_served(
    graph: Graph, name: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(graph.stub().Blend(fast_start(name), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"fast.model: no fast model {name!r} (there are: test-model)" in str(
        caught.value.details()
    )


def test_the_features_service_refuses_a_fast_model_it_does_not_serve(graph: Graph) -> None:
    features = features_pb2_grpc.FeaturesServiceStub(grpc.insecure_channel(address(graph.features)))
    request = features_pb2.StyliseRequest(
        model="../../models/vgg19",
        image=sample(CAT),
        width_px=32,
        height_px=32,
        mix=wire.to_tensor(np.ones(4, np.float32)),
    )
    with pytest.raises(grpc.RpcError) as caught:
        features.Stylise(request, metadata=internal_metadata(graph), timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no fast model named '../../models/vgg19'" in str(caught.value.details())
