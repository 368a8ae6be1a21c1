"""Every check of a public BlendRequest or SessionUpdate, before any work, resolved into a Plan."""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from styleblend.v1 import styleblend_pb2

from services.common import images
from services.common.config import GatewayConfig
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.common.fastmodel import FastManifest
from services.common.manifest import MIN_SIDE_PX, Manifest
from services.common.universalmodel import UniversalManifest

AUTO_SCALE_SIDE_PX = 256  # coarse-to-fine adds a scale for each doubling above this
STYLE_SCALE_RANGE = (0.25, 4.0)
# Weights and loss weights reach float32 as products: β·Σᵢsᵢ (up to max_sources weights) times
# each relative loss, then squared in L-BFGS's dot products. 1e6 keeps β·Σs ≤ 1e6 × 8e6 ≈ 1e13,
# its square ≈ 1e26, far under float32's 3.4e38; a nonzero weight under 1e-6 is as good as 0
# (and, under float32's 1.2e-38, is 0) while its ratio to the others stays within 1e12.
MAX_WEIGHT = 1e6
MIN_NONZERO_WEIGHT = 1e-6
MAX_LEARNING_RATE = 1.0  # Adam's step in pixel units: one step across the whole [0, 1] range

# The public enums as the plan holds them; the proto values are converted here, and back only
# where a message is made (recipe.py, targets.py).
Optimizer = Literal["lbfgs", "adam"]
Init = Literal["content", "noise", "image"]
PreserveColor = Literal["", "luminance", "histogram"]
OPTIMIZERS: dict[int, Optimizer] = {  # UNSPECIFIED: Defaults.optimizer
    styleblend_pb2.OPTIMIZER_LBFGS: "lbfgs",
    styleblend_pb2.OPTIMIZER_ADAM: "adam",
}
INITS: dict[int, Init] = {  # UNSPECIFIED: Defaults.init
    styleblend_pb2.INIT_CONTENT: "content",
    styleblend_pb2.INIT_NOISE: "noise",
    styleblend_pb2.INIT_IMAGE: "image",
}
PRESERVE_COLORS: dict[int, PreserveColor] = {
    styleblend_pb2.PRESERVE_COLOR_UNSPECIFIED: "",
    styleblend_pb2.PRESERVE_COLOR_LUMINANCE: "luminance",
    styleblend_pb2.PRESERVE_COLOR_HISTOGRAM: "histogram",
}

Uploads = Callable[[str], bytes | None]


@dataclass(frozen=True)
class Defaults:
    """What each field a request leaves unset becomes: their one home, which GetInfo reports.
    The model's manifest gives the layers and loss weights, the gateway's config the rest."""

    side_px: int
    iterations: int
    preview_every: int
    learning_rate: float
    style_layers: tuple[str, ...]
    content_layers: tuple[str, ...]
    content_loss_weight: float
    style_loss_weight: float
    tv_loss_weight: float
    optimizer: Optimizer = "lbfgs"
    init: Init = "content"
    style_scale: float = 1.0
    strength: float = 1.0  # fast's and universal's: all style


def request_defaults(manifest: Manifest, config: GatewayConfig) -> Defaults:
    losses = manifest.loss_defaults
    return Defaults(
        side_px=config.default_side_px,
        iterations=config.default_iterations,
        preview_every=config.default_preview_every,
        learning_rate=config.default_learning_rate,
        style_layers=tuple(manifest.default_style_layers),
        content_layers=tuple(manifest.default_content_layers),
        content_loss_weight=losses.content,
        style_loss_weight=losses.style,
        tv_loss_weight=losses.tv,
    )


@dataclass(frozen=True)
class PlannedImage:
    data: bytes
    sha256: str
    header: images.ImageHeader


@dataclass(frozen=True)
class PlannedSource:
    image: PlannedImage
    style_weight: float
    content_weight: float
    style_map: PlannedImage | None = None
    content_map: PlannedImage | None = None


@dataclass(frozen=True)
class PlannedRegion:
    mask: PlannedImage
    style_weights: tuple[float, ...]


@dataclass(frozen=True)
class Scale:
    width: int
    height: int
    iterations: int


@dataclass(frozen=True)
class FastPlan:
    model: FastManifest
    identity: int  # the network's identity style
    styles: tuple[int, ...]  # the network's style for each source; -1: none
    strength: float
    refine: bool  # the iterative reconstruction follows, from the network's image


@dataclass(frozen=True)
class UniversalPlan:
    model: UniversalManifest
    levels: tuple[str, ...]  # the decoders to use, coarse to fine
    strength: float
    refine: bool  # the iterative reconstruction follows, from the universal image


@dataclass(frozen=True)
class Plan:
    sources: tuple[PlannedSource, ...]
    regions: tuple[PlannedRegion, ...]
    scales: tuple[Scale, ...]  # coarsest first; the last is the canvas
    style_layers: tuple[str, ...]
    content_layers: tuple[str, ...]
    optimizer: Optimizer
    content_loss_weight: float
    style_loss_weight: float
    tv_loss_weight: float
    init: Init
    init_image: PlannedImage | None
    seed: int
    preview_every: int
    learning_rate: float
    preserve_color: PreserveColor
    style_scale: float
    fast: FastPlan | None = None
    universal: UniversalPlan | None = None

    @property
    def instant(self) -> FastPlan | UniversalPlan | None:
        """The one-pass method whose image comes first, if the request asked for one."""
        return self.fast or self.universal

    @property
    def instant_only(self) -> bool:
        """The one-pass image is the result: no reconstruction follows."""
        return self.instant is not None and not self.instant.refine

    @property
    def canvas(self) -> Scale:
        return self.scales[-1]

    @property
    def content_source(self) -> PlannedSource | None:
        """The source with the largest content weight (the first of equals); None if all are 0."""
        best = max(self.sources, key=lambda s: s.content_weight)
        return best if best.content_weight > 0 else None

    def style_size(self, source: PlannedSource, scale: Scale) -> tuple[int, int]:
        """A style image keeps its aspect ratio; its longest side is the canvas's × style_scale."""
        width, height = source.image.header.width, source.image.header.height
        side = round(max(scale.width, scale.height) * self.style_scale)
        # The model needs MIN_SIDE_PX on the short side too: a long, thin style image grows.
        side = max(side, math.ceil(MIN_SIDE_PX * max(width, height) / min(width, height)))
        return images.fit_inside(width, height, side)


def proto_value(values: Mapping[int, str], name: str) -> int:
    """The proto enum value a plan's name stands for: its own, not UNSPECIFIED, unless the
    name is only UNSPECIFIED's (no colour preservation)."""
    named = [value for value, known in values.items() if known == name]
    return max(named)


def _weight(
    value: float, field: str, *, positive: bool = False, largest: float = MAX_WEIGHT
) -> float:
    """A weight the float32 computation can carry: 0 (unless `positive`) or within
    MIN_NONZERO_WEIGHT..`largest`."""
    zero = "" if positive else "0 or "
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise InvalidArgument(f"{field} must be a finite number {bound}, got {value}")
    if value > largest:
        raise InvalidArgument(f"{field} {value:g} is over the largest allowed, {largest:g}")
    if 0 < value < MIN_NONZERO_WEIGHT:
        raise InvalidArgument(
            f"{field} {value:g} is too small to count: it must be {zero}at least "
            f"{MIN_NONZERO_WEIGHT:g} (the largest allowed is {largest:g})"
        )
    return value


def _bounded(value: int, default: int, limit: int, field: str, minimum: int = 1) -> int:
    value = value or default
    if value < minimum:
        raise InvalidArgument(f"{field} must be at least {minimum}, got {value}")
    if value > limit:
        raise ResourceExhausted(f"{field} {value} is over the limit of {limit}")
    return value


def _enum(value: int, enum: Any, field: str) -> None:
    if value not in enum.values():
        raise InvalidArgument(f"{field}: {value} is not one of {', '.join(enum.keys()[1:])}")


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


class Images:
    """Resolves image fields (bytes or an upload id) and checks their headers."""

    def __init__(self, uploads: Uploads, config: GatewayConfig) -> None:
        self.uploads = uploads
        self.config = config

    def __call__(self, message: Any, field: str, what: str = "image") -> PlannedImage:
        which = message.WhichOneof("image")
        if which is None:
            raise InvalidArgument(f"{field}: no {what}; set `data` or `upload_id`")
        if which == "upload_id":
            data = self.uploads(message.upload_id)
            if data is None:
                raise InvalidArgument(
                    f"{field}.upload_id: no upload {message.upload_id!r} (unknown or expired); "
                    "upload the image again"
                )
            header = images.probe(data, f"{field} {what}", self.config.max_image_pixels)
        else:  # decoded in full now, so the services never meet pixels that do not decode
            data = message.data
            header = images.check_decodes(data, f"{field} {what}", self.config.max_image_pixels)
        return PlannedImage(data, images.sha256(data), header)

    def optional(self, parent: Any, name: str, field: str) -> PlannedImage | None:
        return self(getattr(parent, name), f"{field}.{name}") if parent.HasField(name) else None


def _source(index: int, source: styleblend_pb2.Source, resolve: Images) -> PlannedSource:
    field = f"sources[{index}]"
    image = resolve(source, field)
    for name in ("style_weight", "content_weight"):
        if not source.HasField(name):
            raise InvalidArgument(f"{field}.{name} is missing")
    return PlannedSource(
        image=image,
        style_weight=_weight(source.style_weight, f"{field}.style_weight"),
        content_weight=_weight(source.content_weight, f"{field}.content_weight"),
        style_map=resolve.optional(source, "style_map", field),
        content_map=resolve.optional(source, "content_map", field),
    )


def _regions(
    regions: Sequence[styleblend_pb2.Region],
    sources: int | None,
    resolve: Images,
    limit: int,
) -> tuple[PlannedRegion, ...]:
    """`sources`: how many weights each region needs (None: checked when the update applies)."""
    if len(regions) > limit:
        raise ResourceExhausted(
            f"regions: {len(regions)} is over the limit of {limit} (STYLEBLEND_MAX_REGIONS)"
        )
    planned = []
    for k, region in enumerate(regions):
        field = f"regions[{k}]"
        if not region.HasField("mask"):
            raise InvalidArgument(f"{field}.mask is missing")
        if sources is not None and len(region.style_weights) != sources:
            raise InvalidArgument(
                f"{field}.style_weights: {len(region.style_weights)} weights for {sources} sources"
            )
        weights = tuple(
            _weight(w, f"{field}.style_weights[{i}]") for i, w in enumerate(region.style_weights)
        )
        planned.append(PlannedRegion(resolve(region.mask, f"{field}.mask"), weights))
    return tuple(planned)


def _check_region_weights(regions: Sequence[PlannedRegion], sources: int) -> None:
    for k, region in enumerate(regions):
        if len(region.style_weights) != sources:
            raise InvalidArgument(
                f"regions[{k}].style_weights: {len(region.style_weights)} weights for {sources} "
                "sources"
            )


def _check_blend(
    sources: Sequence[PlannedSource], regions: Sequence[PlannedRegion], preserve_color: str
) -> None:
    """What every plan, first or updated, must satisfy."""
    if regions and any(s.style_map is not None for s in sources):
        raise InvalidArgument("regions and per-source style maps cannot be combined; use one")
    styled = any(s.style_weight > 0 for s in sources) or any(
        sum(r.style_weights) > 0 for r in regions
    )
    if not styled and not any(s.content_weight > 0 for s in sources):
        raise InvalidArgument("every style_weight and content_weight is 0: nothing to blend")
    if preserve_color and not any(s.content_weight > 0 for s in sources):
        raise InvalidArgument(
            "preserve_color needs a source with a content_weight > 0 to take colours from"
        )


def _strength(value: float, field: str) -> float:
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise InvalidArgument(f"{field} must be within 0..1, got {value}")
    return value


def _check_fast(
    fast: FastPlan, sources: Sequence[PlannedSource], regions: Sequence[PlannedRegion]
) -> None:
    """Every source that brings style must be one of the network's styles."""
    names = ", ".join(style.name for style in fast.model.styles if style.sha256)
    for i, source in enumerate(sources):
        styled = source.style_weight > 0 or any(r.style_weights[i] > 0 for r in regions)
        if styled and fast.styles[i] < 0:
            raise FailedPrecondition(
                f"sources[{i}] brings style, but fast model {fast.model.name!r} was not trained "
                f"on that image (its styles: {names}); set its style weight to 0 or train it "
                "in with `python -m export.train_fast --add-style`"
            )
    if not any(s.content_weight > 0 for s in sources):
        raise InvalidArgument("fast: the network needs a source with a content_weight > 0")


def plan_fast(
    request: styleblend_pb2.FastOptions,
    sources: Sequence[PlannedSource],
    regions: Sequence[PlannedRegion],
    fast_models: Mapping[str, FastManifest],
    defaults: Defaults,
) -> FastPlan:
    model = fast_models.get(request.model)
    if model is None:
        known = ", ".join(sorted(fast_models)) or "none; train one with `make fast-model`"
        raise InvalidArgument(f"fast.model: no fast model {request.model!r} (there are: {known})")
    if model.identity is None:
        raise FailedPrecondition(f"fast model {model.name!r} has no identity style for strength")
    fast = FastPlan(
        model=model,
        identity=model.identity,
        styles=tuple(
            -1 if (style := model.style_for(s.image.sha256)) is None else style for s in sources
        ),
        strength=_strength(request.strength, "fast.strength") if request.HasField("strength")
        else defaults.strength,
        refine=request.refine,
    )  # fmt: skip
    _check_fast(fast, sources, regions)
    return fast


def _check_universal(sources: Sequence[PlannedSource]) -> None:
    if not any(s.content_weight > 0 for s in sources):
        raise InvalidArgument("universal: the method needs a source with a content_weight > 0")


def plan_universal(
    request: styleblend_pb2.UniversalOptions,
    sources: Sequence[PlannedSource],
    model: UniversalManifest | None,
    defaults: Defaults,
) -> UniversalPlan:
    if model is None:
        raise FailedPrecondition(
            "universal: the features service has no universal decoders; train them with "
            "`make universal-model` and restart it"
        )
    levels = tuple(request.levels) or model.levels_by_default
    for index, level in enumerate(levels):
        if level not in model.layers:
            raise InvalidArgument(
                f"universal.levels[{index}]: no decoder for {level!r} "
                f"(there are: {', '.join(model.layers)})"
            )
    if len(set(levels)) != len(levels):
        raise InvalidArgument(f"universal.levels: {list(levels)} names a level twice")
    _check_universal(sources)
    strength = (
        _strength(request.strength, "universal.strength")
        if request.HasField("strength")
        else defaults.strength
    )
    return UniversalPlan(model, levels, strength, request.refine)


def plan_scales(
    request: styleblend_pb2.BlendRequest,
    width: int,
    height: int,
    config: GatewayConfig,
    defaults: Defaults,
) -> tuple[Scale, ...]:
    """Sizes halve from the canvas down; iterations are given per scale or split evenly."""
    side = max(width, height)
    auto = 1 + max(0, math.ceil(math.log2(side / AUTO_SCALE_SIDE_PX)))
    count = _bounded(request.scales, auto, config.max_scales, "scales")
    sizes = [(round(width / 2**k), round(height / 2**k)) for k in reversed(range(count))]
    if min(sizes[0]) < MIN_SIDE_PX:
        raise InvalidArgument(
            f"scales: {count} scales make the coarsest {sizes[0][0]}×{sizes[0][1]}, "
            f"under {MIN_SIDE_PX} px; use fewer scales"
        )
    if request.iterations_per_scale:
        per_scale = list(request.iterations_per_scale)
        if len(per_scale) != count:
            raise InvalidArgument(
                f"iterations_per_scale: {len(per_scale)} entries for {count} scales"
            )
        if min(per_scale) < 1:
            raise InvalidArgument(f"iterations_per_scale: each must be >= 1, got {per_scale}")
        if sum(per_scale) > config.max_iterations:
            raise ResourceExhausted(
                f"iterations_per_scale: {sum(per_scale)} in all is over the limit of "
                f"{config.max_iterations}"
            )
    else:
        total = _bounded(
            request.iterations, defaults.iterations, config.max_iterations, "iterations"
        )
        if total < count:
            raise InvalidArgument(f"iterations: {total} cannot cover {count} scales")
        per_scale = [total // count] * count
        per_scale[-1] += total - sum(per_scale)
    return tuple(Scale(w, h, n) for (w, h), n in zip(sizes, per_scale, strict=True))


def plan_blend(
    request: styleblend_pb2.BlendRequest,
    manifest: Manifest,
    config: GatewayConfig,
    uploads: Uploads,
    fast_models: Mapping[str, FastManifest] | None = None,
    universal_model: UniversalManifest | None = None,
) -> Plan:
    count = len(request.sources)
    if count == 0:
        raise InvalidArgument("sources: at least one source is needed")
    if count > config.max_sources:
        raise ResourceExhausted(f"sources: {count} is over the limit of {config.max_sources}")
    defaults = request_defaults(manifest, config)
    resolve = Images(uploads, config)
    sources = tuple(_source(i, s, resolve) for i, s in enumerate(request.sources))
    regions = _regions(request.regions, count, resolve, config.max_regions)
    _enum(request.preserve_color, styleblend_pb2.PreserveColor, "preserve_color")
    preserve_color = PRESERVE_COLORS[request.preserve_color]
    _check_blend(sources, regions, preserve_color)
    if request.HasField("fast") and request.HasField("universal"):
        raise InvalidArgument("fast and universal: ask for one one-pass method, not both")

    side = _bounded(
        request.max_side_px, defaults.side_px, config.max_side_px, "max_side_px", MIN_SIDE_PX
    )
    canvas_index = max(range(count), key=lambda i: sources[i].content_weight)
    canvas_source = sources[canvas_index].image.header
    width, height = images.fit_inside(canvas_source.width, canvas_source.height, side)
    if min(width, height) < MIN_SIDE_PX:
        raise InvalidArgument(
            f"sources[{canvas_index}] sets the canvas: its image is "
            f"{canvas_source.width}×{canvas_source.height}, and max_side_px {side} makes a "
            f"{width}×{height} canvas for that aspect ratio; each side must be at least "
            f"{MIN_SIDE_PX}, so crop the image or raise max_side_px"
        )

    _enum(request.optimizer, styleblend_pb2.Optimizer, "optimizer")
    _enum(request.init, styleblend_pb2.Init, "init")
    init = INITS.get(request.init, defaults.init)
    init_image = None
    if init == "image":
        if not request.init_image:
            raise InvalidArgument("init_image is required when init is INIT_IMAGE")
        data = request.init_image
        header = images.check_decodes(data, "init_image", config.max_image_pixels)
        init_image = PlannedImage(data, images.sha256(data), header)
    elif request.init_image:
        raise InvalidArgument("init_image is set but init is not INIT_IMAGE")

    style_scale = request.style_scale if request.HasField("style_scale") else defaults.style_scale
    low, high = STYLE_SCALE_RANGE
    if not low <= style_scale <= high:
        raise InvalidArgument(f"style_scale must be within {low}..{high}, got {style_scale}")

    plan = Plan(
        sources=sources,
        regions=regions,
        scales=plan_scales(request, width, height, config, defaults),
        style_layers=_layers(request.style_layers, defaults.style_layers, manifest, "style_layers"),
        content_layers=_layers(
            request.content_layers, defaults.content_layers, manifest, "content_layers"
        ),
        optimizer=OPTIMIZERS.get(request.optimizer, defaults.optimizer),
        content_loss_weight=_optional(request, "content_loss_weight", defaults.content_loss_weight),
        style_loss_weight=_optional(request, "style_loss_weight", defaults.style_loss_weight),
        tv_loss_weight=_optional(request, "tv_loss_weight", defaults.tv_loss_weight),
        init=init,
        init_image=init_image,
        seed=request.seed if request.HasField("seed") else secrets.randbits(63),
        preview_every=request.preview_every or defaults.preview_every,
        learning_rate=_optional(
            request,
            "learning_rate",
            defaults.learning_rate,
            positive=True,
            largest=MAX_LEARNING_RATE,
        ),
        preserve_color=preserve_color,
        style_scale=style_scale,
        fast=plan_fast(request.fast, sources, regions, fast_models or {}, defaults)
        if request.HasField("fast")
        else None,
        universal=plan_universal(request.universal, sources, universal_model, defaults)
        if request.HasField("universal")
        else None,
    )
    check_extractions(plan, config)
    return plan


def _optional(
    message: Any,
    field: str,
    default: float,
    *,
    positive: bool = False,
    largest: float = MAX_WEIGHT,
) -> float:
    if not message.HasField(field):
        return default
    return _weight(getattr(message, field), field, positive=positive, largest=largest)


def check_extractions(plan: Plan, config: GatewayConfig) -> None:
    """Every image the features service will be asked for, at every scale, within its limits.

    Content is fitted to the canvas (cropped), so only the canvas can be over; a style image
    keeps its aspect ratio, and a long, thin one grows until its short side has MIN_SIDE_PX:
    a 2500×1 image would be extracted at 80000×32. That is refused here, naming the source.
    """
    if plan.fast is not None and not plan.fast.refine:
        return  # the network alone extracts nothing
    side_limit, pixel_limit = config.max_extract_side_px, config.max_extract_pixels
    canvas = plan.canvas
    if canvas.width * canvas.height > pixel_limit:
        raise ResourceExhausted(
            f"max_side_px: the {canvas.width}×{canvas.height} canvas has "
            f"{canvas.width * canvas.height:,} pixels, over the {pixel_limit:,} the features "
            "service extracts at most (STYLEBLEND_MAX_EXTRACT_PIXELS); lower max_side_px"
        )
    for index, source in enumerate(plan.sources):
        if not _brings_style(plan, index):
            continue
        header = source.image.header
        short, long = sorted((header.width, header.height))
        if math.ceil(MIN_SIDE_PX * long / short) > side_limit:
            width, height = plan.style_size(source, canvas)
            raise InvalidArgument(
                f"sources[{index}]: its {header.width}×{header.height} style image is too long "
                f"and thin to be seen: {MIN_SIDE_PX} px across (what the model needs) makes it "
                f"{width}×{height}, over the longest side of {side_limit} px the features "
                f"service extracts; its long side may be at most {side_limit // MIN_SIDE_PX} "
                "times its short side: crop the image, or set its style weight to 0"
            )
        for scale in plan.scales:
            width, height = plan.style_size(source, scale)
            if max(width, height) > side_limit or width * height > pixel_limit:
                raise ResourceExhausted(
                    f"sources[{index}]: style_scale {plan.style_scale:g} makes its "
                    f"{header.width}×{header.height} style image {width}×{height} = "
                    f"{width * height:,} pixels at the {scale.width}×{scale.height} scale, over "
                    f"the features service's limits of {pixel_limit:,} pixels and {side_limit} "
                    "px a side (STYLEBLEND_MAX_EXTRACT_PIXELS and _SIDE_PX); lower style_scale "
                    "or max_side_px"
                )


def _brings_style(plan: Plan, index: int) -> bool:
    return plan.sources[index].style_weight > 0 or any(
        region.style_weights[index] > 0 for region in plan.regions
    )


@dataclass(frozen=True)
class SourceChange:
    index: int
    # PlannedSource's fields that change, to their new values; a map set to None is cleared.
    changes: Mapping[str, float | PlannedImage | None]


@dataclass(frozen=True)
class Update:
    """A session update as the gateway holds it: checked, its images resolved and decoded."""

    update_id: int
    at_iteration: int = 0  # 0: as soon as possible
    sources: tuple[SourceChange, ...] = ()
    regions: tuple[PlannedRegion, ...] | None = None  # None: the regions stay
    loss_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)  # by Plan field
    fast_strength: float | None = None
    universal_strength: float | None = None


LOSS_WEIGHTS = ("content_loss_weight", "style_loss_weight", "tv_loss_weight")


def parse_update(
    message: styleblend_pb2.SessionUpdate, config: GatewayConfig, uploads: Uploads
) -> Update:
    """Every check an update allows on its own; what depends on the session is apply_update's."""
    resolve = Images(uploads, config)
    changes = []
    for change in message.sources:
        field = f"update.sources[{change.index}]"
        values: dict[str, float | PlannedImage | None] = {}
        for name in ("style_weight", "content_weight"):
            if change.HasField(name):
                values[name] = _weight(getattr(change, name), f"{field}.{name}")
        for name in ("style_map", "content_map"):
            if getattr(change, f"clear_{name}"):
                values[name] = None
            elif change.HasField(name):  # type: ignore[arg-type]
                values[name] = resolve(getattr(change, name), f"{field}.{name}")
        changes.append(SourceChange(change.index, values))
    regions = None
    if message.HasField("regions"):
        regions = _regions(message.regions.regions, None, resolve, config.max_regions)
    return Update(
        update_id=message.update_id,
        at_iteration=message.at_iteration,
        sources=tuple(changes),
        regions=regions,
        loss_weights={
            name: _weight(getattr(message, name), f"update.{name}")
            for name in LOSS_WEIGHTS
            if message.HasField(name)  # type: ignore[arg-type]
        },
        fast_strength=_strength(message.fast_strength, "update.fast_strength")
        if message.HasField("fast_strength")
        else None,
        universal_strength=_strength(message.universal_strength, "update.universal_strength")
        if message.HasField("universal_strength")
        else None,
    )


def apply_update(plan: Plan, update: Update, config: GatewayConfig) -> Plan:
    """The plan with a parsed update applied, checked as a new request would be."""
    sources = list(plan.sources)
    for change in update.sources:
        if change.index >= len(sources):
            raise InvalidArgument(
                f"update.sources[{change.index}]: no such source; the session has {len(sources)}"
            )
        changed = dataclasses.replace(sources[change.index], **change.changes)  # type: ignore[arg-type]
        sources[change.index] = changed
    regions = plan.regions
    if update.regions is not None:
        _check_region_weights(update.regions, len(sources))
        regions = update.regions
    _check_blend(sources, regions, plan.preserve_color)
    fast = plan.fast
    if update.fast_strength is not None:
        if fast is None:
            raise InvalidArgument("fast_strength: this session was not started with `fast`")
        fast = dataclasses.replace(fast, strength=update.fast_strength)
    if fast is not None:
        _check_fast(fast, sources, regions)
    universal = plan.universal
    if update.universal_strength is not None:
        if universal is None:
            raise InvalidArgument(
                "universal_strength: this session was not started with `universal`"
            )
        universal = dataclasses.replace(universal, strength=update.universal_strength)
    if universal is not None:
        _check_universal(sources)
    updated = dataclasses.replace(
        plan,
        fast=fast,
        universal=universal,
        sources=tuple(sources),
        regions=regions,
        **update.loss_weights,  # type: ignore[arg-type]
    )
    check_extractions(updated, config)  # a source that starts to bring style may be too thin
    return updated
