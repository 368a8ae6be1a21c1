"""The four services as real processes (`python -m services NAME`) on free loopback ports.

Each service keeps its port for the life of the graph, so a killed one comes back at the same
address and the gateway's channel finds it again.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from styleblend.v1 import styleblend_pb2_grpc

from bench.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("features", "blending", "reconstruction", "gateway")
START_TIMEOUT_S = 120.0  # PyTorch and the model load slowly on a busy 2-core machine
MiB = 1024 * 1024


def _status(pid: int, key: str) -> int:
    """One number from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} for process {pid}")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process."""
    return _status(pid, "VmRSS") * 1024


def health_status(address: str, timeout_s: float = 2.0) -> int | None:
    """The server's overall health status, or None when it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
        except grpc.RpcError:
            return None
        return int(answer.status)


@dataclass
class ProcessGraph:
    """Start, kill, stop and restart the services; `env` is every process's STYLEBLEND_*."""

    log_dir: Path
    settings: dict[str, str]
    ports: dict[str, int] = field(default_factory=lambda: {n: free_port() for n in SERVICES})
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # The graph's own credential, as `styleblend up` hands its services one.
    internal_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    @property
    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "STYLEBLEND_HOST": "127.0.0.1",
            "STYLEBLEND_HTTP_PORT": "0",
            "STYLEBLEND_INTERNAL_TOKEN": self.internal_token,
        }
        for name in SERVICES:
            env[f"STYLEBLEND_{name.upper()}_PORT"] = str(self.ports[name])
            if name != "gateway":
                env[f"STYLEBLEND_{name.upper()}_ADDRESS"] = self.address(name)
        env.update(self.settings)
        return env

    def spawn(self, name: str) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it)
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "services", name],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def wait_healthy(self, name: str, timeout_s: float = START_TIMEOUT_S) -> float:
        """Seconds until `name` reports SERVING; fails if its process dies first."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            process = self.processes[name]
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {process.returncode}; log:\n{self.log_tail(name)}"
                )
            if health_status(self.address(name), 1.0) == health_pb2.HealthCheckResponse.SERVING:
                return time.monotonic() - started
            time.sleep(0.1)
        raise TimeoutError(f"{name} not healthy in {timeout_s} s; log:\n{self.log_tail(name)}")

    def start(self, *names: str) -> None:
        for name in names or SERVICES:
            self.spawn(name)
        for name in names or SERVICES:
            self.wait_healthy(name)

    def alive(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def ensure_up(self) -> None:
        """Bring back whatever an earlier test left down."""
        down = [name for name in SERVICES if not self.alive(name)]
        if down:
            self.start(*down)

    def kill(self, name: str) -> None:
        """SIGKILL: the process gets no chance to say goodbye."""
        process = self.processes[name]
        process.kill()
        process.wait(timeout=30)

    def terminate(self, name: str, timeout_s: float = 60.0) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took to exit."""
        process = self.processes[name]
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=timeout_s)
        return code, time.monotonic() - started

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def rss(self, name: str) -> int:
        return rss_bytes(self.processes[name].pid)

    def threads(self, name: str) -> int:
        return _status(self.processes[name].pid, "Threads")

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stub(self) -> styleblend_pb2_grpc.StyleBlendStub:
        options = [
            ("grpc.max_receive_message_length", 64 * MiB),
            # Its own connection: one that failed while a service was down is not reused.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        channel = grpc.insecure_channel(self.address("gateway"), options=options)
        return styleblend_pb2_grpc.StyleBlendStub(channel)
