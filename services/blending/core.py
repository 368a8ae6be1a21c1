"""Blended targets: G* = Σ sᵢGᵢ / Σ sᵢ per style layer and F* = Σ cᵢFᵢ / Σ cᵢ per content layer.

Σᵢ sᵢ‖G − Gᵢ‖² = (Σ sᵢ)‖G − G*‖² + const, so one loss against G* scaled by Σ sᵢ is the
weighted sum of the per-source losses (DESIGN.md); likewise for content.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument


@dataclass(frozen=True)
class SourceFeatures:
    grams: Mapping[str, np.ndarray]
    features: Mapping[str, np.ndarray]
    style_weight: float
    content_weight: float


@dataclass(frozen=True)
class Targets:
    grams: dict[str, np.ndarray]  # empty when style_scale is 0
    features: dict[str, np.ndarray]  # empty when content_scale is 0
    style_scale: float  # Σ sᵢ
    content_scale: float  # Σ cᵢ


def check_weight(value: float, field: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{field} must be a finite number >= 0, got {value}")
    return value


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
            raise InvalidArgument(
                f"{what}[{layer}]: shapes differ between sources: {sorted(shapes)}"
            )
        acc = np.zeros(shapes.pop(), dtype=np.float64)
        for layer_tensors, weight in used:
            acc += weight * layer_tensors[layer]
        blended[layer] = (acc / total).astype(np.float32)
    return blended


def blend_targets(sources: Sequence[SourceFeatures]) -> Targets:
    if not sources:
        raise InvalidArgument("sources: at least one source is needed")
    style = [
        check_weight(s.style_weight, f"sources[{i}].style_weight") for i, s in enumerate(sources)
    ]
    content = [
        check_weight(s.content_weight, f"sources[{i}].content_weight")
        for i, s in enumerate(sources)
    ]
    if sum(style) == 0 and sum(content) == 0:
        raise InvalidArgument("every style_weight and content_weight is 0: nothing to blend")
    grams = weighted_mean([s.grams for s in sources], style, "grams") if sum(style) else {}
    features = (
        weighted_mean([s.features for s in sources], content, "features") if sum(content) else {}
    )
    return Targets(grams, features, float(sum(style)), float(sum(content)))
