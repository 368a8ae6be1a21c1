"""Shared fixtures: sample images, exported models, and the graph on loopback."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from styleblend.v1 import styleblend_pb2_grpc

from bench.ports import free_port
from services.common.config import (
    FeaturesConfig,
    GatewayConfig,
    ReconstructionConfig,
)
from services.common.metrics import ServiceMetrics
from services.common.server import RunningServer, Servicer, start_server
from services.features.core import FeatureExtractor
from services.graph import build_gateway, start_local_graph

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "clients" / "samples"
MODELS = ROOT / "models"  # git ignores it; exports are reused between runs
MiB = 1024 * 1024
# The graph's own credential, new for each run, as `styleblend up` makes one for each start:
# the test servers of internal services ask for it and the test gateways send it.
INTERNAL_TOKEN = secrets.token_urlsafe(32)


def sample(name: str) -> bytes:
    """`content/astronaut.jpg`, `style/starry_night.jpg`, …"""
    return (SAMPLES / name).read_bytes()


@pytest.fixture(scope="session")
def vgg19_dir() -> Path:
    from export.onnx_export import ensure_model

    return ensure_model("vgg19", MODELS)


@pytest.fixture(scope="session")
def lite0_dir() -> Path:
    from export.onnx_export import ensure_model

    return ensure_model("efficientnet-lite0", MODELS)


FAST_STYLES = {  # name -> sample image; the identity first, as training makes it
    "starry": "style/starry_night.jpg",
    "scream": "style/the_scream.jpg",
    "matisse": "style/woman-with-hat-matisse.jpg",
}


def write_fast_model(folder: Path, seed: int = 0) -> Path:
    """An untrained fast network with distinct (γ, β) per style, saved and exported the way
    training saves and exports one: real ONNX files, a real manifest, real style hashes."""
    from itertools import combinations

    import numpy as np
    import torch

    from export.fastnet import FastStyleNet, one_hot
    from export.train_fast import CHECKPOINT_FILE, export_model
    from services.common.fastmodel import IDENTITY
    from services.common.images import sha256, to_canvas, to_uint8

    net = FastStyleNet(1 + len(FAST_STYLES), identity=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.requires_grad:  # the identity's frozen zeros stay: it is exact
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    # Tests tell styles apart by their pixels, so make sure, once, that this untrained network
    # styles: each style moves the cat far from the photo and from every other style, by many
    # more levels than the 1 that uint8 rounding or another runtime's arithmetic can move one.
    photo = to_canvas(sample("content/chelsea.jpg"), 96, 64)
    with torch.no_grad():
        styled = [
            to_uint8(net(torch.from_numpy(photo).permute(2, 0, 1)[None], one_hot(style, net.styles))
                     [0].permute(1, 2, 0).numpy()).astype(np.int16)
            for style in range(net.styles)
        ]  # fmt: skip
    np.testing.assert_array_equal(styled[0], to_uint8(photo))  # the identity is the photo
    gaps = [float(np.abs(a - b).mean()) for a, b in combinations(styled, 2)]
    assert min(gaps) > 8, f"seed {seed}: styles and the photo differ by {gaps} uint8 levels"
    styles = [{"name": IDENTITY, "path": None, "sha256": ""}] + [
        {"name": name, "path": str(SAMPLES / path), "sha256": sha256(sample(path))}
        for name, path in FAST_STYLES.items()
    ]
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": net.state_dict(), "layout": net.layout.as_dict(), "styles": styles,
         "feature_model": "vgg19", "feature_weights_sha256": "", "config": {}, "step": 0,
         "optimizer": {}},
        folder / CHECKPOINT_FILE,
    )  # fmt: skip
    export_model(folder)
    return folder


@pytest.fixture(scope="session")
def universal_dir(tmp_path_factory: pytest.TempPathFactory, vgg19_dir: Path) -> Path:
    """Tiny universal decoders (relu2_1, relu1_1), trained on the sample photos at 64 px by the
    real training script: enough to invert those layers roughly, in seconds."""
    from export import train_universal

    folder = tmp_path_factory.mktemp("universal") / "test-universal"
    config = train_universal.TrainConfig(
        levels=("relu2_1", "relu1_1"), size_px=64, batch=4, steps=150, lr=3e-3, seed=0
    )
    train_universal.train(folder, vgg19_dir, config, progress=False)
    train_universal.export_decoders(folder, vgg19_dir)
    return folder


@pytest.fixture(scope="session")
def fast_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fast_model(tmp_path_factory.mktemp("fast") / "test-model")


def serve(
    servicer: Servicer,
    max_message_bytes: int = 64 * MiB,
    metrics: ServiceMetrics | None = None,
    internal_token: str | None = INTERNAL_TOKEN,
    port: int = 0,
) -> RunningServer:
    """A server on loopback (a free port unless given); an internal servicer there answers only
    callers with `internal_token` (a gateway's server hosts no internal method, so it changes
    nothing)."""
    return start_server(
        lambda _: [servicer],
        address=f"127.0.0.1:{port}",
        max_message_bytes=max_message_bytes,
        metrics=metrics,
        internal_token=internal_token,
    )


def address(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


@dataclass
class Graph:
    features: RunningServer
    blending: RunningServer
    reconstruction: RunningServer
    gateway: RunningServer
    config: GatewayConfig
    extractor: FeatureExtractor  # the features service's core, to count what it runs
    # By service name: to serve them again (e.g. over TLS), and what each server measures.
    servicers: dict[str, Servicer] = field(default_factory=dict)
    internal_token: str = INTERNAL_TOKEN  # what the internal services ask the gateway for

    @property
    def address(self) -> str:
        return address(self.gateway)

    def stub(self) -> styleblend_pb2_grpc.StyleBlendStub:
        channel = grpc.insecure_channel(
            self.address, options=[("grpc.max_receive_message_length", 64 * MiB)]
        )
        return styleblend_pb2_grpc.StyleBlendStub(channel)


def internal_metadata(graph: Graph) -> tuple[tuple[str, str], ...]:
    """What the gateway sends the internal services: for a test that calls one directly."""
    return (("authorization", f"Bearer {graph.internal_token}"),)


def start_gateway(
    upstreams: dict[str, str], port: int = 0, **limits: int
) -> tuple[RunningServer, GatewayConfig]:
    config = GatewayConfig(
        gateway_port=0,
        features_address=upstreams["features"],
        blending_address=upstreams["blending"],
        reconstruction_address=upstreams["reconstruction"],
        upstream_timeout_s=5.0,
        internal_token=INTERNAL_TOKEN,
    ).model_copy(update=limits)
    metrics = ServiceMetrics("gateway")
    server = serve(build_gateway(config, metrics), config.max_request_bytes, metrics, port=port)
    return server, config


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis on loopback, as a cluster's would be set up: no persistence, a memory limit
    with allkeys-lru. `make test` installs Debian's redis-server; CI must have it."""
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: `make redis` installs it")
        pytest.skip("no redis-server (`make redis` installs Debian's)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--maxmemory", "512mb", "--maxmemory-policy", "allkeys-lru", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail(f"redis-server on port {port} did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="session")
def graph(vgg19_dir: Path, fast_model_dir: Path, universal_dir: Path) -> Iterator[Graph]:
    models = vgg19_dir.parent
    local = start_local_graph(
        FeaturesConfig(
            model="vgg19",
            model_dir=models,
            fast_model_dir=fast_model_dir.parent,
            universal_dir=universal_dir,
        ),
        ReconstructionConfig(model="vgg19", model_dir=models, device="cpu"),
        GatewayConfig(
            gateway_port=0,
            upstream_timeout_s=5.0,
            max_side_px=512,
            max_sources=4,
            max_iterations=500,
            max_request_bytes=2 * MiB,
        ),
        internal_token=INTERNAL_TOKEN,
    )
    servers = local.servers
    extractor = local.servicers["features"].servicer.extractor  # type: ignore[attr-defined]
    yield Graph(
        servers["features"], servers["blending"], servers["reconstruction"], servers["gateway"],
        local.gateway_config, extractor, local.servicers,
    )  # fmt: skip
    local.stop()
