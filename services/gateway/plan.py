"""Every check of a public BlendRequest, before any work starts, resolved into a Plan."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from styleblend.v1 import styleblend_pb2

from services.common import images
from services.common.config import GatewayConfig
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.manifest import Manifest

MIN_SIDE_PX = 32


@dataclass(frozen=True)
class PlannedSource:
    data: bytes
    sha256: str
    header: images.ImageHeader
    style_weight: float
    content_weight: float


@dataclass(frozen=True)
class Plan:
    sources: tuple[PlannedSource, ...]
    width: int  # canvas
    height: int
    style_layers: tuple[str, ...]
    content_layers: tuple[str, ...]
    iterations: int
    optimizer: int  # styleblend_pb2.Optimizer
    content_loss_weight: float
    style_loss_weight: float
    tv_loss_weight: float
    init: int  # styleblend_pb2.Init
    init_image: bytes
    seed: int
    preview_every: int
    learning_rate: float

    @property
    def content_source(self) -> PlannedSource | None:
        """The source with the largest content weight (the first of equals); None if all are 0."""
        best = max(self.sources, key=lambda s: s.content_weight)
        return best if best.content_weight > 0 else None

    def style_size(self, source: PlannedSource) -> tuple[int, int]:
        """Style images are seen at the canvas's longest side, keeping their own aspect ratio."""
        return images.fit_inside(
            source.header.width, source.header.height, max(self.width, self.height)
        )


def _weight(value: float, field: str, *, positive: bool = False) -> float:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise InvalidArgument(f"{field} must be a finite number {bound}, got {value}")
    return value


def _bounded(value: int, default: int, limit: int, field: str, minimum: int = 1) -> int:
    value = value or default
    if value < minimum:
        raise InvalidArgument(f"{field} must be at least {minimum}, got {value}")
    if value > limit:
        raise ResourceExhausted(f"{field} {value} is over the limit of {limit}")
    return value


def _layers(
    requested: Sequence[str], default: Sequence[str], manifest: Manifest, field: str
) -> tuple[str, ...]:
    layers = tuple(requested) or tuple(default)
    unknown = [name for name in layers if name not in manifest.layer_names]
    if unknown:
        raise InvalidArgument(
            f"{field}: unknown layer(s) {', '.join(unknown)}; "
            f"{manifest.model} has {', '.join(manifest.layer_names)}"
        )
    if len(set(layers)) != len(layers):
        raise InvalidArgument(f"{field}: a layer is named twice in {', '.join(layers)}")
    return layers


def _enum(value: int, enum: Any, field: str) -> None:
    if value not in enum.values():
        raise InvalidArgument(f"{field}: {value} is not one of {', '.join(enum.keys()[1:])}")


def _source(
    index: int,
    source: styleblend_pb2.Source,
    uploads: Callable[[str], bytes | None],
    config: GatewayConfig,
) -> PlannedSource:
    field = f"sources[{index}]"
    which = source.WhichOneof("image")
    if which is None:
        raise InvalidArgument(f"{field}: no image; set `data` or `upload_id`")
    if which == "upload_id":
        data = uploads(source.upload_id)
        if data is None:
            raise InvalidArgument(
                f"{field}.upload_id: no upload {source.upload_id!r} (unknown or expired); "
                "upload the image again"
            )
    else:
        data = source.data
    header = images.probe(data, f"{field} image", config.max_image_pixels)
    for name in ("style_weight", "content_weight"):
        if not source.HasField(name):
            raise InvalidArgument(f"{field}.{name} is missing")
    return PlannedSource(
        data=data,
        sha256=images.sha256(data),
        header=header,
        style_weight=_weight(source.style_weight, f"{field}.style_weight"),
        content_weight=_weight(source.content_weight, f"{field}.content_weight"),
    )


def plan_blend(
    request: styleblend_pb2.BlendRequest,
    manifest: Manifest,
    config: GatewayConfig,
    uploads: Callable[[str], bytes | None],
) -> Plan:
    count = len(request.sources)
    if count == 0:
        raise InvalidArgument("sources: at least one source is needed")
    if count > config.max_sources:
        raise ResourceExhausted(f"sources: {count} is over the limit of {config.max_sources}")
    sources = tuple(_source(i, s, uploads, config) for i, s in enumerate(request.sources))
    if not any(s.style_weight > 0 or s.content_weight > 0 for s in sources):
        raise InvalidArgument("every style_weight and content_weight is 0: nothing to blend")

    side = _bounded(
        request.max_side_px, config.default_side_px, config.max_side_px, "max_side_px", MIN_SIDE_PX
    )
    canvas_source = max(sources, key=lambda s: s.content_weight)
    width, height = images.fit_inside(canvas_source.header.width, canvas_source.header.height, side)
    if min(width, height) < MIN_SIDE_PX:
        raise InvalidArgument(
            f"max_side_px {side} makes a {width}×{height} canvas for this aspect ratio; "
            f"each side must be at least {MIN_SIDE_PX}"
        )

    _enum(request.optimizer, styleblend_pb2.Optimizer, "optimizer")
    _enum(request.init, styleblend_pb2.Init, "init")
    init = request.init or styleblend_pb2.INIT_CONTENT
    if init == styleblend_pb2.INIT_IMAGE:
        if not request.init_image:
            raise InvalidArgument("init_image is required when init is INIT_IMAGE")
        images.probe(request.init_image, "init_image", config.max_image_pixels)
    elif request.init_image:
        raise InvalidArgument("init_image is set but init is not INIT_IMAGE")

    defaults = manifest.loss_defaults
    return Plan(
        sources=sources,
        width=width,
        height=height,
        style_layers=_layers(
            request.style_layers, manifest.default_style_layers, manifest, "style_layers"
        ),
        content_layers=_layers(
            request.content_layers, manifest.default_content_layers, manifest, "content_layers"
        ),
        iterations=_bounded(
            request.iterations, config.default_iterations, config.max_iterations, "iterations"
        ),
        optimizer=request.optimizer or styleblend_pb2.OPTIMIZER_LBFGS,
        content_loss_weight=_optional(request, "content_loss_weight", defaults.content),
        style_loss_weight=_optional(request, "style_loss_weight", defaults.style),
        tv_loss_weight=_optional(request, "tv_loss_weight", defaults.tv),
        init=init,
        init_image=request.init_image,
        seed=request.seed if request.HasField("seed") else secrets.randbits(63),
        preview_every=request.preview_every or config.default_preview_every,
        learning_rate=_weight(
            request.learning_rate
            if request.HasField("learning_rate")
            else config.default_learning_rate,
            "learning_rate",
            positive=True,
        ),
    )


def _optional(
    request: styleblend_pb2.BlendRequest, field: str, default: float, *, positive: bool = False
) -> float:
    if not request.HasField(field):  # type: ignore[arg-type]
        return default
    return _weight(getattr(request, field), field, positive=positive)
