"""Each server's Prometheus metrics, scraped over HTTP after real calls through the graph."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from styleblend.v1 import styleblend_pb2 as pb
from styleblend.v1 import styleblend_pb2_grpc

from bench.ports import free_port
from services.common.config import GatewayConfig
from services.common.metrics import MetricsHttp, ServiceMetrics, serve_metrics
from services.common.server import RunningServer, start_server
from services.graph import build_gateway
from tests.conftest import Graph, address, sample, start_gateway

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
GATEWAY = "styleblend.v1.StyleBlend"
FEATURES = "styleblend.internal.v1.FeaturesService"
RECONSTRUCTION = "styleblend.internal.v1.ReconstructionService"


def scrape(endpoint: MetricsHttp) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def stub(target: str | grpc.Channel) -> styleblend_pb2_grpc.StyleBlendStub:
    channel = grpc.insecure_channel(target) if isinstance(target, str) else target
    return styleblend_pb2_grpc.StyleBlendStub(channel)


def fresh_gateway(graph: Graph) -> RunningServer:
    upstreams = {n: address(getattr(graph, n)) for n in ("features", "blending", "reconstruction")}
    return start_gateway(upstreams)[0]


@dataclass
class Scraped:
    gateway: RunningServer
    endpoints: dict[str, MetricsHttp]

    def scrape(self) -> dict[str, Samples]:
        return {name: scrape(endpoint) for name, endpoint in self.endpoints.items()}


@pytest.fixture
def scraped(graph: Graph) -> Iterator[Scraped]:
    """/metrics of the graph's features and reconstruction servers, and of a fresh gateway."""
    gateway = fresh_gateway(graph)
    endpoints = {
        "gateway": serve_metrics(gateway.metrics, "127.0.0.1", 0),
        "features": serve_metrics(graph.features.metrics, "127.0.0.1", 0),
        "reconstruction": serve_metrics(graph.reconstruction.metrics, "127.0.0.1", 0),
    }
    yield Scraped(gateway, endpoints)
    for endpoint in endpoints.values():
        endpoint.stop()
    gateway.stop(0)


def blend(iterations: int, style: str = "style/grass.jpg") -> pb.BlendRequest:
    return pb.BlendRequest(
        sources=[
            pb.Source(data=sample("content/coffee.jpg"), style_weight=0.0, content_weight=1.0),
            pb.Source(data=sample(style), style_weight=1.0, content_weight=0.0),
        ],
        max_side_px=48,
        iterations=iterations,
    )


def test_calls_errors_latency_iterations_and_the_cache_are_counted(scraped: Scraped) -> None:
    before = scraped.scrape()
    client = stub(address(scraped.gateway))
    for _ in range(2):  # the second blend finds its features in the cache
        events = [r.event for r in client.Blend(blend(3), timeout=120)]
        assert events[-1].result.stats.iterations == 3
    with pytest.raises(grpc.RpcError):
        list(client.Blend(pb.BlendRequest(max_side_px=48), timeout=30))  # no sources
    after = scraped.scrape()

    def moved(service: str, name: str, **labels: str) -> float:
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    ok = {"grpc_service": GATEWAY, "method": "Blend", "code": "OK"}
    bad = {"grpc_service": GATEWAY, "method": "Blend", "code": "INVALID_ARGUMENT"}
    assert moved("gateway", "styleblend_requests_total", **ok) == 2
    assert moved("gateway", "styleblend_requests_total", **bad) == 1
    assert moved("gateway", "styleblend_errors_total", **bad) == 1
    assert moved("gateway", "styleblend_errors_total", **ok) == 0
    latency = {"grpc_service": GATEWAY, "method": "Blend"}
    assert moved("gateway", "styleblend_request_seconds_count", **latency) == 3
    assert moved("gateway", "styleblend_request_seconds_sum", **latency) > 0
    assert value(after["gateway"], "styleblend_gateway_active_sessions") == 0
    assert value(after["gateway"], "styleblend_grpc_threads") == 32
    assert ("styleblend_grpc_queued_calls", ()) in after["gateway"]

    extract = {"grpc_service": FEATURES, "method": "Extract", "code": "OK"}
    assert moved("features", "styleblend_requests_total", **extract) >= 4
    assert moved("features", "styleblend_features_cache_lookups_total", result="hit") >= 2
    assert value(after["features"], "styleblend_features_cache_bytes") > 0

    reconstruct = {"grpc_service": RECONSTRUCTION, "method": "Reconstruct", "code": "OK"}
    assert moved("reconstruction", "styleblend_requests_total", **reconstruct) == 2
    assert moved("reconstruction", "styleblend_reconstruction_iterations_total") == 6
    assert value(after["reconstruction"], "styleblend_reconstruction_iterations_per_second") > 0
    assert value(after["reconstruction"], "styleblend_reconstruction_active_sessions") == 0
    bucket = {"grpc_service": RECONSTRUCTION, "method": "Reconstruct", "le": "+Inf"}
    assert moved("reconstruction", "styleblend_request_seconds_bucket", **bucket) == 2


def test_active_sessions_are_gauged_while_they_run(graph: Graph) -> None:
    gateway = fresh_gateway(graph)
    try:
        stream = stub(address(gateway)).Blend(blend(200), timeout=120)
        next(stream)  # the run is under way
        assert gateway.metrics.value("styleblend_gateway_active_sessions") == 1
        running = graph.reconstruction.metrics.value("styleblend_reconstruction_active_sessions")
        assert running == 1
        stream.cancel()
    finally:
        gateway.stop(0)


def test_a_server_serves_its_metrics_on_the_port_it_is_given() -> None:
    """Two servers in one process, each with its own registry and endpoint."""
    free = f"127.0.0.1:{free_port()}"  # nothing listens there
    nowhere = GatewayConfig(
        features_address=free, blending_address=free, reconstruction_address=free,
        upstream_timeout_s=5.0,
    )  # fmt: skip
    servers = [
        start_server(
            lambda _, m=metrics: [build_gateway(nowhere, m)],  # type: ignore[misc]
            address="127.0.0.1:0",
            max_message_bytes=1024 * 1024,
            metrics=metrics,
            metrics_port=0,
        )
        for metrics in (ServiceMetrics("gateway"), ServiceMetrics("gateway"))
    ]
    try:
        first, second = (server.metrics_http for server in servers)
        assert first is not None and second is not None and first.port != second.port
        with grpc.insecure_channel(address(servers[0])) as channel, pytest.raises(grpc.RpcError):
            stub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)  # nothing upstream
        unavailable = {"grpc_service": GATEWAY, "method": "GetInfo", "code": "UNAVAILABLE"}
        assert value(scrape(first), "styleblend_errors_total", **unavailable) == 1
        assert value(scrape(second), "styleblend_errors_total", **unavailable) == 0
    finally:
        for server in servers:
            server.stop(0)
    with pytest.raises(OSError):  # stopped with its server
        urllib.request.urlopen(f"http://127.0.0.1:{first.port}/metrics", timeout=2)
