"""The gateway's work, free of gRPC: plan a blend, fetch features, blend targets, reconstruct."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

from cachetools import LRUCache
from styleblend.internal.v1 import (
    blending_pb2,
    features_pb2,
    reconstruction_pb2,
)
from styleblend.v1 import styleblend_pb2

from services.common import images
from services.common.config import GatewayConfig
from services.common.manifest import Manifest
from services.gateway.plan import Plan, PlannedSource, plan_blend

VERSION = "0.1.0"


class ReconstructStream(Protocol):
    def __iter__(self) -> Iterator[reconstruction_pb2.ReconstructResponse]: ...
    def cancel(self) -> None: ...


class Upstreams(Protocol):
    """The three internal services, as the gateway needs them."""

    def get_model(self) -> features_pb2.GetModelResponse: ...
    def extract(self, request: features_pb2.ExtractRequest) -> features_pb2.ExtractResponse: ...
    def blend_targets(
        self, request: blending_pb2.BlendTargetsRequest
    ) -> blending_pb2.BlendTargetsResponse: ...
    def get_device(self) -> reconstruction_pb2.GetDeviceResponse: ...
    def reconstruct(
        self, requests: Iterator[reconstruction_pb2.ReconstructRequest]
    ) -> ReconstructStream: ...


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
        self._model: features_pb2.GetModelResponse | None = None

    def model(self) -> tuple[Manifest, list[str]]:
        """The features service's manifest and providers, fetched once it answers."""
        if self._model is None:
            self._model = self.upstreams.get_model()
        return Manifest.from_json(self._model.manifest_json), list(self._model.execution_providers)

    def upload(self, data: bytes) -> Upload:
        header = images.probe(data, "image", self.config.max_image_pixels)
        digest = images.sha256(data)
        with self._lock:
            self._uploads[digest] = data
        return Upload(digest, header)

    def uploaded(self, upload_id: str) -> bytes | None:
        with self._lock:
            return self._uploads.get(upload_id)

    def start(self, request: styleblend_pb2.BlendRequest) -> BlendRun:
        """Check everything and return the run; nothing has been computed yet."""
        manifest, _ = self.model()
        return BlendRun(
            plan_blend(request, manifest, self.config, self.uploaded), manifest, self.upstreams
        )

    def info(self) -> styleblend_pb2.GetInfoResponse:
        manifest, providers = self.model()
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
            ),
            execution_providers=providers,
            reconstruction_device=device.device,
            version=VERSION,
        )


_END = object()


class BlendRun:
    """One blend from features to result. `finish` and `cancel` may be called from any thread."""

    def __init__(self, plan: Plan, manifest: Manifest, upstreams: Upstreams) -> None:
        self.plan = plan
        self.manifest = manifest
        self.upstreams = upstreams
        self._controls: queue.Queue[object] = queue.Queue()
        self._stream: ReconstructStream | None = None
        self._cancelled = threading.Event()

    def events(self) -> Iterator[styleblend_pb2.BlendEvent]:
        targets = self.upstreams.blend_targets(
            blending_pb2.BlendTargetsRequest(sources=[self._features(s) for s in self.plan.sources])
        )
        if self._cancelled.is_set():
            return
        self._stream = self.upstreams.reconstruct(self._requests(self._job(targets)))
        if self._cancelled.is_set():
            self._stream.cancel()
        try:
            for response in self._stream:
                event = response.event
                if event.HasField("result"):
                    event.result.recipe_json = self.recipe()
                yield event
        finally:
            self._controls.put(_END)
            self._stream.cancel()

    def finish(self) -> None:
        self._controls.put(
            reconstruction_pb2.ReconstructRequest(finish=styleblend_pb2.FinishSession())
        )

    def cancel(self) -> None:
        self._cancelled.set()
        self._controls.put(_END)
        if self._stream is not None:
            self._stream.cancel()

    def _features(self, source: PlannedSource) -> blending_pb2.SourceFeatures:
        plan = self.plan
        wanted: dict[tuple[int, int], tuple[list[str], list[str]]] = {}
        if source.style_weight > 0:
            wanted.setdefault(plan.style_size(source), ([], []))[0].extend(plan.style_layers)
        if source.content_weight > 0:
            wanted.setdefault((plan.width, plan.height), ([], []))[1].extend(plan.content_layers)
        features = blending_pb2.SourceFeatures(
            style_weight=source.style_weight, content_weight=source.content_weight
        )
        for (width, height), (gram_layers, feature_layers) in wanted.items():
            extracted = self.upstreams.extract(
                features_pb2.ExtractRequest(
                    image=source.data,
                    width_px=width,
                    height_px=height,
                    gram_layers=gram_layers,
                    feature_layers=feature_layers,
                )
            )
            features.grams.MergeFrom(extracted.grams)
            features.features.MergeFrom(extracted.features)
        return features

    def _job(self, targets: blending_pb2.BlendTargetsResponse) -> reconstruction_pb2.ReconstructJob:
        plan = self.plan
        init_image = b""
        if plan.init == styleblend_pb2.INIT_IMAGE:
            init_image = plan.init_image
        elif plan.init == styleblend_pb2.INIT_CONTENT and plan.content_source is not None:
            init_image = plan.content_source.data
        return reconstruction_pb2.ReconstructJob(
            model=self.manifest.model,
            weights_sha256=self.manifest.weights_sha256,
            grams=targets.grams,
            features=targets.features,
            style_scale=targets.style_scale,
            content_scale=targets.content_scale,
            width_px=plan.width,
            height_px=plan.height,
            iterations=plan.iterations,
            optimizer=plan.optimizer,  # type: ignore[arg-type]
            content_loss_weight=plan.content_loss_weight,
            style_loss_weight=plan.style_loss_weight,
            tv_loss_weight=plan.tv_loss_weight,
            init_image=init_image,
            seed=plan.seed,
            preview_every=plan.preview_every,
            learning_rate=plan.learning_rate,
        )

    def _requests(
        self, job: reconstruction_pb2.ReconstructJob
    ) -> Iterator[reconstruction_pb2.ReconstructRequest]:
        yield reconstruction_pb2.ReconstructRequest(start=job)
        while (control := self._controls.get()) is not _END:
            yield control  # type: ignore[misc]

    def recipe(self) -> str:
        plan = self.plan
        recipe = {
            "model": self.manifest.model,
            "weights_sha256": self.manifest.weights_sha256,
            "sources": [
                {
                    "sha256": s.sha256,
                    "style_weight": s.style_weight,
                    "content_weight": s.content_weight,
                }
                for s in plan.sources
            ],
            **{
                key: value
                for key, value in asdict(plan).items()
                if key not in ("sources", "init_image")
            },
            "optimizer": styleblend_pb2.Optimizer.Name(plan.optimizer),  # type: ignore[arg-type]
            "init": styleblend_pb2.Init.Name(plan.init),  # type: ignore[arg-type]
        }
        if plan.init == styleblend_pb2.INIT_IMAGE:
            recipe["init_image_sha256"] = images.sha256(plan.init_image)
        return json.dumps(recipe, indent=2)
