"""Only the gateway may call the internal services: they ask for the graph's own credential,
which the gateway sends and `styleblend up` makes anew for each start."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from styleblend.internal.v1 import (
    blending_pb2,
    blending_pb2_grpc,
    features_pb2,
    features_pb2_grpc,
    reconstruction_pb2,
    reconstruction_pb2_grpc,
)
from styleblend.v1 import styleblend_pb2 as pb
from styleblend.v1 import styleblend_pb2_grpc

from clients.cli import graph as launcher
from clients.cli.main import build_parser
from services.common.config import BlendingConfig, FeaturesConfig, GatewayConfig
from services.common.errors import FailedPrecondition
from services.common.server import RunningServer
from services.graph import internal_credential, serve_all_in_one, serve_one
from tests.conftest import ROOT, Graph, address, internal_metadata, start_gateway
from tests.reliability.processes import free_port
from tests.security.conftest import tiny_blend

Metadata = tuple[tuple[str, str], ...]
WRONG: Metadata = (("authorization", "Bearer not-the-graphs-secret"),)
MISSING = "this service answers only the styleblend gateway"
NOT_THIS_GRAPHS = "the internal credential is not this graph's"


def calls(target: str) -> dict[str, Callable[[Metadata], object]]:
    """One call of each internal service's work, against `target`."""
    channel = grpc.insecure_channel(target)
    features = features_pb2_grpc.FeaturesServiceStub(channel)
    blending = blending_pb2_grpc.BlendingServiceStub(channel)
    reconstruction = reconstruction_pb2_grpc.ReconstructionServiceStub(channel)
    return {
        "Extract": lambda m: features.Extract(
            features_pb2.ExtractRequest(), metadata=m, timeout=30
        ),
        "BlendTargets": lambda m: blending.BlendTargets(
            blending_pb2.BlendTargetsRequest(), metadata=m, timeout=30
        ),
        "Reconstruct": lambda m: list(
            reconstruction.Reconstruct(
                iter([reconstruction_pb2.ReconstructRequest()]), metadata=m, timeout=30
            )
        ),
    }


def refusal(call: Callable[[Metadata], object], metadata: Metadata) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(metadata)
    return caught.value


SERVER_OF = {"Extract": "features", "BlendTargets": "blending", "Reconstruct": "reconstruction"}


@pytest.mark.parametrize("method", list(SERVER_OF))
def test_an_internal_service_refuses_callers_without_the_graphs_credential(
    graph: Graph, method: str
) -> None:
    call = calls(address(getattr(graph, SERVER_OF[method])))[method]
    missing = refusal(call, ())
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert MISSING in str(missing.details())
    wrong = refusal(call, WRONG)
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert NOT_THIS_GRAPHS in str(wrong.details())
    # The gateway's token is not the graph's credential either.
    gateway_token = refusal(call, (("authorization", "Bearer correct-horse-battery-staple"),))
    assert gateway_token.code() == grpc.StatusCode.UNAUTHENTICATED
    # With it the call gets in (and is then refused for what it asks: nothing).
    assert refusal(call, internal_metadata(graph)).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_gateways_blends_still_go_through(graph: Graph) -> None:
    events = [r.event for r in graph.stub().Blend(tiny_blend(), timeout=120)]
    assert events[-1].result.stats.iterations == 2


def test_a_gateway_without_the_credential_says_what_to_set(graph: Graph) -> None:
    upstreams = {n: address(getattr(graph, n)) for n in ("features", "blending", "reconstruction")}
    gateway, _ = start_gateway(upstreams, internal_token=None)  # type: ignore[arg-type]
    try:
        stub = styleblend_pb2_grpc.StyleBlendStub(grpc.insecure_channel(address(gateway)))
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetInfo(pb.GetInfoRequest(), timeout=30)
    finally:
        gateway.stop(0)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = str(caught.value.details())
    assert "the features service at" in details and "STYLEBLEND_INTERNAL_TOKEN" in details


# --- one process ----------------------------------------------------------------------------

GATEWAY_TOKEN = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def all_in_one(graph: Graph) -> Iterator[RunningServer]:
    """The four servicers on one server with a gateway token, as `up --single-process` runs
    them; the internal secret is the server's own."""
    config = GatewayConfig(gateway_port=0, http_port=0, gateway_token=GATEWAY_TOKEN)
    inner = [graph.servicers[name] for name in ("features", "blending", "reconstruction")]
    server = serve_all_in_one(config, lambda own, secret: inner)
    yield server
    server.stop(0)


def test_one_process_keeps_its_internal_methods_to_itself(all_in_one: RunningServer) -> None:
    target = address(all_in_one)
    public = (("authorization", f"Bearer {GATEWAY_TOKEN}"),)
    for method, call in calls(target).items():
        for metadata in ((), WRONG, public):
            refused = refusal(call, metadata)
            assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, (method, metadata)
    stub = styleblend_pb2_grpc.StyleBlendStub(grpc.insecure_channel(target))
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetInfo(pb.GetInfoRequest(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "this gateway needs a token" in str(caught.value.details())
    # With the gateway's token a blend goes through: the gateway calls itself with the secret.
    events = [r.event for r in stub.Blend(tiny_blend(), metadata=public, timeout=120)]
    assert events[-1].result.stats.iterations == 2


# --- without a credential -------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7"])
def test_an_internal_service_without_a_credential_will_not_listen_beyond_loopback(
    host: str,
) -> None:
    with pytest.raises(FailedPrecondition, match="STYLEBLEND_INTERNAL_TOKEN") as caught:
        internal_credential(FeaturesConfig(host=host), "features")
    assert f"would answer anyone who reaches {host}" in str(caught.value)
    # The secret, or mutual TLS (the client certificate says who calls), lets it start.
    assert internal_credential(FeaturesConfig(host=host, internal_token="s3cret"), "x") == "s3cret"
    mutual = FeaturesConfig(
        host=host,
        tls_cert_file=Path("server.pem"),
        tls_key_file=Path("server.key"),
        tls_client_ca_file=Path("ca.pem"),
    )
    assert internal_credential(mutual, "features") is None


def test_serve_one_refuses_before_it_binds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STYLEBLEND_HOST", "0.0.0.0")
    monkeypatch.setenv("STYLEBLEND_BLENDING_PORT", "0")
    monkeypatch.delenv("STYLEBLEND_INTERNAL_TOKEN", raising=False)
    with pytest.raises(FailedPrecondition, match="the blending service would answer anyone"):
        serve_one("blending").stop(0)  # (stopped, should it start after all)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_on_loopback_it_starts_with_a_warning(host: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="services.graph"):
        assert internal_credential(BlendingConfig(host=host), "blending") is None
    assert "the blending service answers any caller on this machine" in caplog.text
    assert "STYLEBLEND_INTERNAL_TOKEN" in caplog.text


# --- `styleblend up` ------------------------------------------------------------------------


def test_each_start_makes_a_new_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STYLEBLEND_INTERNAL_TOKEN", "left-over-from-the-shell")
    args = build_parser().parse_args(["up"])
    first, second = (launcher._environment(args)["STYLEBLEND_INTERNAL_TOKEN"] for _ in range(2))
    assert first != second and "left-over-from-the-shell" not in (first, second)
    assert len(first) >= 43  # 32 random bytes, URL-safe base64


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]


def environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.partition(b"=") for entry in raw.split(b"\0") if entry)
    return {key.decode(): value.decode(errors="replace") for key, _, value in pairs}


def test_up_hands_its_services_a_secret_of_this_start(vgg19_dir: Path) -> None:
    ports = {name: free_port() for name in launcher.DEFAULT_PORTS}
    command = [sys.executable, "-m", "clients.cli.main", "up", f"--http-port={free_port()}"]
    command += [f"--{name}-port={port}" for name, port in ports.items()]
    env = {
        **os.environ,
        "STYLEBLEND_MODEL_DIR": str(vgg19_dir.parent),
        "STYLEBLEND_DEVICE": "cpu",
        "STYLEBLEND_INTERNAL_TOKEN": "left-over-from-the-shell",
    }
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()  # blocks until the graph is up
        assert banner.startswith("styleblend is up"), banner
        secrets = {
            environment_of(child).get("STYLEBLEND_INTERNAL_TOKEN")
            for child in children(process.pid)
        }
        assert len(children(process.pid)) == 4
        (secret,) = secrets  # one for all four
        assert secret is not None and secret != "left-over-from-the-shell" and len(secret) >= 43
        features = features_pb2_grpc.FeaturesServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{ports['features']}")
        )
        with pytest.raises(grpc.RpcError) as caught:
            features.GetModel(features_pb2.GetModelRequest(), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with_secret = (("authorization", f"Bearer {secret}"),)
        model = features.GetModel(features_pb2.GetModelRequest(), metadata=with_secret, timeout=30)
        assert model.manifest_json
        gateway = styleblend_pb2_grpc.StyleBlendStub(
            grpc.insecure_channel(f"127.0.0.1:{ports['gateway']}")
        )
        assert gateway.GetInfo(pb.GetInfoRequest(), timeout=30).model == "vgg19"
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - started < 30
    finally:
        if process.poll() is None:
            process.kill()
