"""Building the four services from their configs, alone or all in one server.

Each service's own libraries load only when that service is built: a gateway process never
loads PyTorch or ONNX Runtime, and a features process never loads PyTorch
(tests/reliability/test_modules.py reads the processes' memory maps).
"""

from __future__ import annotations

import errno
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from services.common.channels import BlendedTargets, FeatureTensors, upstream_credentials
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
from services.common.metrics import ServiceMetrics
from services.common.security import is_loopback, loopback_address
from services.common.server import PortInUse, RunningServer, Servicer, Tls, start_server
from services.common.store import Stores
from services.common.universalmodel import UNIVERSAL_MANIFEST_FILE
from services.gateway.core import Gateway
from services.gateway.servicer import server_threads, style_blend_servicer
from services.gateway.upstream import Upstreams

if TYPE_CHECKING:
    import torch

    from services.gateway.web import WebServer

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


def build_features(config: FeaturesConfig, metrics: ServiceMetrics | None = None) -> Servicer:
    from services.common.providers import TensorRTSettings
    from services.features.core import FeatureExtractor  # ONNX Runtime
    from services.features.fast import FastModels
    from services.features.servicer import features_servicer

    tensorrt = TensorRTSettings(
        config.trt_fp16, config.trt_engine_cache_dir, config.trt_profile_sides
    )
    stores = Stores(config.store, config.store_ttl_s)
    extractor = FeatureExtractor(
        model_folder(config),
        config.providers,
        config.cache_bytes,
        config.intra_op_threads,
        tensorrt,
        max_side_px=config.max_extract_side_px,
        max_pixels=config.max_extract_pixels,
        cpu_arena=config.cpu_arena,
        stores=stores,
    )
    fast = FastModels(
        config.fast_model_dir,
        config.providers,
        config.intra_op_threads,
        tensorrt,
        max_side_px=config.max_extract_side_px,
        max_pixels=config.max_extract_pixels,
    )
    universal = None
    if (config.universal_dir / UNIVERSAL_MANIFEST_FILE).is_file():
        from services.features.universal import UniversalStyliser

        universal = UniversalStyliser(
            model_folder(config),
            config.universal_dir,
            config.intra_op_threads,
            config.providers,
            max_side_px=config.max_extract_side_px,
            max_pixels=config.max_extract_pixels,
        )
    holder = config.advertise_address or ""
    return features_servicer(
        extractor, fast, metrics, config.image_store_bytes, holder, universal, stores
    )


def build_blending(config: BlendingConfig) -> Servicer:
    """Blending fetches the sources' tensors from the features service at features_address."""
    from services.blending.servicer import blending_servicer

    return blending_servicer(
        FeatureTensors(config, config.features_address),
        config.image_store_bytes,
        config.target_store_bytes,
        config.source_cache_bytes,
        config.advertise_address or "",
        Stores(config.store, config.store_ttl_s),
    )


def reconstruction_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_reconstruction(
    config: ReconstructionConfig, metrics: ServiceMetrics | None = None
) -> Servicer:
    import torch

    from export.models import load_feature_net  # PyTorch lives here and in export/ only
    from services.reconstruction.memory import MiB, Planner, device_budget
    from services.reconstruction.precision import compiled
    from services.reconstruction.servicer import reconstruction_servicer
    from services.reconstruction.tiles import Tiling

    if config.threads:
        torch.set_num_threads(config.threads)
    device = reconstruction_device(config.device)
    loaded, manifest = load_feature_net(model_folder(config))
    log.info("model %s on %s", manifest.model, device)
    if metrics is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()

        def gpu_memory() -> list[tuple[tuple[str, str], float]]:
            return [
                ((str(device), "allocated"), float(torch.cuda.memory_allocated(index))),
                ((str(device), "reserved"), float(torch.cuda.memory_reserved(index))),
            ]

        metrics.labelled_gauge_from(
            "styleblend_gpu_memory_bytes",
            "GPU memory PyTorch holds: allocated to tensors, reserved by its allocator",
            ("device", "kind"),
            gpu_memory,
        )
    net = computing_as_configured(loaded.to(device), device, config)
    budget = device_budget(device, config.memory_budget_mib)
    tiling = Tiling(config.tile_px, config.tile_margin_px)
    planner = Planner(net, device, budget, tiling)  # measures the network as it is, uncompiled
    log.info("memory budget %d MiB, %d px tiles beyond it", budget.total // MiB, config.tile_px)
    log.info("network in %s, torch.compile %s", config.precision, config.compile)
    net = compiled(net, device, config.compile)
    blending = BlendedTargets(config, config.blending_address)  # where its targets come from
    return reconstruction_servicer(net, manifest, device, metrics, planner, blending)


def computing_as_configured(
    net: torch.nn.Module, device: torch.device, config: ReconstructionConfig
) -> torch.nn.Module:
    """The network with the convolutions, layout and number format config asks for (not yet
    compiled: the memory planner measures it as it is)."""
    import torch

    from services.reconstruction.precision import in_precision
    from services.reconstruction.winograd import convolution_for, with_winograd

    convolution = convolution_for(config.convolution, device, config.precision, config.compile)
    if convolution == "winograd":  # NNPACK reads NCHW, so channels_last would only add copies
        log.info("3×3 convolutions by Winograd (NNPACK): %d layers", with_winograd(net))
    elif config.channels_last:  # the image follows the weights' layout through every layer
        net = net.to(memory_format=torch.channels_last)
    return in_precision(net, device, config.precision)


def build_gateway(config: GatewayConfig, metrics: ServiceMetrics | None = None) -> Servicer:
    """The public service; its calls to the others carry `config.internal_token`."""
    return style_blend_servicer(Gateway(config, Upstreams(config)), metrics)


def tls_of(config: ServiceConfig) -> Tls | None:
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    return Tls(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)


def token_of(config: GatewayConfig) -> str | None:
    return config.gateway_token.get_secret_value() if config.gateway_token else None


def internal_credential(config: ServiceConfig, name: str) -> str | None:
    """The secret an internal service asks its callers for (the gateway sends it).

    With neither the secret nor mutual TLS it would answer anyone who reaches its port, with
    none of the gateway's limits: on any interface but loopback it refuses to start; on
    loopback it starts, with a warning, for a graph run by hand on one machine.
    """
    secret = config.internal_secret
    if secret is not None or config.tls_client_ca_file is not None:
        return secret
    if not (is_loopback(config.host.strip("[]")) or config.host == "localhost"):
        raise FailedPrecondition(
            f"the {name} service would answer anyone who reaches {config.host}: set "
            "STYLEBLEND_INTERNAL_TOKEN (the gateway needs the same one) or mutual TLS "
            "(STYLEBLEND_TLS_CLIENT_CA_FILE), or listen on 127.0.0.1"
        )
    log.warning(
        "the %s service answers any caller on this machine: set STYLEBLEND_INTERNAL_TOKEN "
        "(the gateway needs the same one) so it answers only the gateway",
        name,
    )
    return None


def serve_one(name: str) -> RunningServer:
    """Start one service alone, configured from the environment."""
    config: ServiceConfig
    metrics = ServiceMetrics(name)
    if name == "features":
        config = FeaturesConfig()
        secret = internal_credential(config, name)  # before the model loads
        servicer = build_features(config, metrics)
        return _start(
            config, config.features_port, servicer, metrics, config.features_metrics_port, secret
        )
    if name == "blending":
        config = BlendingConfig()
        secret = internal_credential(config, name)
        servicer = build_blending(config)
        return _start(
            config, config.blending_port, servicer, metrics, config.blending_metrics_port, secret
        )
    if name == "reconstruction":
        config = ReconstructionConfig()
        secret = internal_credential(config, name)
        servicer = build_reconstruction(config, metrics)
        return _start(
            config,
            config.reconstruction_port,
            servicer,
            metrics,
            config.reconstruction_metrics_port,
            secret,
        )
    if name == "gateway":
        config = GatewayConfig()
        return start_server(
            lambda _: [build_gateway(config, metrics)],
            address=config.address(config.gateway_port),
            max_message_bytes=config.max_request_bytes,
            max_workers=server_threads(config),
            tls=tls_of(config),
            token=token_of(config),
            metrics=metrics,
            metrics_port=config.gateway_metrics_port,
        )
    raise ValueError(f"unknown service {name!r}; one of {', '.join(SERVICES)}")


def _start(
    config: ServiceConfig,
    port: int,
    servicer: Servicer,
    metrics: ServiceMetrics,
    metrics_port: int | None,
    internal_token: str | None,
) -> RunningServer:
    return start_server(
        lambda _: [servicer],
        address=config.address(port),
        max_message_bytes=config.max_message_bytes,
        tls=tls_of(config),
        internal_token=internal_token,
        metrics=metrics,
        metrics_port=metrics_port,
    )


def start_studio(gateway: GatewayConfig, grpc_port: int) -> WebServer:
    """The browser studio, in the gateway's process, bridged to its gRPC port; over TLS with
    the upstream CA (and client certificate) when the gateway serves TLS."""
    from services.gateway.web import start_web  # aiohttp: the gateway's extra

    try:
        return start_web(
            gateway.host,
            gateway.http_port,
            loopback_address(gateway.host, grpc_port),
            max_message_bytes=max(gateway.max_request_bytes, gateway.max_message_bytes),
            credentials=upstream_credentials(gateway) if tls_of(gateway) else None,
            origins=gateway.studio_origins,
        )
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            address = gateway.address(gateway.http_port)
            raise PortInUse(address, gateway.http_port, "the studio's HTTP port") from None
        raise


Inner = Callable[[str, SecretStr], list[Servicer]]


def wired_to(
    gateway: GatewayConfig,
    features: str,
    blending: str,
    reconstruction: str,
    secret: SecretStr | None,
) -> GatewayConfig:
    """The gateway's config calling the three services there, with the graph's secret."""
    return gateway.model_copy(
        update={
            "features_address": features,
            "blending_address": blending,
            "reconstruction_address": reconstruction,
            "internal_token": secret,
        }
    )


def serve_all_in_one(
    gateway: GatewayConfig,
    inner: Inner | None = None,
    metrics: ServiceMetrics | None = None,
) -> RunningServer:
    """All four servicers in one server on the gateway's port; the services call each other,
    and the gateway them, on that port, as they would across processes.

    `inner(own address, secret)`: the features, blending and reconstruction servicers wired
    to that address (by default built from the environment). The internal methods sit on the
    public port, so they always ask for the internal secret, made here when the config has
    none; the public ones ask for the gateway's token when there is one."""
    tls = tls_of(gateway)
    if tls is not None and gateway.upstream_ca_file is None:
        raise FailedPrecondition(
            "in one process the gateway calls its own TLS port: set STYLEBLEND_UPSTREAM_CA_FILE "
            "to the CA that signed STYLEBLEND_TLS_CERT_FILE"
        )
    metrics = metrics or ServiceMetrics("all")
    secret = SecretStr(gateway.internal_secret or secrets.token_urlsafe(32))
    build_inner = inner or (lambda own, token: inner_from_environment(own, token, metrics))

    def wire_to(port: int) -> list[Servicer]:
        own = loopback_address(gateway.host, port)
        wired = wired_to(gateway, own, own, own, secret)
        return [*build_inner(own, secret), build_gateway(wired, metrics)]

    return start_server(
        wire_to,
        address=gateway.address(gateway.gateway_port),
        # Internal messages (content maps) share this server, so the larger limit applies.
        max_message_bytes=max(gateway.max_message_bytes, gateway.max_request_bytes),
        max_workers=server_threads(gateway, internal_services=True),
        tls=tls,
        token=token_of(gateway),
        internal_token=secret.get_secret_value(),
        metrics=metrics,
        metrics_port=gateway.gateway_metrics_port,
    )


def inner_from_environment(
    own: str, secret: SecretStr, metrics: ServiceMetrics | None = None
) -> list[Servicer]:
    """Features, blending and reconstruction from STYLEBLEND_*, calling each other at `own`."""
    return [
        build_features(FeaturesConfig(), metrics),
        build_blending(BlendingConfig(features_address=own, internal_token=secret)),
        build_reconstruction(
            ReconstructionConfig(blending_address=own, internal_token=secret), metrics
        ),
    ]


@dataclass
class LocalGraph:
    """The four services, each on its own loopback server in this process (tests, benches)."""

    servers: dict[str, RunningServer]  # by service name
    servicers: dict[str, Servicer]
    gateway_config: GatewayConfig

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.servers[name].port}"

    def stop(self) -> None:
        for name in reversed(SERVICES):
            self.servers[name].stop(0)


def start_local_graph(
    features: FeaturesConfig,
    reconstruction: ReconstructionConfig,
    gateway: GatewayConfig,
    *,
    internal_token: str | None = None,
    metrics: dict[str, ServiceMetrics] | None = None,
    gateway_servicer: Callable[[GatewayConfig], Servicer] | None = None,
    max_message_bytes: int = 64 * 1024 * 1024,
) -> LocalGraph:
    """Start features, blending, reconstruction and the gateway on free loopback ports, each
    wired to the ones it calls, sharing `internal_token`. `gateway_servicer(config)` builds the
    gateway (by default `build_gateway`)."""
    metrics = metrics or {name: ServiceMetrics(name) for name in SERVICES}
    token = SecretStr(internal_token) if internal_token else None
    servers: dict[str, RunningServer] = {}
    servicers: dict[str, Servicer] = {}

    def serve(name: str, servicer: Servicer, limit: int = max_message_bytes) -> str:
        servicers[name] = servicer
        servers[name] = start_server(
            lambda _: [servicer],
            address="127.0.0.1:0",
            max_message_bytes=limit,
            metrics=metrics[name],
            internal_token=internal_token if name != "gateway" else None,
        )
        return f"127.0.0.1:{servers[name].port}"

    own = serve("features", build_features(features, metrics["features"]))
    blends = serve(
        "blending", build_blending(BlendingConfig(features_address=own, internal_token=token))
    )
    wired = reconstruction.model_copy(update={"blending_address": blends, "internal_token": token})
    rebuilds = serve("reconstruction", build_reconstruction(wired, metrics["reconstruction"]))
    config = wired_to(gateway, own, blends, rebuilds, token)
    build = gateway_servicer or (
        lambda wired_config: build_gateway(wired_config, metrics["gateway"])
    )
    serve("gateway", build(config), config.max_request_bytes)
    return LocalGraph(servers, servicers, config)
