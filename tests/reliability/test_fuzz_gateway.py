"""Bad input over the wire: fuzzed Blend, Session and UploadImage calls to the gateway process.

Only INVALID_ARGUMENT, RESOURCE_EXHAUSTED and FAILED_PRECONDITION may come back (as a status
or, for a session update, in-band), never INTERNAL or UNKNOWN, and the graph stays up. A
request that passes every check is followed to its first iteration and then cancelled, so
the checks the other services make (maps, images decoded in full) are reached too.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from styleblend.v1 import styleblend_pb2 as pb
from styleblend.v1 import styleblend_pb2_grpc

from tests.conftest import sample
from tests.reliability import fuzz
from tests.reliability.load import CLIENT_KEY
from tests.reliability.processes import SERVICES, ProcessGraph, health_status
from tests.reliability.report import Report

SHORT, LONG = 40, 1000
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
IN_BAND = {code.value[0] for code in REFUSALS}
CALL_TIMEOUT_S = 60.0
_clients = itertools.count()


def metadata() -> tuple[tuple[str, str], ...]:
    """Each call its own client, so the per-client session limit does not decide the codes."""
    return ((CLIENT_KEY, f"fuzz-{next(_clients)}"),)


def checked(code: grpc.StatusCode, details: str, outcomes: Counter[str]) -> None:
    outcomes[code.name] += 1
    assert code == grpc.StatusCode.OK or code in REFUSALS, f"{code.name}: {details}"
    if code != grpc.StatusCode.OK:
        assert details and "internal error" not in details, details


def blend_once(
    stub: styleblend_pb2_grpc.StyleBlendStub, request: pb.BlendRequest
) -> tuple[grpc.StatusCode, str]:
    """Up to the first iteration (or the end); then cancel."""
    call = stub.Blend(request, timeout=CALL_TIMEOUT_S, metadata=metadata())
    try:
        for response in call:
            if response.event.WhichOneof("event") in ("progress", "result"):
                break
    except grpc.RpcError as error:
        return error.code(), str(error.details())
    finally:
        call.cancel()
    return grpc.StatusCode.OK, ""


def session_once(
    stub: styleblend_pb2_grpc.StyleBlendStub, messages: list[pb.SessionRequest]
) -> tuple[grpc.StatusCode, str, list[pb.UpdateRejected]]:
    """The messages, then `finish`; read to the end."""
    finish = pb.SessionRequest(finish=pb.FinishSession())
    call = stub.Session(iter([*messages, finish]), timeout=CALL_TIMEOUT_S, metadata=metadata())
    rejected = []
    try:
        for response in call:
            if response.event.HasField("update_rejected"):
                rejected.append(response.event.update_rejected)
    except grpc.RpcError as error:
        return error.code(), str(error.details()), rejected
    return grpc.StatusCode.OK, "", rejected


def upload_once(
    stub: styleblend_pb2_grpc.StyleBlendStub, request: pb.UploadImageRequest
) -> tuple[grpc.StatusCode, str]:
    try:
        stub.UploadImage(request, timeout=CALL_TIMEOUT_S, metadata=metadata())
    except grpc.RpcError as error:
        return error.code(), str(error.details())
    return grpc.StatusCode.OK, ""


def still_up(processes: ProcessGraph) -> None:
    for name in SERVICES:
        assert processes.alive(name), f"{name} died:\n{processes.log_tail(name)}"
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health_status(processes.address("gateway")) == serving
    processes.stub().GetInfo(pb.GetInfoRequest(), timeout=30)


def fuzz_gateway(processes: ProcessGraph, examples: int) -> dict[str, object]:
    stub = processes.stub()
    upload = stub.UploadImage(pb.UploadImageRequest(data=sample(fuzz.SAMPLES[0])), timeout=30)
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=30)
    overrides = fuzz.public_overrides(
        tuple(layer.name for layer in info.layers),
        (upload.upload_id,),
        tuple(model.name for model in info.fast_models),
    )
    options = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    blends: Counter[str] = Counter()
    sessions: Counter[str] = Counter()
    updates: Counter[str] = Counter()
    uploads: Counter[str] = Counter()

    @options
    @given(request=fuzz.blend_requests(overrides))
    def blend_calls(request: pb.BlendRequest) -> None:
        code, details = blend_once(stub, request)
        checked(code, details, blends)

    later = fuzz.session_requests(overrides)

    @options
    @given(
        start=fuzz.blend_requests(overrides),
        first=st.one_of(st.none(), fuzz.session_requests(overrides)),
        changes=st.lists(st.one_of(later, fuzz.session_updates(overrides)), max_size=3),
    )
    def session_calls(
        start: pb.BlendRequest,
        first: pb.SessionRequest | None,
        changes: list[pb.SessionRequest | pb.SessionUpdate],
    ) -> None:
        messages = [first or pb.SessionRequest(start=start)]
        for change in changes:
            if isinstance(change, pb.SessionUpdate):
                change = pb.SessionRequest(update=change)
            messages.append(change)
        code, details, rejected = session_once(stub, messages)
        checked(code, details, sessions)
        for refusal in rejected:
            updates[grpc.StatusCode.OK.name if not refusal.code else str(refusal.code)] += 1
            assert refusal.code in IN_BAND, (refusal.code, refusal.message)
            assert refusal.message and "internal error" not in refusal.message

    @options
    @given(request=fuzz.upload_requests(overrides))
    def upload_calls(request: pb.UploadImageRequest) -> None:
        code, details = upload_once(stub, request)
        checked(code, details, uploads)

    calls: list[Callable[[], None]] = [blend_calls, session_calls, upload_calls]
    for run in calls:
        run()
        still_up(processes)
    return {
        "Blend": dict(blends),
        "Session": dict(sessions),
        "Session updates refused in-band (by code)": dict(updates),
        "UploadImage": dict(uploads),
        "cases": sum(blends.values()) + sum(sessions.values()) + sum(uploads.values()),
    }


def test_fuzzed_calls_get_only_refusals_and_the_graph_stays_up(
    processes: ProcessGraph, report: Report
) -> None:
    result = fuzz_gateway(processes, SHORT)
    report.add("fuzz: gateway calls (short)", result)
    assert result["Blend"].get("OK", 0) > 0  # type: ignore[attr-defined]


@pytest.mark.reliability
def test_fuzzed_calls_long(processes: ProcessGraph, report: Report) -> None:
    result = fuzz_gateway(processes, LONG)
    report.add("fuzz: gateway calls", result)
    assert result["Blend"].get("OK", 0) > 0  # type: ignore[attr-defined]
