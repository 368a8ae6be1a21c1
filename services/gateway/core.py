"""The gateway's work, free of gRPC: uploads, the model's description, starting blends."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from cachetools import LRUCache
from styleblend.v1 import styleblend_pb2

from services.common import images
from services.common.config import GatewayConfig
from services.common.fastmodel import FastManifest
from services.common.manifest import Manifest
from services.gateway.plan import plan_blend
from services.gateway.run import BlendRun, Runs, Upstreams

VERSION = "0.1.0"


@dataclass(frozen=True)
class Model:
    manifest: Manifest
    providers: list[str]
    fast: dict[str, FastManifest]  # by name


@dataclass(frozen=True)
class Upload:
    upload_id: str
    header: images.ImageHeader


class Gateway:
    def __init__(self, config: GatewayConfig, upstreams: Upstreams) -> None:
        self.config = config
        self.upstreams = upstreams
        self._uploads: LRUCache[str, bytes] = LRUCache(
            maxsize=config.upload_store_bytes, getsizeof=len
        )
        self._lock = threading.Lock()
        self._model: Model | None = None
        self.runs = Runs()  # in flight; finished early when the server stops

    def model(self) -> Model:
        """The features service's manifests and providers, fetched once it answers."""
        if self._model is None:
            answer = self.upstreams.get_model()
            fast = [FastManifest.from_json(text) for text in answer.fast_manifests_json]
            self._model = Model(
                Manifest.from_json(answer.manifest_json),
                list(answer.execution_providers),
                {manifest.name: manifest for manifest in fast},
            )
        return self._model

    def upload(self, data: bytes) -> Upload:
        header = images.probe(data, "image", self.config.max_image_pixels)
        digest = images.sha256(data)
        with self._lock:
            self._uploads[digest] = data
        return Upload(digest, header)

    def uploaded(self, upload_id: str) -> bytes | None:
        with self._lock:
            return self._uploads.get(upload_id)

    def start(
        self, request: styleblend_pb2.BlendRequest, upstreams: Upstreams | None = None
    ) -> BlendRun:
        """Check everything and return the run; nothing has been computed yet. `upstreams`:
        the channels this run calls through (e.g. ones that name its session)."""
        model = self.model()
        plan = plan_blend(request, model.manifest, self.config, self.uploaded, model.fast)
        return self.runs.track(
            BlendRun(plan, model.manifest, upstreams or self.upstreams, self.config, self.uploaded)
        )

    def info(self) -> styleblend_pb2.GetInfoResponse:
        model = self.model()
        manifest = model.manifest
        device = self.upstreams.get_device()
        config, losses = self.config, manifest.loss_defaults
        return styleblend_pb2.GetInfoResponse(
            model=manifest.model,
            weights_sha256=manifest.weights_sha256,
            weights_source=f"{manifest.weights_source}; licence: {manifest.licence}",
            layers=[
                styleblend_pb2.Layer(name=layer.name, channels=layer.channels, stride=layer.stride)
                for layer in manifest.layers
            ],
            defaults=styleblend_pb2.Defaults(
                max_side_px=config.default_side_px,
                iterations=config.default_iterations,
                optimizer=styleblend_pb2.OPTIMIZER_LBFGS,
                style_layers=manifest.default_style_layers,
                content_layers=manifest.default_content_layers,
                content_loss_weight=losses.content,
                style_loss_weight=losses.style,
                tv_loss_weight=losses.tv,
                preview_every=config.default_preview_every,
                learning_rate=config.default_learning_rate,
            ),
            limits=styleblend_pb2.Limits(
                max_side_px=config.max_side_px,
                max_sources=config.max_sources,
                max_iterations=config.max_iterations,
                max_request_bytes=config.max_request_bytes,
                max_image_pixels=config.max_image_pixels,
                max_scales=config.max_scales,
            ),
            execution_providers=model.providers,
            fast_models=[
                styleblend_pb2.FastModel(
                    name=fast.name,
                    styles=[
                        styleblend_pb2.FastStyle(name=s.name, sha256=s.sha256) for s in fast.styles
                    ],
                    feature_model=fast.feature_model,
                    steps=fast.steps,
                )
                for fast in model.fast.values()
            ],
            reconstruction_device=device.device,
            version=VERSION,
        )
