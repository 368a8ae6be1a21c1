"""Structured logs: the session id the gateway makes follows the session into every service."""

from __future__ import annotations

import io
import json
import logging

import pytest
from styleblend.v1 import styleblend_pb2 as pb

from services.common import logs
from tests.conftest import Graph, sample


def test_a_blends_session_id_is_in_the_logs_of_every_service_it_reaches(
    graph: Graph, caplog: pytest.LogCaptureFixture
) -> None:
    request = pb.BlendRequest(
        sources=[
            pb.Source(data=sample("content/coffee.jpg"), style_weight=0.0, content_weight=1.0),
            pb.Source(data=sample("style/grass.jpg"), style_weight=1.0, content_weight=0.0),
        ],
        max_side_px=48,
        iterations=2,
    )
    caplog.set_level(logging.INFO)
    call = graph.stub().Blend(request, timeout=120)
    events = [response.event for response in call]
    assert events[-1].HasField("result")
    # The gateway names the session to its client too, at the start of the stream.
    session_id = str(dict(call.initial_metadata())[logs.SESSION_KEY])
    assert len(session_id) == 16

    def rpcs(session: str) -> set[str]:
        return {
            str(getattr(record, "rpc", ""))
            for record in caplog.records
            if getattr(record, "session", None) == session
        }

    seen = rpcs(session_id)
    for rpc in (
        "/styleblend.v1.StyleBlend/Blend",
        "/styleblend.internal.v1.FeaturesService/Extract",
        "/styleblend.internal.v1.BlendingService/BlendTargets",
        "/styleblend.internal.v1.ReconstructionService/Reconstruct",
    ):
        assert rpc in seen, (rpc, seen)
    # What a service logs itself while serving the session names it too.
    started = [r for r in caplog.records if r.getMessage().startswith("reconstructing:")]
    assert session_id in {getattr(r, "session", "") for r in started}
    # Another blend is another session.
    second = graph.stub().Blend(request, timeout=120)
    list(second)
    assert dict(second.initial_metadata())[logs.SESSION_KEY] != session_id


def test_json_lines_carry_the_session_and_the_extras() -> None:
    stream = io.StringIO()
    logs.install()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter("features"))
    logger = logging.getLogger("tests.observability.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with logs.session("abc123"):
            logger.warning("cache %s", "full", extra={"bytes": 42})
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "cache full" and first["level"] == "WARNING"
    assert (first["service"], first["session"], first["bytes"]) == ("features", "abc123", 42)
    assert "session" not in second
    assert first["time"].endswith("+00:00")


def test_a_session_id_from_metadata_is_made_safe_to_log() -> None:
    assert logs.session_from([(logs.SESSION_KEY, "abc-123_x.y")]) == "abc-123_x.y"
    assert logs.session_from([(logs.SESSION_KEY, 'a"b\nc} ' + "x" * 100)]) == "abc" + "x" * 61
    assert logs.session_from([("other", "abc")]) == ""
