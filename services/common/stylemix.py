"""Style weights: each source's, a region's, and a feed-forward network's style mix from them.

Pure numpy, shared by the blending service (which mixes for the gateway) and `styleblend video`
(which mixes on this machine).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument


def check_weight(value: float, field: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{field} must be a finite number >= 0, got {value}")
    return value


@dataclass(frozen=True)
class Region:
    mask: np.ndarray  # H×W in [0, 1] at the canvas
    style_weights: Sequence[float]  # one per source


@dataclass(frozen=True)
class StyleSource:
    style: int  # the network's style for this source; -1: none
    style_weight: float
    style_map: np.ndarray | None = None  # H×W in [0, 1] at the output size


def mix_styles(
    sources: Sequence[StyleSource],
    regions: Sequence[Region],
    styles: int,
    identity: int | None,
    strength: float,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """A feed-forward network's style mix: N weights, or N×H×W where maps or regions vary it.

    Each source's weight at a pixel is its own weight (times its map, if it has one) plus its
    weight in every region covering the pixel, as the iterative path's channels add up. Where
    no source has weight the mix is the identity style; strength then mixes in the identity.
    A network without one (`identity` None) takes only strength 1 and a style everywhere.
    `size` (width, height) is the output's, needed only where maps or regions vary the mix.
    """
    if identity is not None and not 0 <= identity < styles:
        raise InvalidArgument(f"identity: {identity} is not one of the {styles} styles")
    if not math.isfinite(strength) or not 0 <= strength <= 1:
        raise InvalidArgument(f"strength must be within 0..1, got {strength}")
    for i, source in enumerate(sources):
        check_weight(source.style_weight, f"sources[{i}].style_weight")
        if source.style >= styles or source.style < -1:
            raise InvalidArgument(f"sources[{i}].style: {source.style} is not one of {styles}")
    shape: tuple[int, ...] = ()  # N weights; (height, width) where maps or regions vary them
    if any(s.style_map is not None for s in sources) or regions:
        if size is None:
            raise ValueError("a mix that maps or regions vary needs the output's size")
        shape = (size[1], size[0])
    weights: list[np.ndarray] = [
        source.style_weight * (source.style_map if source.style_map is not None else np.ones(shape))
        for source in sources
    ]
    for k, region in enumerate(regions):
        if len(region.style_weights) != len(sources):
            raise InvalidArgument(
                f"regions[{k}].style_weights: {len(region.style_weights)} weights for "
                f"{len(sources)} sources"
            )
        for i, weight in enumerate(region.style_weights):
            weights[i] = (
                weights[i] + check_weight(weight, f"regions[{k}].style_weights[{i}]") * region.mask
            )
    for i, source in enumerate(sources):
        if source.style < 0 and np.any(weights[i] > 0):
            raise InvalidArgument(f"sources[{i}] has a style weight but no style in the network")
    mix = np.zeros((styles, *shape), np.float64)
    for source, here in zip(sources, weights, strict=True):
        if source.style >= 0:
            mix[source.style] += here
    total = mix.sum(axis=0)
    if identity is None and (strength < 1 or np.any(total <= 0)):
        raise InvalidArgument(
            "the network has no identity style: give strength 1 and a style weight everywhere"
        )
    mix = np.divide(mix, total, out=np.zeros_like(mix), where=total > 0)
    if identity is None:
        return mix.astype(np.float32)
    mix[identity] += np.where(total > 0, 0.0, 1.0)  # no style here: the content as it is
    mix *= strength
    mix[identity] += 1 - strength
    return mix.astype(np.float32)
