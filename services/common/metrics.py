"""Prometheus metrics, one registry per server, so several servers in one process stay apart.

Every server counts its calls by method and status code and times them (`ObservingInterceptor`
in services.common.server); each service adds its own instruments through `ServiceMetrics`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# From a GetInfo (milliseconds) to a long reconstruction stream (minutes).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class LabelledGauge(Collector):
    """A gauge read when scraped: `read` gives (label values, value) pairs."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        read: Callable[[], Iterable[tuple[tuple[str, ...], float]]],
    ) -> None:
        self.name, self.documentation, self.labels, self.read = name, documentation, labels, read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=list(self.labels))
        for values, value in self.read():
            family.add_metric(list(values), value)
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Described without reading: reading may touch a device.
        yield GaugeMetricFamily(self.name, self.documentation, labels=list(self.labels))


class ServiceMetrics:
    """A server's registry with the instruments every server has; services add their own."""

    def __init__(self, service: str) -> None:
        self.service = service  # "gateway", "features", …, or "all" for the one-process graph
        self.registry = CollectorRegistry()
        self._instruments: dict[str, Any] = {}
        self.requests = self.counter(
            "styleblend_requests", "gRPC calls handled", ("grpc_service", "method", "code")
        )
        self.errors = self.counter(
            "styleblend_errors", "gRPC calls that ended with a status other than OK",
            ("grpc_service", "method", "code"),
        )  # fmt: skip
        self.latency = self.histogram(
            "styleblend_request_seconds", "gRPC call duration, to the last message of a stream",
            ("grpc_service", "method"),
        )  # fmt: skip

    def counter(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
        return self._get(name, lambda: Counter(name, documentation, labels, registry=self.registry))

    def gauge(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
        return self._get(name, lambda: Gauge(name, documentation, labels, registry=self.registry))

    def histogram(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> Histogram:
        return self._get(
            name,
            lambda: Histogram(
                name, documentation, labels, registry=self.registry, buckets=LATENCY_BUCKETS_S
            ),
        )

    def gauge_from(self, name: str, documentation: str, read: Callable[[], float]) -> Gauge:
        """A gauge whose value `read` gives when scraped."""
        gauge = self.gauge(name, documentation)
        gauge.set_function(read)
        return gauge

    def labelled_gauge_from(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        read: Callable[[], Iterable[tuple[tuple[str, ...], float]]],
    ) -> None:
        self._get(name, lambda: self._register(LabelledGauge(name, documentation, labels, read)))

    def _register(self, collector: Collector) -> Collector:
        self.registry.register(collector)
        return collector

    def _get(self, name: str, make: Callable[[], Any]) -> Any:
        # One instrument per name: servicers sharing a server share it.
        if name not in self._instruments:
            self._instruments[name] = make()
        return self._instruments[name]

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's current value, as a scrape would show it (for tests and reports)."""
        return self.registry.get_sample_value(name, labels or {})


@dataclass
class MetricsHttp:
    """The /metrics endpoint of one registry; `port` is the bound port."""

    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_metrics(metrics: ServiceMetrics, host: str, port: int) -> MetricsHttp:
    """Expose `metrics` over HTTP on host:port (0 picks a free port)."""
    server, thread = start_http_server(port, addr=host or "0.0.0.0", registry=metrics.registry)
    return MetricsHttp(int(server.server_port), server, thread)
