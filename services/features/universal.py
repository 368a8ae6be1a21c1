"""The universal method (WCT, Li et al. 2017): any blend of styles in one pass, none trained for.

Each level whitens the content's features at one encoder layer and colours them with the style's
statistics, and a decoder trained only to invert that layer turns them back into an image; the
levels run deepest first, each encoding the image the one before decoded.

The blend is the iterative path's (blending/core.py): per guidance channel the weighted mean G*
of the sources' uncentred Grams and, with the same weights, μ* of their feature means. Those
are the second moment and mean of the mixture of the sources' feature distributions, so the
mixture's covariance is C* = G* − μ*μ*ᵀ: the channel colours with μ* and C*. Where Li et al.
blend two styles by interpolating the coloured features, this colours with the mixture's
moments, so N sources, regions and style maps mean what they mean on the iterative path.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from cachetools import LRUCache
from threadpoolctl import threadpool_limits

from services.blending.core import SourceFeatures, content_targets, style_channels
from services.common import colour
from services.common.config import EXTRACT_PIXELS, EXTRACT_SIDE_PX
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.guides import to_layer
from services.common.heap import malloc_trim
from services.common.manifest import MIN_SIDE_PX, Manifest
from services.common.stylemix import Region, check_weight
from services.common.universalmodel import DECODER_INPUT, DECODER_OUTPUT, UniversalManifest
from services.features.core import check_run_size, cut_to, gram

PRESERVE_COLORS = ("", "luminance", "match")
STATISTICS_KEPT = 32  # style images whose statistics are kept: a slider move runs no encoder
FLOAT32_EPS = float(np.finfo(np.float32).eps)

Statistics = dict[str, tuple[np.ndarray, np.ndarray]]  # layer -> (mean C, Gram C×C)


# --- The transform, in feature space ------------------------------------------------------------


def eigen_floor(values: np.ndarray) -> float:
    """The smallest eigenvalue a covariance of float32 features resolves: C·ε₃₂·λ_max.

    Features and Grams are float32, so each of the C×C entries carries a rounding error up to
    about ε₃₂ times the largest entry (≤ λ_max); by Weyl's inequality that moves every
    eigenvalue by up to the error's norm, ≤ C·ε₃₂·λ_max. Below it an eigenvalue is rounding
    noise, and whitening would scale that noise by λ^-½.
    """
    return len(values) * FLOAT32_EPS * max(float(values.max()), 0.0)


def whitening(covariance: np.ndarray) -> np.ndarray:
    """Σ^-½ (C×C, float64), the eigenvalues floored at `eigen_floor`."""
    values, vectors = np.linalg.eigh(covariance.astype(np.float64))
    floor = max(eigen_floor(values), np.finfo(np.float64).tiny)
    result: np.ndarray = (vectors * np.maximum(values, floor) ** -0.5) @ vectors.T
    return result


def colouring(covariance: np.ndarray) -> np.ndarray:
    """Σ^½ (C×C, float64); rounding can leave eigenvalues a little below 0, taken as 0."""
    values, vectors = np.linalg.eigh(covariance.astype(np.float64))
    result: np.ndarray = (vectors * np.sqrt(np.maximum(values, 0.0))) @ vectors.T
    return result


def mixture_covariance(mean: np.ndarray, second_moment: np.ndarray) -> np.ndarray:
    """C* = G* − μ*μ*ᵀ, in float64."""
    mu = mean.astype(np.float64)
    result: np.ndarray = second_moment.astype(np.float64) - np.outer(mu, mu)
    return result


CHUNK_PIXELS = 1 << 16  # float64 working copies of one chunk: 64 Ki pixels × C × 8 bytes


def _chunks(pixels: int) -> Iterator[slice]:
    """The feature map in column blocks, so no float64 copy of the whole of it is ever made:
    at 2048 px relu1_1's is 2 GiB."""
    for start in range(0, pixels, CHUNK_PIXELS):
        yield slice(start, min(start + CHUNK_PIXELS, pixels))


def masked_moments(
    features: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean (C) and covariance (C×C), float64, of C×h×w features, each pixel weighed (h×w).

    Both are accumulated in float64 a block at a time: the weighted second moment and mean,
    then Σ = E[ffᵀ] − μμᵀ. In float64 the cancellation costs ~1e-16 of E[ffᵀ], far under the
    float32 features' own rounding."""
    flat = features.reshape(features.shape[0], -1)
    w = None if weights is None else weights.reshape(-1).astype(np.float64)
    total = float(flat.shape[1]) if w is None else float(w.sum())
    first = np.zeros(flat.shape[0])
    second = np.zeros((flat.shape[0], flat.shape[0]))
    for block in _chunks(flat.shape[1]):
        part = flat[:, block].astype(np.float64)
        weighed = part if w is None else part * w[block]
        first += weighed.sum(axis=1)
        second += weighed @ part.T
    mean = first / total
    return mean, second / total - np.outer(mean, mean)


@dataclass(frozen=True)
class ChannelTarget:
    """One guidance channel at one layer: where it acts, and the statistics it colours with."""

    influence: np.ndarray | None  # h×w: scaleₖ·maskₖ at the layer; None: scaleₖ everywhere
    mean: np.ndarray  # μ*ₖ (C)
    gram: np.ndarray  # G*ₖ (C×C)
    scale: float = 1.0  # used where influence is None


def colour_features(features: np.ndarray, target: ChannelTarget) -> np.ndarray:
    """Every pixel whitened with the content's statistics under the channel's mask and coloured
    with the channel's: f' = C*^½ Σ^-½ (f − μ) + μ*, computed in float64, kept as float32."""
    mean, covariance = masked_moments(features, target.influence)
    transfer = colouring(mixture_covariance(target.mean, target.gram)) @ whitening(covariance)
    offset = target.mean.astype(np.float64) - transfer @ mean
    flat = features.reshape(features.shape[0], -1)
    coloured = np.empty(flat.shape, np.float32)  # float64 a block at a time, kept as float32
    for block in _chunks(flat.shape[1]):
        coloured[:, block] = transfer @ flat[:, block].astype(np.float64) + offset[:, None]
    return coloured.reshape(features.shape)


def transform_channels(
    features: np.ndarray, targets: Sequence[ChannelTarget], strength: float
) -> np.ndarray:
    """out(p) = Σₖ wₖ(p)·colourₖ(p) / Σₖ wₖ(p), the content's features where Σₖ wₖ(p) = 0,
    then α·out + (1 − α)·content; C×h×w float32."""
    _, height, width = features.shape
    total = np.zeros((height, width), np.float32)
    styled: np.ndarray | None = None
    for target in targets:
        influence = (
            np.full((height, width), target.scale)
            if target.influence is None
            else target.influence.astype(np.float32)
        )
        if not np.any(influence > 0):
            continue  # this channel paints nothing at this layer
        coloured = colour_features(features, target)
        if len(targets) > 1 or target.influence is not None:
            coloured *= influence
            total += influence
        else:  # one channel everywhere: its weight divides out
            total += 1.0
        styled = coloured if styled is None else styled + coloured
    if styled is None:
        return features.astype(np.float32, copy=True)
    painted = total > 0
    np.divide(styled, total, out=styled, where=painted)
    styled[:, ~painted] = features[:, ~painted]
    if strength < 1:
        styled *= np.float32(strength)
        styled += np.float32(1 - strength) * features
    return styled.astype(np.float32, copy=False)


# --- Sources and the styliser -------------------------------------------------------------------


@dataclass(frozen=True)
class ContentSource:
    pixels: np.ndarray  # H×W×3 float32 RGB in [0, 1], at the output size
    content_weight: float
    content_map: np.ndarray | None = None  # H×W in [0, 1]


@dataclass(frozen=True)
class UniversalStyle:
    statistics: Statistics  # from UniversalStyliser.statistics, at least at the levels run
    style_weight: float
    style_map: np.ndarray | None = None  # H×W in [0, 1] at the output size


@dataclass(frozen=True)
class Stylised:
    pixels: np.ndarray  # H×W×3 float32 RGB in [0, 1]
    seconds: dict[str, float] = field(default_factory=dict)  # "encode", "transform", "decode"


def prepare_style(pixels: np.ndarray, reference: np.ndarray, preserve_colors: str) -> np.ndarray:
    """A style image as the iterative path takes its statistics: for "luminance" its luminance
    matched to the reference's, for "match" its colours moved onto the reference's. The
    reference is the content (`content_pixels`); the statistics' key must name the transform."""
    check_preserve_colors(preserve_colors)
    if preserve_colors == "luminance":
        return colour.luminance(pixels, reference)
    if preserve_colors == "match":
        return colour.match_colour(pixels, reference)
    return pixels


def content_pixels(contents: Sequence[ContentSource]) -> np.ndarray:
    """The contents blended in pixels by their weights and maps: the colours "luminance" keeps
    and the reference "match" moves the styles' colours to."""
    total = np.zeros(contents[0].pixels.shape[:2])
    acc = np.zeros(contents[0].pixels.shape)
    for source in contents:
        here = source.content_weight * (
            np.ones(total.shape) if source.content_map is None else source.content_map
        )
        total += here
        acc += here[..., None] * source.pixels
    return (acc / np.maximum(total, 1e-12)[..., None]).astype(np.float32)


def check_preserve_colors(preserve_colors: str) -> None:
    if preserve_colors not in PRESERVE_COLORS:
        raise InvalidArgument(
            f"preserve_colors: {preserve_colors!r} is not one of {PRESERVE_COLORS}"
        )


class UniversalStyliser:
    """The encoder cut at each decoder's layer and the decoders, on ONNX Runtime."""

    def __init__(
        self,
        model_dir: Path,
        universal_dir: Path,
        intra_op_threads: int = 0,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        *,
        max_side_px: int = EXTRACT_SIDE_PX,
        max_pixels: int = EXTRACT_PIXELS,
    ) -> None:
        self.manifest = Manifest.load(model_dir)
        self.universal = UniversalManifest.load(universal_dir)
        if self.universal.feature_weights_sha256 != self.manifest.weights_sha256:
            raise FailedPrecondition(
                f"universal model {self.universal.name}: its decoders were trained against "
                f"{self.universal.feature_model} weights "
                f"{self.universal.feature_weights_sha256[:12]}…, but {model_dir} holds "
                f"{self.manifest.model} weights "
                f"{self.manifest.weights_sha256[:12]}…; train or export them again"
            )
        unknown = [name for name in self.universal.layers if name not in self.manifest.layer_names]
        if not self.universal.decoders or unknown:
            raise FailedPrecondition(
                f"universal model {self.universal.name}: decoders for {list(self.universal.layers)}"
                f", of which {self.manifest.model} lacks {unknown}"
            )
        self.max_side_px, self.max_pixels = max_side_px, max_pixels
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # No CPU arena: it would keep the high-water mark of every size run (features/core.py).
        options.enable_cpu_mem_arena = False
        chosen = list(providers)
        encoder = onnx.load(str(model_dir / self.manifest.onnx_file))
        name = self.manifest.input_name

        def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
            source = str(model) if isinstance(model, Path) else model.SerializeToString()
            return ort.InferenceSession(source, sess_options=options, providers=chosen)

        self._encoders = {layer: session(cut_to(encoder, name, [layer])) for layer in self.layers}
        self._statistics_encoder = session(cut_to(encoder, name, sorted(self.layers)))
        self._decoders = {
            d.layer: session(universal_dir / d.onnx_file) for d in self.universal.decoders
        }
        del encoder
        self._statistics: LRUCache[str, Statistics] = LRUCache(maxsize=STATISTICS_KEPT)
        self._lock = threading.Lock()
        self.encoder_runs = 0  # for tests: a cached style runs nothing

    @property
    def layers(self) -> tuple[str, ...]:
        """The levels, coarse to fine: the order the method applies them."""
        return self.universal.layers

    def stride(self, layer: str) -> int:
        return self.manifest.layer(layer).stride

    def check_size(self, width: int, height: int, field: str) -> None:
        if min(width, height) < MIN_SIDE_PX:
            raise InvalidArgument(
                f"{field}: size {width}×{height}: each side must be at least {MIN_SIDE_PX} px"
            )
        check_run_size(width, height, self.max_side_px, self.max_pixels)

    def kept(self, key: str) -> Statistics | None:
        """The statistics kept under `key` (an image's sha256, size and colour transform)."""
        with self._lock:
            return self._statistics.get(key)

    def keep(self, key: str, statistics: Statistics) -> None:
        """Keep a style image's statistics, once the request that took them has succeeded: a
        slider move then runs no encoder on the paintings, and a refused request keeps none."""
        with self._lock:
            self._statistics[key] = statistics

    def statistics(self, pixels: np.ndarray) -> Statistics:
        """Mean and Gram (the iterative path's G = F Fᵀ / HW) of a style image at every level,
        from one encoder run."""
        check_pixels(pixels, "style pixels")
        self.check_size(pixels.shape[1], pixels.shape[0], "style pixels")
        layers = sorted(self.layers)
        outputs = self._statistics_encoder.run(layers, {self.manifest.input_name: to_batch(pixels)})
        result = {
            layer: (
                output[0].mean(axis=(1, 2), dtype=np.float64).astype(np.float32),
                gram(output[0]),
            )
            for layer, output in zip(layers, outputs, strict=True)
        }
        del outputs
        malloc_trim()
        with self._lock:
            self.encoder_runs += 1
        return result

    def stylise(
        self,
        contents: Sequence[ContentSource],
        styles: Sequence[UniversalStyle],
        regions: Sequence[Region] = (),
        strength: float = 1.0,
        preserve_colors: str = "",
        levels: Sequence[str] | None = None,
    ) -> Stylised:
        """The contents' blend in the styles' blend, H×W×3 at the contents' size.

        "luminance" runs on the contents' luminance and gives the output the contents' colours;
        "match" changes nothing here: it is in the statistics (`prepare_style`)."""
        run = self._check(contents, styles, regions, strength, preserve_colors, levels)
        height, width = contents[0].pixels.shape[:2]
        multiple = max(self.stride(layer) for layer in run)
        # The encoder's pooling drops a partial block, so a side is padded by reflection up to
        # the deepest stride and the result cropped back: the output keeps the exact size.
        pad = ((0, -height % multiple), (0, -width % multiple))
        reference = content_pixels(contents)

        def padded(mask: np.ndarray | None) -> np.ndarray | None:
            return None if mask is None else np.pad(mask, pad, mode="edge")

        def canvas(pixels: np.ndarray) -> np.ndarray:
            if preserve_colors == "luminance":
                pixels = colour.luminance(pixels)
            return np.pad(pixels, (*pad, (0, 0)), mode="reflect")

        sources = [
            SourceFeatures({layer: s[1] for layer, s in style.statistics.items()}, {},
                           style.style_weight, 0.0, padded(style.style_map),
                           means={layer: s[0] for layer, s in style.statistics.items()})
            for style in styles
        ]  # fmt: skip
        channels = style_channels(
            sources, [Region(np.pad(r.mask, pad, mode="edge"), r.style_weights) for r in regions]
        )
        seconds = {"encode": 0.0, "transform": 0.0, "decode": 0.0}
        clock = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[phase] += now - clock
            clock = now

        first = run[0]
        blended, _ = content_targets(
            [
                SourceFeatures({}, {first: self._encode(first, canvas(c.pixels))}, 0.0,
                               c.content_weight, content_map=padded(c.content_map))
                for c in contents if c.content_weight > 0
            ],
            self.manifest.strides,
        )  # fmt: skip
        features = blended[first]
        image: np.ndarray | None = None
        for layer in run:
            if image is not None:
                features = self._encode(layer, image)
            lap("encode")
            _, h, w = features.shape
            stride = self.stride(layer)
            targets = [
                ChannelTarget(
                    None if c.mask is None else c.scale * to_layer(c.mask, h, w, stride),
                    c.means[layer], c.grams[layer], c.scale,
                )
                for c in channels
            ]  # fmt: skip
            with threadpool_limits(1, user_api="blas"):  # C×C work: threads only contend
                features = transform_channels(features, targets, strength)
            lap("transform")
            image = self._decode(layer, features, (height + pad[0][1], width + pad[1][1]))
            lap("decode")
        assert image is not None
        malloc_trim()
        pixels = image[:height, :width]
        if preserve_colors == "luminance":
            pixels = colour.with_chrominance(colour.luminance(pixels), reference)
        return Stylised(np.ascontiguousarray(pixels, np.float32), seconds)

    def _encode(self, layer: str, pixels: np.ndarray) -> np.ndarray:
        (out,) = self._encoders[layer].run([layer], {self.manifest.input_name: to_batch(pixels)})
        with self._lock:
            self.encoder_runs += 1
        result: np.ndarray = out[0]
        return result

    def _decode(self, layer: str, features: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        (out,) = self._decoders[layer].run([DECODER_OUTPUT], {DECODER_INPUT: features[None]})
        if out.shape[2:] != size:
            raise FailedPrecondition(
                f"universal decoder {layer}: features {features.shape[1:]} gave an image of "
                f"{out.shape[2:]}, expected {size} (stride {self.stride(layer)})"
            )
        result: np.ndarray = np.clip(out[0].transpose(1, 2, 0), 0.0, 1.0)
        return result

    def _check(
        self,
        contents: Sequence[ContentSource],
        styles: Sequence[UniversalStyle],
        regions: Sequence[Region],
        strength: float,
        preserve_colors: str,
        levels: Sequence[str] | None,
    ) -> list[str]:
        """The levels to run, coarse to fine, once every input has been checked."""
        if not math.isfinite(strength) or not 0 <= strength <= 1:
            raise InvalidArgument(f"strength must be within 0..1, got {strength}")
        check_preserve_colors(preserve_colors)
        wanted = list(self.universal.levels_by_default if levels is None else levels)
        unknown = [layer for layer in wanted if layer not in self.layers]
        if unknown or not wanted:
            raise InvalidArgument(
                f"levels: unknown level(s) {', '.join(unknown) or '(none given)'}; "
                f"the decoders of {self.universal.name} invert {', '.join(self.layers)}"
            )
        run = [layer for layer in self.layers if layer in wanted]
        if not contents:
            raise InvalidArgument("contents: at least one content image is needed")
        for i, content in enumerate(contents):
            check_weight(content.content_weight, f"contents[{i}].content_weight")
            check_pixels(content.pixels, f"contents[{i}].pixels")
        if not any(c.content_weight > 0 for c in contents):
            raise InvalidArgument("contents: at least one content_weight must be > 0")
        height, width = contents[0].pixels.shape[:2]
        for i, content in enumerate(contents):
            if content.pixels.shape[:2] != (height, width):
                raise InvalidArgument(
                    f"contents[{i}].pixels: {content.pixels.shape[1]}×{content.pixels.shape[0]}"
                    f", but contents[0] is {width}×{height}: all must be at the output size"
                )
        self.check_size(width, height, "contents")
        maps = [(c.content_map, f"contents[{i}].content_map") for i, c in enumerate(contents)]
        maps += [(s.style_map, f"styles[{i}].style_map") for i, s in enumerate(styles)]
        maps += [(r.mask, f"regions[{k}].mask") for k, r in enumerate(regions)]
        for mask, name in maps:
            check_map(mask, (height, width), name)
        for i, style in enumerate(styles):
            check_weight(style.style_weight, f"styles[{i}].style_weight")
            if not brings_style(i, style.style_weight, regions):
                continue  # its statistics are never used: the caller need not take them
            missing = [layer for layer in run if layer not in style.statistics]
            if missing:
                raise InvalidArgument(f"styles[{i}].statistics: no statistics for {missing}")
            for layer in run:
                mean, second = style.statistics[layer]
                channels = self.manifest.layer(layer).channels
                if mean.shape != (channels,) or second.shape != (channels, channels):
                    raise InvalidArgument(
                        f"styles[{i}].statistics[{layer}]: shapes {mean.shape} and "
                        f"{second.shape}, expected ({channels},) and ({channels}, {channels})"
                    )
        return run


def brings_style(index: int, style_weight: float, regions: Sequence[Region]) -> bool:
    """Whether source `index` has a style weight anywhere: its own, or in a region."""
    return style_weight > 0 or any(
        index < len(r.style_weights) and r.style_weights[index] > 0 for r in regions
    )


def check_pixels(pixels: np.ndarray, field: str) -> None:
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidArgument(f"{field}: an image must be H×W×3, got shape {pixels.shape}")
    if not np.all(np.isfinite(pixels)):
        raise InvalidArgument(f"{field}: pixels must be finite")


def check_map(mask: np.ndarray | None, shape: tuple[int, int], field: str) -> None:
    if mask is None:
        return
    if mask.shape != shape:
        raise InvalidArgument(
            f"{field}: shape {mask.shape}, but the output is {shape[0]}×{shape[1]} (H×W)"
        )
    if not np.all(np.isfinite(mask)) or mask.min() < 0 or mask.max() > 1:
        raise InvalidArgument(f"{field}: values must be within 0..1")


def to_batch(pixels: np.ndarray) -> np.ndarray:
    """H×W×3 → 1×3×H×W float32: the export normalises its input itself (manifest.json)."""
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None], np.float32)
