"""The graph when a part is down or wrong, and the standard services on every server."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from styleblend.v1 import styleblend_pb2 as pb
from styleblend.v1 import styleblend_pb2_grpc

from bench.ports import free_port
from services.common.config import ReconstructionConfig
from services.graph import build_reconstruction
from tests.conftest import Graph, address, sample, serve, start_gateway


def blend_request() -> pb.BlendRequest:
    return pb.BlendRequest(
        sources=[
            pb.Source(data=sample("content/coffee.jpg"), style_weight=0.0, content_weight=1.0),
            pb.Source(data=sample("style/grass.jpg"), style_weight=1.0, content_weight=0.0),
        ],
        max_side_px=64,
        iterations=2,
    )


def stub_for(target: str) -> styleblend_pb2_grpc.StyleBlendStub:
    return styleblend_pb2_grpc.StyleBlendStub(grpc.insecure_channel(target))


@pytest.mark.parametrize("down", ["features", "blending", "reconstruction"])
def test_a_down_service_is_unavailable_by_name_within_the_deadline(graph: Graph, down: str) -> None:
    upstreams = {
        "features": address(graph.features),
        "blending": address(graph.blending),
        "reconstruction": address(graph.reconstruction),
    }
    upstreams[down] = f"127.0.0.1:{free_port()}"  # nothing listens there
    gateway, config = start_gateway(upstreams)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        list(stub_for(address(gateway)).Blend(blend_request(), timeout=60))
    elapsed = time.monotonic() - started
    gateway.stop(0)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = str(caught.value.details())
    assert f"the {down} service at {upstreams[down]} is unavailable" in details
    assert elapsed < config.upstream_timeout_s + 2


def test_a_model_mismatch_is_a_failed_precondition(graph: Graph, lite0_dir: Path) -> None:
    other = serve(
        build_reconstruction(
            ReconstructionConfig(
                model="efficientnet-lite0", model_dir=lite0_dir.parent, reconstruction_port=0
            )
        )
    )
    gateway, _ = start_gateway(
        {
            "features": address(graph.features),
            "blending": address(graph.blending),
            "reconstruction": address(other),
        }
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(stub_for(address(gateway)).Blend(blend_request(), timeout=60))
    gateway.stop(0)
    other.stop(0)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model mismatch: the targets come from vgg19" in str(caught.value.details())
    assert "this reconstruction service has efficientnet-lite0" in str(caught.value.details())


SERVICES = {
    "features": "styleblend.internal.v1.FeaturesService",
    "blending": "styleblend.internal.v1.BlendingService",
    "reconstruction": "styleblend.internal.v1.ReconstructionService",
    "gateway": "styleblend.v1.StyleBlend",
}


@pytest.mark.parametrize("name", list(SERVICES))
def test_every_server_has_health_and_reflection(graph: Graph, name: str) -> None:
    channel = grpc.insecure_channel(address(getattr(graph, name)))
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICES[name]):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    answer = next(reflection.ServerReflectionInfo(iter([request]), timeout=5))
    listed = {service.name for service in answer.list_services_response.service}
    assert {SERVICES[name], "grpc.health.v1.Health"} <= listed
