"""Building the four services from their configs, alone or all in one server."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from services.blending.servicer import blending_servicer
from services.common.config import (
    BlendingConfig,
    FeaturesConfig,
    GatewayConfig,
    ModelConfig,
    ReconstructionConfig,
    ServiceConfig,
)
from services.common.errors import FailedPrecondition
from services.common.manifest import MANIFEST_FILE
from services.common.server import RunningServer, Servicer, start_server
from services.features.core import FeatureExtractor, TensorRTSettings
from services.features.fast import FastModels
from services.features.servicer import features_servicer
from services.gateway.core import Gateway
from services.gateway.servicer import style_blend_servicer
from services.gateway.upstream import Upstreams
from services.gateway.web import WebServer, loopback_address, start_web

log = logging.getLogger(__name__)

SERVICES = ("features", "blending", "reconstruction", "gateway")


def model_folder(config: ModelConfig) -> Path:
    folder = config.model_path
    if not (folder / MANIFEST_FILE).is_file():
        raise FailedPrecondition(
            f"no export of {config.model} in {folder}; "
            f"run `styleblend export --model {config.model}`"
        )
    return folder


def build_features(config: FeaturesConfig) -> Servicer:
    tensorrt = TensorRTSettings(
        config.trt_fp16, config.trt_engine_cache_dir, config.trt_profile_sides
    )
    extractor = FeatureExtractor(
        model_folder(config),
        config.providers,
        config.cache_bytes,
        config.intra_op_threads,
        tensorrt,
    )
    fast = FastModels(config.fast_model_dir, config.providers, config.intra_op_threads, tensorrt)
    return features_servicer(extractor, fast)


def build_blending(config: BlendingConfig) -> Servicer:
    return blending_servicer()


def reconstruction_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_reconstruction(config: ReconstructionConfig) -> Servicer:
    from export.models import load_feature_net  # PyTorch lives here and in export/ only
    from services.reconstruction.servicer import reconstruction_servicer

    if config.threads:
        torch.set_num_threads(config.threads)
    device = reconstruction_device(config.device)
    net, manifest = load_feature_net(model_folder(config))
    log.info("model %s on %s", manifest.model, device)
    return reconstruction_servicer(net.to(device), manifest, device)


def build_gateway(config: GatewayConfig) -> Servicer:
    return style_blend_servicer(Gateway(config, Upstreams(config)))


def serve_one(name: str) -> RunningServer:
    """Start one service alone, configured from the environment."""
    config: ServiceConfig
    if name == "features":
        config = FeaturesConfig()
        return _start(config, config.features_port, build_features(config))
    if name == "blending":
        config = BlendingConfig()
        return _start(config, config.blending_port, build_blending(config))
    if name == "reconstruction":
        config = ReconstructionConfig()
        return _start(config, config.reconstruction_port, build_reconstruction(config))
    if name == "gateway":
        config = GatewayConfig()
        return _start(config, config.gateway_port, build_gateway(config), config.max_request_bytes)
    raise ValueError(f"unknown service {name!r}; one of {', '.join(SERVICES)}")


def _start(
    config: ServiceConfig, port: int, servicer: Servicer, max_message_bytes: int | None = None
) -> RunningServer:
    return start_server(
        lambda _: [servicer],
        address=config.address(port),
        max_message_bytes=max_message_bytes or config.max_message_bytes,
    )


def start_studio(gateway: GatewayConfig, grpc_port: int) -> WebServer:
    """The browser studio, in the gateway's process, bridged to its gRPC port."""
    return start_web(
        gateway.host,
        gateway.http_port,
        loopback_address(gateway.host, grpc_port),
        max_message_bytes=max(gateway.max_request_bytes, gateway.max_message_bytes),
    )


def serve_all_in_one(gateway: GatewayConfig) -> RunningServer:
    """All four servicers in one server on the gateway's port; the gateway calls itself."""
    inner = [
        build_features(FeaturesConfig()),
        build_blending(BlendingConfig()),
        build_reconstruction(ReconstructionConfig()),
    ]

    def wire_to(port: int) -> list[Servicer]:
        own = gateway.address(port)
        wired = gateway.model_copy(
            update={"features_address": own, "blending_address": own, "reconstruction_address": own}
        )
        return [*inner, build_gateway(wired)]

    return start_server(
        wire_to,
        address=gateway.address(gateway.gateway_port),
        # Internal messages (content maps) share this server, so the larger limit applies.
        max_message_bytes=max(gateway.max_message_bytes, gateway.max_request_bytes),
    )
