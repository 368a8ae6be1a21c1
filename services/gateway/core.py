"""The gateway's work, free of gRPC: uploads, the model's description, starting blends."""

from __future__ import annotations

from dataclasses import dataclass

from styleblend.v1 import styleblend_pb2

from services.common import images
from services.common.config import GatewayConfig
from services.common.fastmodel import FastManifest
from services.common.manifest import Manifest
from services.common.universalmodel import UniversalManifest
from services.gateway.plan import (
    OPTIMIZERS,
    Plan,
    Update,
    parse_update,
    plan_blend,
    proto_value,
    request_defaults,
)
from services.gateway.run import BlendRun, Runs, Upstreams
from services.gateway.uploads import UploadStore, upload_bytes

VERSION = "0.1.0"


@dataclass(frozen=True)
class Model:
    manifest: Manifest
    providers: list[str]
    fast: dict[str, FastManifest]  # by name
    universal: UniversalManifest | None  # the universal decoders, if features has them


@dataclass(frozen=True)
class Upload:
    upload_id: str
    header: images.ImageHeader


class Gateway:
    def __init__(self, config: GatewayConfig, upstreams: Upstreams) -> None:
        self.config = config
        self.upstreams = upstreams
        per_client = config.upload_bytes_per_client
        self.uploads = UploadStore(
            config.upload_store_bytes,
            config.upload_store_bytes // 4 if per_client is None else per_client,
            upload_bytes(config),
        )
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
                UniversalManifest.from_json(answer.universal_manifest_json)
                if answer.universal_manifest_json
                else None,
            )
        return self._model

    def upload(self, data: bytes, client: str) -> Upload:
        """Store an image that decodes in full, charged to `client` (see UploadStore)."""
        self.uploads.check(len(data))
        header = images.check_decodes(data, "the uploaded image", self.config.max_image_pixels)
        digest = images.sha256(data)
        self.uploads.put(digest, data, client)
        return Upload(digest, header)

    def uploaded(self, upload_id: str) -> bytes | None:
        return self.uploads.get(upload_id)

    def plan(self, request: styleblend_pb2.BlendRequest) -> Plan:
        """Every check of a request, before any work: the plan, or the error that names why."""
        model = self.model()
        return plan_blend(
            request, model.manifest, self.config, self.uploaded, model.fast, model.universal
        )

    def parse_update(self, message: styleblend_pb2.SessionUpdate) -> Update:
        return parse_update(message, self.config, self.uploaded)

    def start(self, plan: Plan, upstreams: Upstreams | None = None) -> BlendRun:
        """The run of a plan; nothing has been computed yet. `upstreams`: the channels this run
        calls through (e.g. ones that name its session)."""
        manifest = self.model().manifest
        return self.runs.track(BlendRun(plan, manifest, upstreams or self.upstreams, self.config))

    def info(self) -> styleblend_pb2.GetInfoResponse:
        model = self.model()
        manifest = model.manifest
        device = self.upstreams.get_device()
        config, defaults = self.config, request_defaults(manifest, self.config)
        return styleblend_pb2.GetInfoResponse(
            model=manifest.model,
            weights_sha256=manifest.weights_sha256,
            weights_source=f"{manifest.weights_source}; licence: {manifest.licence}",
            layers=[
                styleblend_pb2.Layer(name=layer.name, channels=layer.channels, stride=layer.stride)
                for layer in manifest.layers
            ],
            defaults=styleblend_pb2.Defaults(
                max_side_px=defaults.side_px,
                iterations=defaults.iterations,
                optimizer=proto_value(OPTIMIZERS, defaults.optimizer),  # type: ignore[arg-type]
                style_layers=defaults.style_layers,
                content_layers=defaults.content_layers,
                content_loss_weight=defaults.content_loss_weight,
                style_loss_weight=defaults.style_loss_weight,
                tv_loss_weight=defaults.tv_loss_weight,
                preview_every=defaults.preview_every,
                learning_rate=defaults.learning_rate,
            ),
            limits=styleblend_pb2.Limits(
                max_side_px=config.max_side_px,
                max_sources=config.max_sources,
                max_regions=config.max_regions,
                max_iterations=config.max_iterations,
                max_request_bytes=config.max_request_bytes,
                max_image_pixels=config.max_image_pixels,
                max_scales=config.max_scales,
                max_extract_side_px=config.max_extract_side_px,
                max_extract_pixels=config.max_extract_pixels,
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
            universal=_universal_info(model.universal),
            reconstruction_device=device.device,
            version=VERSION,
        )


def _universal_info(model: UniversalManifest | None) -> styleblend_pb2.UniversalModel | None:
    if model is None:
        return None
    return styleblend_pb2.UniversalModel(
        name=model.name,
        layers=model.layers,
        feature_model=model.feature_model,
        steps=[decoder.steps for decoder in model.decoders],
        default_levels=model.levels_by_default,
    )
