"""Shared fixtures: sample images, exported models, and the graph on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from styleblend.v1 import styleblend_pb2_grpc

from services.common.config import (
    BlendingConfig,
    FeaturesConfig,
    GatewayConfig,
    ReconstructionConfig,
)
from services.common.server import RunningServer, Servicer, start_server
from services.features.core import FeatureExtractor
from services.graph import build_blending, build_features, build_gateway, build_reconstruction

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "clients" / "samples"
MODELS = ROOT / "models"  # git ignores it; exports are reused between runs
MiB = 1024 * 1024


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


def serve(servicer: Servicer, max_message_bytes: int = 64 * MiB) -> RunningServer:
    return start_server(
        lambda _: [servicer], address="127.0.0.1:0", max_message_bytes=max_message_bytes
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

    @property
    def address(self) -> str:
        return address(self.gateway)

    def stub(self) -> styleblend_pb2_grpc.StyleBlendStub:
        channel = grpc.insecure_channel(
            self.address, options=[("grpc.max_receive_message_length", 64 * MiB)]
        )
        return styleblend_pb2_grpc.StyleBlendStub(channel)


def start_gateway(upstreams: dict[str, str], **limits: int) -> tuple[RunningServer, GatewayConfig]:
    config = GatewayConfig(
        gateway_port=0,
        features_address=upstreams["features"],
        blending_address=upstreams["blending"],
        reconstruction_address=upstreams["reconstruction"],
        upstream_timeout_s=5.0,
    ).model_copy(update=limits)
    return serve(build_gateway(config), config.max_request_bytes), config


@pytest.fixture(scope="session")
def graph(vgg19_dir: Path) -> Iterator[Graph]:
    models = vgg19_dir.parent
    features_servicer = build_features(FeaturesConfig(model="vgg19", model_dir=models))
    features = serve(features_servicer)
    blending = serve(build_blending(BlendingConfig()))
    reconstruction = serve(
        build_reconstruction(ReconstructionConfig(model="vgg19", model_dir=models, device="cpu"))
    )
    upstreams = {
        "features": address(features),
        "blending": address(blending),
        "reconstruction": address(reconstruction),
    }
    gateway, config = start_gateway(
        upstreams, max_side_px=512, max_sources=4, max_iterations=500, max_request_bytes=2 * MiB
    )
    extractor = features_servicer.servicer.extractor  # type: ignore[attr-defined]
    yield Graph(features, blending, reconstruction, gateway, config, extractor)
    for server in (gateway, reconstruction, blending, features):
        server.stop(0)
