"""Blended targets from per-source features, weights and influence maps (DESIGN.md).

Style, per guidance channel k: G*ₖ = Σᵢ sₖᵢGᵢ / Σᵢ sₖᵢ, its loss scaled by Σᵢ sₖᵢ. Because
Σᵢ sᵢ‖G − Gᵢ‖² = (Σ sᵢ)‖G − G*‖² + const, one loss against G* is the weighted sum of the
per-source losses. Content, per feature pixel p: F*(p) = Σᵢ cᵢ(p)Fᵢ(p) / Σᵢ cᵢ(p), its loss
weighted by W(p) = Σᵢ cᵢ(p); without maps W is the constant Σ cᵢ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.common.errors import InvalidArgument
from services.common.guides import to_layer
from services.common.stylemix import Region, check_weight


@dataclass(frozen=True)
class SourceFeatures:
    grams: Mapping[str, np.ndarray]
    features: Mapping[str, np.ndarray]
    style_weight: float
    content_weight: float
    style_map: np.ndarray | None = None  # H×W in [0, 1] at the canvas
    content_map: np.ndarray | None = None
    means: Mapping[str, np.ndarray] = field(default_factory=dict)  # per layer (C,): universal path


@dataclass(frozen=True)
class StyleChannel:
    mask: np.ndarray | None  # None: everywhere
    grams: dict[str, np.ndarray]
    scale: float  # Σᵢ sₖᵢ
    # μ*ₖ = Σᵢ sₖᵢμᵢ / Σᵢ sₖᵢ, with the Grams' weights, where the sources carry means: with G*ₖ
    # it is the mean and second moment of the mixture of the sources' features (WCT).
    means: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Targets:
    channels: list[StyleChannel]  # empty: no style term
    features: dict[str, np.ndarray]  # F*; empty: no content term
    content_weights: dict[str, np.ndarray]  # W per content layer (h×w)


def weighted_mean(
    tensors: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], what: str
) -> dict[str, np.ndarray]:
    """Σ wᵢTᵢ / Σ wᵢ per layer over the entries with wᵢ > 0; all must have the same layers."""
    used = [(t, w) for t, w in zip(tensors, weights, strict=True) if w > 0]
    total = sum(w for _, w in used)
    layers = set(used[0][0])
    if not layers:
        raise InvalidArgument(f"{what}: the sources with a positive weight carry no layers")
    for index, (layer_tensors, _) in enumerate(used):
        if set(layer_tensors) != layers:
            raise InvalidArgument(
                f"{what}: source {index} has layers {sorted(layer_tensors)}, "
                f"expected {sorted(layers)}"
            )
    blended: dict[str, np.ndarray] = {}
    for layer in sorted(layers):
        shapes = {t[layer].shape for t, _ in used}
        if len(shapes) != 1:
            raise InvalidArgument(f"{what}[{layer}]: shapes differ: {sorted(shapes)}")
        acc = np.zeros(shapes.pop(), dtype=np.float64)
        for layer_tensors, weight in used:
            acc += weight * layer_tensors[layer]
        blended[layer] = (acc / total).astype(np.float32)
    return blended


def blended_means(
    sources: Sequence[SourceFeatures], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """μ* with the same weights as G*; empty unless every source weighed carries means."""
    used = [s for s, w in zip(sources, weights, strict=True) if w > 0]
    if not used or any(not s.means for s in used):
        return {}
    return weighted_mean([s.means for s in sources], weights, "means")


def style_channels(
    sources: Sequence[SourceFeatures], regions: Sequence[Region]
) -> list[StyleChannel]:
    """One channel for the sources without a map, one per mapped source, one per region."""
    grams = [s.grams for s in sources]
    if regions and any(s.style_map is not None for s in sources):
        raise InvalidArgument("regions and per-source style maps cannot be combined; use one")
    everywhere = [s.style_weight if s.style_map is None else 0.0 for s in sources]
    channels = []
    if sum(everywhere) > 0:
        channels.append(
            StyleChannel(
                None,
                weighted_mean(grams, everywhere, "grams"),
                sum(everywhere),
                blended_means(sources, everywhere),
            )
        )
    for source in sources:
        if source.style_map is not None and source.style_weight > 0:
            channels.append(
                StyleChannel(
                    source.style_map,
                    weighted_mean([source.grams], [1.0], "grams"),
                    source.style_weight,
                    blended_means([source], [1.0]),
                )
            )
    for k, region in enumerate(regions):
        if len(region.style_weights) != len(sources):
            raise InvalidArgument(
                f"regions[{k}].style_weights: {len(region.style_weights)} weights for "
                f"{len(sources)} sources"
            )
        weights = [
            check_weight(w, f"regions[{k}].style_weights[{i}]")
            for i, w in enumerate(region.style_weights)
        ]
        if sum(weights) > 0:
            channels.append(
                StyleChannel(
                    region.mask,
                    weighted_mean(grams, weights, "grams"),
                    sum(weights),
                    blended_means(sources, weights),
                )
            )
    return channels


def content_targets(
    sources: Sequence[SourceFeatures], strides: Mapping[str, int]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """F* and W per content layer, each source's content weighted per feature pixel."""
    used = [s for s in sources if s.content_weight > 0]
    if not used:
        return {}, {}
    layers = set(used[0].features)
    if not layers or any(set(s.features) != layers for s in used):
        raise InvalidArgument(
            f"features: the sources with a content weight carry layers "
            f"{[sorted(s.features) for s in used]}; they must all carry the same"
        )
    targets, weights = {}, {}
    for layer in sorted(layers):
        if layer not in strides:
            raise InvalidArgument(f"layer_strides: no stride for content layer {layer}")
        shapes = {s.features[layer].shape for s in used}
        if len(shapes) != 1:
            raise InvalidArgument(f"features[{layer}]: shapes differ: {sorted(shapes)}")
        _, height, width = shapes.pop()
        total = np.zeros((height, width), np.float64)
        acc = np.zeros(used[0].features[layer].shape, np.float64)
        for source in used:
            here = source.content_weight * (
                np.ones((height, width))
                if source.content_map is None
                else to_layer(source.content_map, height, width, strides[layer])
            )
            total += here
            acc += here * source.features[layer]
        targets[layer] = (acc / np.maximum(total, 1e-12)).astype(np.float32)
        weights[layer] = total.astype(np.float32)
    return targets, weights


def blend_targets(
    sources: Sequence[SourceFeatures],
    regions: Sequence[Region] = (),
    strides: Mapping[str, int] | None = None,
) -> Targets:
    if not sources:
        raise InvalidArgument("sources: at least one source is needed")
    for i, source in enumerate(sources):
        check_weight(source.style_weight, f"sources[{i}].style_weight")
        check_weight(source.content_weight, f"sources[{i}].content_weight")
    channels = style_channels(sources, regions)
    features, weights = content_targets(sources, strides or {})
    if not channels and not features:
        raise InvalidArgument("every style_weight and content_weight is 0: nothing to blend")
    return Targets(channels, features, weights)
