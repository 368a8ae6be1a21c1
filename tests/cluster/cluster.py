"""The graph as a cluster runs it, on loopback: two replicas of every service as real processes
(`python -m services NAME`), each caller dialling all replicas of the next service with
round-robin channels (multi-address targets), and one Redis shared by all (STYLEBLEND_STORE)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families
from styleblend.v1 import styleblend_pb2_grpc

from tests.conftest import free_port
from tests.reliability.processes import START_TIMEOUT_S, health_status, rss_bytes

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("features", "blending", "reconstruction", "gateway")
CALLS = {"blending": ("features",), "reconstruction": ("blending",)}  # the rest call nothing
MiB = 1024 * 1024


@dataclass
class Replica:
    service: str
    index: int
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Cluster:
    log_dir: Path
    store: str  # the shared Redis
    internal_token: str
    replicas: int = 2
    settings: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, list[Replica]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.nodes = {s: [Replica(s, k) for k in range(self.replicas)] for s in SERVICES}

    def target(self, service: str) -> str:
        """Every replica of `service`, for a round-robin channel."""
        return "ipv4:" + ",".join(r.address for r in self.nodes[service])

    def env(self, replica: Replica) -> dict[str, str]:
        name = replica.service.upper()
        env = {
            **os.environ,
            "STYLEBLEND_HOST": "127.0.0.1",
            "STYLEBLEND_INTERNAL_TOKEN": self.internal_token,
            "STYLEBLEND_STORE": self.store,
            "STYLEBLEND_HTTP_PORT": "0",
            "STYLEBLEND_LOG_FORMAT": "text",
            f"STYLEBLEND_{name}_PORT": str(replica.port),
            f"STYLEBLEND_{name}_METRICS_PORT": str(replica.metrics_port),
            "STYLEBLEND_ADVERTISE_ADDRESS": replica.address,
        }
        called = SERVICES[:3] if replica.service == "gateway" else CALLS.get(replica.service, ())
        for upstream in called:
            env[f"STYLEBLEND_{upstream.upper()}_ADDRESS"] = self.target(upstream)
        env.update(self.settings)
        return env

    def spawn(self, replica: Replica) -> None:
        log = open(self.log_dir / f"{replica.name}.log", "ab")  # noqa: SIM115 (the child owns it)
        replica.process = subprocess.Popen(
            [sys.executable, "-m", "services", replica.service],
            cwd=ROOT,
            env=self.env(replica),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def wait_healthy(self, replica: Replica) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert replica.process is not None
            if replica.process.poll() is not None:
                raise RuntimeError(f"{replica.name} exited; log:\n{self.log_tail(replica)}")
            if health_status(replica.address, 1.0) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{replica.name} not healthy; log:\n{self.log_tail(replica)}")

    def start(self) -> None:
        every = [r for service in SERVICES for r in self.nodes[service]]
        for replica in every:
            self.spawn(replica)
        for replica in every:
            self.wait_healthy(replica)

    def ensure_up(self) -> None:
        """Bring back a replica an earlier test killed, at its old address."""
        down = [r for service in SERVICES for r in self.nodes[service] if not r.alive]
        for replica in down:
            self.spawn(replica)
        for replica in down:
            self.wait_healthy(replica)

    def kill(self, replica: Replica) -> None:
        assert replica.process is not None
        replica.process.kill()
        replica.process.wait(timeout=30)

    def stop(self) -> None:
        running = [r.process for rs in self.nodes.values() for r in rs if r.alive]
        for process in running:
            assert process is not None
            process.send_signal(signal.SIGTERM)
        for process in running:
            assert process is not None
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def metric(self, replica: Replica, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include `labels`, read over HTTP."""
        url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def calls(self, replica: Replica, method: str) -> float:
        return self.metric(replica, "styleblend_requests_total", method=method)

    def rss(self, replica: Replica) -> int:
        assert replica.process is not None
        return rss_bytes(replica.process.pid)

    def threads(self, replica: Replica) -> int:
        assert replica.process is not None
        with open(f"/proc/{replica.process.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))

    def log_tail(self, replica: Replica, lines: int = 30) -> str:
        path = self.log_dir / f"{replica.name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stub(self, gateway: int) -> styleblend_pb2_grpc.StyleBlendStub:
        options = [("grpc.max_receive_message_length", 64 * MiB)]
        channel = grpc.insecure_channel(self.nodes["gateway"][gateway].address, options=options)
        return styleblend_pb2_grpc.StyleBlendStub(channel)
