"""Faults with the services as real processes: a service killed, restarted, or told to stop."""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2

from tests.reliability.client import Outcome, SessionCall, blend, small_blend
from tests.reliability.conftest import GRACE_S, UPSTREAM_TIMEOUT_S
from tests.reliability.processes import ProcessGraph, health_status
from tests.reliability.report import Report

SERVING = health_pb2.HealthCheckResponse.SERVING
CLIENT_DEADLINE_S = 120.0
# The gateway retries a lost connection at least once a second (upstream.py's backoff), so
# a service that is back is found again within this.
RECONNECT_S = 1.5


def first_progress(session: SessionCall, at_least: int = 1) -> None:
    for event in session.events():
        if event.HasField("progress") and event.progress.iteration >= at_least:
            return
    raise AssertionError(f"the session ended before progress: {session.outcome}")


def test_reconstruction_killed_mid_session_is_unavailable_and_comes_back(
    processes: ProcessGraph, report: Report
) -> None:
    address = processes.address("reconstruction")
    session = SessionCall(processes.stub(), small_blend(iterations=400), CLIENT_DEADLINE_S)
    first_progress(session)
    processes.kill("reconstruction")
    killed = time.monotonic()
    outcome = session.run()
    waited = time.monotonic() - killed

    assert outcome.code == grpc.StatusCode.UNAVAILABLE, (outcome.code, outcome.details)
    assert f"the reconstruction service at {address} is unavailable" in outcome.details
    assert waited < UPSTREAM_TIMEOUT_S, f"the error took {waited:.1f} s"
    assert outcome.result is None
    assert health_status(processes.address("gateway")) == SERVING

    # While it is down, a new blend is refused the same way, at once.
    down = blend(processes.stub(), small_blend(iterations=2), CLIENT_DEADLINE_S)
    assert down.code == grpc.StatusCode.UNAVAILABLE, (down.code, down.details)
    assert f"the reconstruction service at {address} is unavailable" in down.details
    assert down.seconds < UPSTREAM_TIMEOUT_S

    processes.start("reconstruction")
    time.sleep(RECONNECT_S)
    back = blend(processes.stub(), small_blend(iterations=3), CLIENT_DEADLINE_S)
    assert back.code == grpc.StatusCode.OK, (back.code, back.details)
    assert back.result is not None and back.result.stats.iterations == 3
    session = SessionCall(processes.stub(), small_blend(iterations=3), CLIENT_DEADLINE_S)
    again = session.run()
    assert again.code == grpc.StatusCode.OK and again.result is not None
    report.add(
        "fault: reconstruction killed mid-session",
        {
            "client saw": f"{outcome.code.name} after {waited:.2f} s: {outcome.details}",
            "new blend while down": f"{down.code.name} after {down.seconds:.2f} s",
            "first blend after restart": back.code.name,
            "gateway health": "SERVING throughout",
        },
    )


def test_features_restarted_rebuilds_its_cache_and_serves_the_same_image(
    processes: ProcessGraph, report: Report
) -> None:
    request = small_blend(iterations=3, seed=11)
    before = blend(processes.stub(), request, CLIENT_DEADLINE_S)
    assert before.code == grpc.StatusCode.OK, before.details
    processes.kill("features")
    processes.start("features")  # a new process: its feature cache is empty
    time.sleep(RECONNECT_S)
    after = blend(processes.stub(), request, CLIENT_DEADLINE_S)
    assert after.code == grpc.StatusCode.OK, (after.code, after.details)
    assert before.result is not None and after.result is not None
    # Same request, same seed: the rebuilt features give the same image, pixel for pixel.
    assert after.result.image == before.result.image
    report.add(
        "fault: features restarted",
        {
            "first blend after restart": after.code.name,
            "seconds before / after (cache warm / rebuilt)": (
                f"{before.seconds:.2f} / {after.seconds:.2f}"
            ),
            "same image": True,
        },
    )


def test_sigterm_to_the_gateway_finishes_sessions_and_exits_within_grace(
    processes: ProcessGraph, report: Report
) -> None:
    stub = processes.stub()
    session = SessionCall(stub, small_blend(iterations=400), CLIENT_DEADLINE_S)
    first_progress(session, at_least=2)
    one_shot: list[Outcome] = []
    blender = threading.Thread(
        target=lambda: one_shot.append(blend(stub, small_blend(400), CLIENT_DEADLINE_S))
    )
    blender.start()
    time.sleep(1.0)  # the Blend is planning or running by now

    code, seconds = processes.terminate("gateway")
    outcome = session.run()
    blender.join(timeout=30)
    late = blend(stub, small_blend(iterations=2), 30)  # after SIGTERM: refused, not hung

    assert code == 0
    assert seconds < GRACE_S + 3, f"the gateway took {seconds:.1f} s to exit"
    # The session is told, and gets the image as it stands rather than nothing.
    assert outcome.code == grpc.StatusCode.OK, (outcome.code, outcome.details)
    notices = [e.update_rejected for e in outcome.of("update_rejected")]
    assert [(n.update_id, n.code) for n in notices] == [(0, grpc.StatusCode.UNAVAILABLE.value[0])]
    assert "the gateway is shutting down" in notices[0].message
    assert outcome.result is not None and outcome.result.stats.finished_early
    assert outcome.result.stats.iterations >= 2
    # The one-shot Blend either got its image as it stood or a clear UNAVAILABLE.
    [other] = one_shot
    assert isinstance(other, Outcome)
    if other.code == grpc.StatusCode.OK:
        assert other.result is not None and other.result.stats.finished_early
    else:
        assert other.code == grpc.StatusCode.UNAVAILABLE, (other.code, other.details)
        assert "the gateway is shutting down" in other.details

    assert late.code == grpc.StatusCode.UNAVAILABLE and not late.events

    processes.start("gateway")
    again = blend(processes.stub(), small_blend(iterations=2), CLIENT_DEADLINE_S)
    assert again.code == grpc.StatusCode.OK, again.details
    assert again.result is not None and not again.result.stats.finished_early
    report.add(
        "fault: SIGTERM to the gateway",
        {
            "exit code": code,
            "seconds to exit (grace)": f"{seconds:.2f} ({GRACE_S:g})",
            "session told": notices[0].message,
            "session result": f"finished early at iteration {outcome.result.stats.iterations}",
            "one-shot Blend": other.code.name
            + (f": {other.details}" if other.code != grpc.StatusCode.OK else " (finished early)"),
            "call after SIGTERM": late.code.name,
        },
    )
