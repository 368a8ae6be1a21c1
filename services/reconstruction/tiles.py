"""Tiled reconstruction: the loss of a canvas too big for memory, one tile at a time.

The canvas is cut into tile *centres* that cover it once; each centre is evaluated inside a
*crop* that adds a margin of context, so the features under the centre are (nearly) the ones
the whole image would give. A tile's loss counts only its centre:

- style: the guided Gram of the centre (times the source's map) against the whole image's
  target G*, weighted by the centre's share of the map's mass, so the sum over tiles is the
  mass-weighted mean of local style errors;
- content: W·‖F − F*‖² over the centre, divided by the whole target's energy, so the sum over
  tiles is the whole image's content loss exactly (when the margin gives full context);
- total variation: the neighbour pairs that start in the centre, over the whole canvas's count.

Each tile's gradient is added into the canvas's gradient, so an optimiser sees one image and one
loss. The grid's offset changes every evaluation, so no seam stays in one place for long.
Centres and crops start on multiples of the deepest stride, so a crop's feature maps line up
with the whole image's (VGG's pooling floors; the crop's origin divides exactly).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.common.errors import InvalidArgument
from services.common.guides import to_layer
from services.reconstruction.objective import (
    FeatureNet,
    Losses,
    LossWeights,
    Objective,
    ScaleTargets,
    ShapeCache,
    StyleChannel,
)


@dataclass(frozen=True)
class Tiling:
    tile: int  # side of a tile's centre, px
    margin: int  # context on each side of a centre, px
    moving: bool = True  # a new grid offset every evaluation (False: cuts stay put)


@dataclass(frozen=True)
class Tile:
    crop: tuple[int, int, int, int]  # y0, y1, x0, x1 in the canvas
    centre: tuple[int, int, int, int]  # y0, y1, x0, x1 in the crop


def spans(length: int, size: int, offset: int) -> list[tuple[int, int]]:
    """[start, end) intervals of `size` covering 0..length once, the first cut at `offset`."""
    cuts = [0, *range(offset or size, length, size), length]
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def layout(
    height: int, width: int, tiling: Tiling, align: int, offset: tuple[int, int] = (0, 0)
) -> list[Tile]:
    """The tiles for a canvas; `tile`, `margin` and `offset` are rounded to `align`."""
    size = max(align, tiling.tile // align * align)
    margin = -(-tiling.margin // align) * align
    tiles = []
    for y0, y1 in spans(height, size, offset[0] // align * align % size):
        for x0, x1 in spans(width, size, offset[1] // align * align % size):
            top, left = max(0, y0 - margin), max(0, x0 - margin)
            crop = (top, min(height, y1 + margin), left, min(width, x1 + margin))
            tiles.append(Tile(crop, (y0 - top, y1 - top, x0 - left, x1 - left)))
    return tiles


class TiledObjective:
    """The Objective of a whole canvas, evaluated tile by tile (see the module's docstring)."""

    def __init__(
        self,
        net: FeatureNet,
        targets: ScaleTargets,
        weights: LossWeights,
        strides: Mapping[str, int],
        device: torch.device,
        tiling: Tiling,
        seed: int,
        shapes: ShapeCache | None = None,
    ) -> None:
        self.net, self.targets, self.weights = net, targets, weights
        self.strides, self.device, self.tiling = strides, device, tiling
        self.shapes: ShapeCache = {} if shapes is None else shapes
        layers = {n for c in targets.channels for n in c.grams} | set(targets.features)
        for name in layers:
            if name not in strides:
                raise InvalidArgument(f"unknown layer {name}; the model has {', '.join(strides)}")
        self.align = max((strides[n] for n in layers), default=1)
        self.random = np.random.default_rng(seed)
        self.masses = [
            float(c.mask.sum()) if c.mask is not None else float(targets.width * targets.height)
            for c in targets.channels
        ]
        self.energy = {
            n: float(np.square(f, dtype=np.float64).sum()) for n, f in targets.features.items()
        }

    def tiles(self, moving: bool) -> list[Tile]:
        """This evaluation's tiles: the grid moved by a random quarter of a tile when `moving`.

        Quarters, not any offset: the crops then come in a few sizes, whose feature shapes are
        probed once each instead of on every evaluation.
        """
        offset = (0, 0)
        if moving:
            quarter = max(self.align, self.tiling.tile) // 4
            offset = (
                quarter * int(self.random.integers(4)),
                quarter * int(self.random.integers(4)),
            )
        return layout(self.targets.height, self.targets.width, self.tiling, self.align, offset)

    def evaluate(self, image: torch.Tensor) -> tuple[torch.Tensor, Losses]:
        """The loss, with its gradient summed over tiles into `image.grad`."""
        if image.grad is None:
            image.grad = torch.zeros_like(image)
        total, parts = image.new_zeros(()), []
        for tile, objective, tv in self._pieces(self.tiles(self.tiling.moving)):
            y0, y1, x0, x1 = tile.crop
            piece = image.detach()[..., y0:y1, x0:x1].requires_grad_(True)
            loss, losses = objective(piece)
            smooth = self.weights.tv * tv(piece)
            (loss + smooth).backward()
            assert piece.grad is not None
            image.grad[..., y0:y1, x0:x1] += piece.grad
            total = total + loss.detach() + smooth.detach()
            parts.append(Losses(losses.content, losses.style, float(smooth.detach())))
        return total, summed(parts)

    def measure(self, image: torch.Tensor) -> Losses:
        parts = []
        with torch.no_grad():
            for tile, objective, tv in self._pieces(self.tiles(moving=False)):
                y0, y1, x0, x1 = tile.crop
                piece = image.detach()[..., y0:y1, x0:x1]
                losses = objective(piece)[1]
                parts.append(
                    Losses(losses.content, losses.style, self.weights.tv * float(tv(piece)))
                )
        return summed(parts)

    def _pieces(self, tiles: Sequence[Tile]) -> Iterator[tuple[Tile, Objective, TileTV]]:
        for tile in tiles:
            targets = self._crop(tile)
            no_tv = dataclasses.replace(self.weights, tv=0.0)
            objective = Objective(self.net, targets, no_tv, self.strides, self.device, self.shapes)
            yield tile, objective, TileTV(tile, self.targets.height, self.targets.width)

    def _crop(self, tile: Tile) -> ScaleTargets:
        """The whole canvas's targets as one crop's Objective needs them."""
        y0, y1, x0, x1 = tile.crop
        cy0, cy1, cx0, cx1 = tile.centre
        centre = np.zeros((y1 - y0, x1 - x0), np.float32)
        centre[cy0:cy1, cx0:cx1] = 1
        channels = []
        for channel, mass in zip(self.targets.channels, self.masses, strict=True):
            mask = centre if channel.mask is None else channel.mask[y0:y1, x0:x1] * centre
            share = float(mask.sum()) / mass if mass > 0 else 0.0
            if share > 0:
                channels.append(StyleChannel(mask, channel.grams, channel.scale * share))
        features, weights = {}, {}
        for name, target in self.targets.features.items():
            stride = self.strides[name]
            height = min(-(-(y1 - y0) // stride), target.shape[1] - y0 // stride)
            width = min(-(-(x1 - x0) // stride), target.shape[2] - x0 // stride)
            crop = np.s_[y0 // stride : y0 // stride + height, x0 // stride : x0 // stride + width]
            features[name] = target[:, crop[0], crop[1]]
            owned = to_layer(centre, height, width, stride)
            # Objective divides by the crop's energy; this makes it the whole target's.
            whole = self.energy[name]
            scale = energy(features[name]) / whole if whole > 0 else 0.0
            weights[name] = self.targets.content_weights[name][crop] * owned * scale
        return dataclasses.replace(
            self.targets,
            width=x1 - x0,
            height=y1 - y0,
            channels=channels,
            features=features,
            content_weights=weights,
        )


class TileTV:
    """Total variation of the neighbour pairs that start in a tile's centre, as a share of the
    whole canvas's mean (so the tiles' terms add up to the canvas's)."""

    def __init__(self, tile: Tile, height: int, width: int) -> None:
        self.centre = tile.centre
        self.height, self.width = height, width

    def __call__(self, piece: torch.Tensor) -> torch.Tensor:
        cy0, cy1, cx0, cx1 = self.centre
        rows, columns = piece.shape[-2:]
        channels = piece.shape[1]
        below, after = min(cy1, rows - 1), min(cx1, columns - 1)  # pairs need a second pixel
        down = piece[..., cy0 + 1 : below + 1, cx0:cx1] - piece[..., cy0:below, cx0:cx1]
        right = piece[..., cy0:cy1, cx0 + 1 : after + 1] - piece[..., cy0:cy1, cx0:after]
        pairs_down = channels * (self.height - 1) * self.width
        pairs_right = channels * self.height * (self.width - 1)
        return down.pow(2).sum() / max(pairs_down, 1) + right.pow(2).sum() / max(pairs_right, 1)


def energy(array: np.ndarray) -> float:
    return float(np.square(array, dtype=np.float64).sum())


def summed(parts: Sequence[Losses]) -> Losses:
    return Losses(
        sum(p.content for p in parts), sum(p.style for p in parts), sum(p.tv for p in parts)
    )
