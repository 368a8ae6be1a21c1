"""A port in use is refused, never shared: by a server, and by `styleblend up`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.blending.servicer import blending_servicer
from services.common.server import PortInUse, RunningServer, start_server
from tests.conftest import ROOT, MiB
from tests.reliability.processes import free_port, health_status

SERVICES = ("gateway", "features", "blending", "reconstruction")


def serve_blending(port: int = 0) -> RunningServer:
    return start_server(
        lambda _: [blending_servicer()], address=f"127.0.0.1:{port}", max_message_bytes=MiB
    )


@pytest.fixture
def first() -> Iterator[RunningServer]:
    server = serve_blending()
    yield server
    server.stop(0)


def test_a_second_server_on_the_same_port_is_refused(first: RunningServer) -> None:
    with pytest.raises(PortInUse, match=f"127.0.0.1:{first.port} is in use") as caught:
        serve_blending(first.port).stop(0)  # (stopped, should it start after all)
    assert caught.value.port == first.port
    assert health_status(f"127.0.0.1:{first.port}") == health_pb2.HealthCheckResponse.SERVING


def up(ports: dict[str, int], http_port: int) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "clients.cli.main", "up", f"--http-port={http_port}"]
    command += [f"--{name}-port={port}" for name, port in ports.items()]
    return subprocess.run(
        command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=240
    )


def test_up_names_the_taken_port_and_leaves_the_running_server_alone(
    first: RunningServer,
) -> None:
    ports = {name: free_port() for name in SERVICES}
    ports["blending"] = first.port  # another graph's blending service holds it
    done = up(ports, free_port())
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert f"port {first.port}" in output and "blending" in output, output
    assert "Traceback" not in output, output
    assert "styleblend is up" not in output, output
    assert health_status(f"127.0.0.1:{first.port}") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{first.port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=5)


def test_up_names_the_studios_port_when_it_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        http_port = taken.getsockname()[1]
        done = up({name: free_port() for name in SERVICES}, http_port)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"port {http_port}" in output and "studio" in output, output
    assert "Traceback" not in output and "styleblend is up" not in output, output


def test_the_studio_refuses_a_taken_http_port_by_name() -> None:
    from services.common.config import GatewayConfig
    from services.graph import start_studio

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        http_port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=f"127.0.0.1:{http_port} \\(the studio's HTTP port\\)"):
            start_studio(GatewayConfig(http_port=http_port), free_port()).stop()
