"""Sessions against abuse and accident: a refused update changes nothing, a session that never
starts is ended, idle sessions never starve the gateway's other calls, a cancel is no error."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from styleblend.v1 import styleblend_pb2 as pb
from styleblend.v1 import styleblend_pb2_grpc

from services.common import images
from services.common.channels import BlendedTargets
from services.common.config import BlendingConfig
from services.common.server import RunningServer, start_server
from services.graph import build_blending, serve_one
from services.reconstruction.servicer import ReconstructionServicer, reconstruction_servicer
from tests.conftest import INTERNAL_TOKEN, Graph, MiB, address, serve, start_gateway
from tests.gateway.test_graph import source
from tests.gateway.test_session import STARRY, Session, blend


def truncated_map() -> bytes:
    """A PNG whose header reads (64×64) but whose pixels stop halfway."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    png = images.encode(noise)
    return png[: len(png) // 2]


def test_a_refused_update_leaves_the_session_as_it_was(graph: Graph) -> None:
    session = Session(
        graph,
        blend(sources=[source("content/astronaut.jpg", 0, 1), source(STARRY, 1, 0)], iterations=60),
    )
    bad = pb.SourceUpdate(index=1, style_map=pb.InfluenceMap(data=truncated_map()))
    events: list[pb.BlendEvent] = []
    for event in session.events():
        events.append(event)
        if event.HasField("progress") and event.progress.iteration == 2:
            session.send(pb.SessionRequest(update=pb.SessionUpdate(update_id=1, sources=[bad])))
        if event.HasField("update_rejected") and event.update_rejected.update_id == 1:
            good = pb.SessionUpdate(update_id=2, style_loss_weight=2)
            session.send(pb.SessionRequest(update=good))
    rejected = [e.update_rejected for e in events if e.HasField("update_rejected")]
    assert [(r.update_id, r.code) for r in rejected] == [
        (1, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    ]
    assert "update.sources[1].style_map" in rejected[0].message
    assert "truncated" in rejected[0].message
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.iteration for p in progress] == list(range(1, 61))
    assert progress[-1].update_id == 2  # the good update took effect
    result = events[-1].result
    assert events[-1].HasField("result") and result.image.startswith(b"\x89PNG")
    assert '"update_id": "2"' in result.recipe_json
    assert '"update_id": "1"' not in result.recipe_json  # the refused one is not in the recipe


def test_an_update_whose_targets_fail_is_undone_and_later_ones_take_effect(graph: Graph) -> None:
    """The blending service goes away after the check: the update is refused (UNAVAILABLE) and
    leaves no trace; once it is back, the next update applies on the plan as it was."""
    wiring = BlendingConfig(features_address=address(graph.features), internal_token=INTERNAL_TOKEN)
    blending = serve(build_blending(wiring))
    port = blending.port
    # A reconstruction service of its own, which fetches its targets from this blending.
    own = graph.servicers["reconstruction"].servicer
    assert isinstance(own, ReconstructionServicer)
    reconstruction = serve(
        reconstruction_servicer(
            own.net, own.manifest, own.device, None, own.planner,
            BlendedTargets(wiring, address(blending)),
        )
    )  # fmt: skip
    upstreams = {
        "features": address(graph.features),
        "blending": address(blending),
        "reconstruction": address(reconstruction),
    }
    gateway, _ = start_gateway(upstreams)
    restarted: list[RunningServer] = []
    stub = stub_of(gateway)
    outgoing: queue.Queue[pb.SessionRequest | None] = queue.Queue()
    start = blend(
        sources=[source("content/chelsea.jpg", 0, 1), source(STARRY, 1, 0)], iterations=500
    )
    outgoing.put(pb.SessionRequest(start=start))
    events: list[pb.BlendEvent] = []
    next_id, finished = 2, False
    try:
        call = stub.Session(iter(outgoing.get, None), timeout=300)
        for response in call:
            event = response.event
            events.append(event)
            if event.HasField("progress") and event.progress.iteration == 2 and not restarted:
                blending.stop(0).wait()
                outgoing.put(
                    pb.SessionRequest(update=pb.SessionUpdate(update_id=1, style_loss_weight=7))
                )
            elif event.HasField("update_rejected"):
                if not restarted:  # update 1: bring blending back, then a good update
                    restarted.append(
                        start_server(
                            lambda _: [build_blending(wiring)],
                            address=f"127.0.0.1:{port}",
                            max_message_bytes=64 * MiB,
                            internal_token=INTERNAL_TOKEN,
                        )
                    )
                else:  # the gateway may not have found the service again yet
                    time.sleep(0.3)
                good = pb.SessionUpdate(update_id=next_id, tv_loss_weight=0.5)
                outgoing.put(pb.SessionRequest(update=good))
                next_id += 1
            elif event.HasField("progress") and event.progress.update_id >= 2 and not finished:
                outgoing.put(pb.SessionRequest(finish=pb.FinishSession()))
                finished = True
    finally:
        outgoing.put(None)
        for server in (gateway, reconstruction, blending, *restarted):
            server.stop(0)
    rejected = [e.update_rejected for e in events if e.HasField("update_rejected")]
    assert rejected[0].update_id == 1
    assert rejected[0].code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert all(r.update_id != 1 for r in rejected[1:])  # refused once, not again and again
    applied = {e.progress.update_id for e in events if e.HasField("progress")} - {0}
    assert len(applied) == 1 and applied.pop() >= 2
    recipe = json.loads(events[-1].result.recipe_json)
    assert [u["update_id"] for u in recipe["updates"]] == [str(next_id - 1)]
    assert all("style_loss_weight" not in u for u in recipe["updates"])  # update 1 left no trace


def idle_requests(stop: threading.Event) -> Iterator[pb.SessionRequest]:
    """A client that opens a session and sends nothing until told to go."""
    stop.wait()
    yield from ()


@pytest.fixture
def gateway_alone(
    graph: Graph, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[], RunningServer]]:
    """The gateway as `styleblend serve gateway` starts it, from the environment, on the graph's
    internal services; each test sets its limits before the server starts."""
    for key, value in {
        "GATEWAY_PORT": "0",
        "FEATURES_ADDRESS": address(graph.features),
        "BLENDING_ADDRESS": address(graph.blending),
        "RECONSTRUCTION_ADDRESS": address(graph.reconstruction),
        "INTERNAL_TOKEN": graph.internal_token,
    }.items():
        monkeypatch.setenv(f"STYLEBLEND_{key}", value)
    servers: list[RunningServer] = []

    def start() -> RunningServer:
        servers.append(serve_one("gateway"))
        return servers[-1]

    yield start
    for server in servers:
        server.stop(0)


def waiting_for_start() -> bool:
    return any(thread.name == "session-start" for thread in threading.enumerate())


def stub_of(server: RunningServer) -> styleblend_pb2_grpc.StyleBlendStub:
    return styleblend_pb2_grpc.StyleBlendStub(grpc.insecure_channel(address(server)))


def test_a_session_without_start_is_ended_and_its_slot_freed(
    gateway_alone: Callable[[], RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STYLEBLEND_SESSION_START_TIMEOUT_S", "0.5")
    monkeypatch.setenv("STYLEBLEND_MAX_SESSIONS_PER_CLIENT", "1")
    server = gateway_alone()
    stub = stub_of(server)
    stop = threading.Event()
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Session(idle_requests(stop), timeout=20))
    stop.set()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no `start` within 0.5 s" in str(caught.value.details())
    assert time.monotonic() - began < 10
    deadline = time.monotonic() + 5  # the thread that waited for `start` ends with the call
    while time.monotonic() < deadline and waiting_for_start():
        time.sleep(0.05)
    assert not waiting_for_start()
    # The one slot this client has is free again: a real session from it runs to its result.
    start = blend(sources=[source("content/chelsea.jpg", 1, 1)], iterations=3)
    responses = list(stub.Session(iter([pb.SessionRequest(start=start)]), timeout=120))
    assert responses[-1].event.HasField("result")


def test_idle_sessions_leave_room_for_info_and_health(
    gateway_alone: Callable[[], RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STYLEBLEND_MAX_SESSIONS", "32")
    monkeypatch.setenv("STYLEBLEND_MAX_SESSIONS_PER_CLIENT", "32")
    server = gateway_alone()
    stub = stub_of(server)
    stop = threading.Event()
    calls = [stub.Session(idle_requests(stop), timeout=60) for _ in range(32)]
    try:
        for call in calls:
            call.initial_metadata()  # each holds its slot and a server thread now
        info = stub.GetInfo(pb.GetInfoRequest(), timeout=5)
        assert info.model == "vgg19"
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address(server)))
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        # Over the limit, a session is refused at once, not queued behind the others.
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Session(idle_requests(stop), timeout=5))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        stop.set()
        for call in calls:
            call.cancel()


def test_a_session_cancelled_before_start_is_logged_as_a_cancel(
    gateway_alone: Callable[[], RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = gateway_alone()
    stop = threading.Event()
    caplog.set_level(logging.INFO)
    call = stub_of(server).Session(idle_requests(stop), timeout=30)
    call.initial_metadata()
    call.cancel()
    stop.set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
        "cancelled before `start`" in r.getMessage() for r in caplog.records
    ):
        time.sleep(0.05)
    time.sleep(0.2)  # anything logged after the cancel has been logged by now
    gateway = [r for r in caplog.records if r.name.startswith("services.")]
    assert any("cancelled before `start`" in r.getMessage() for r in gateway)
    assert not any("internal error" in r.getMessage() for r in gateway)
    assert not any(r.exc_info for r in gateway)
