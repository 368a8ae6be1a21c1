"""Tiled reconstruction: the tiles cover the canvas once, add up to the whole objective where
the formulas say they must, and a tiled run optimises like a whole one."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from export.onnx_export import relative_error
from services.reconstruction import core
from services.reconstruction.tiles import TiledObjective, Tiling, layout
from tests.reconstruction.test_core import (
    CPU,
    STRIDES,
    job_for,
    pixels_of,
    result_of,
    run,
    scale_for,
)


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    from export.models import build_feature_net

    return build_feature_net("vgg19")[0]


@pytest.mark.parametrize(
    ("height", "width", "tile", "margin", "offset"),
    [(64, 64, 32, 16, (0, 0)), (100, 75, 48, 20, (17, 40)), (33, 129, 64, 0, (63, 5))],
)
def test_centres_cover_the_canvas_once_on_aligned_crops(
    height: int, width: int, tile: int, margin: int, offset: tuple[int, int]
) -> None:
    covered = np.zeros((height, width), int)
    for piece in layout(height, width, Tiling(tile, margin), align=16, offset=offset):
        y0, y1, x0, x1 = piece.crop
        cy0, cy1, cx0, cx1 = piece.centre
        assert y0 % 16 == 0 and x0 % 16 == 0  # the crop's feature maps line up with the canvas's
        assert 0 <= cy0 < cy1 <= y1 - y0 and 0 <= cx0 < cx1 <= x1 - x0
        covered[y0 + cy0 : y0 + cy1, x0 + cx0 : x0 + cx1] += 1
        assert cy0 <= margin + 15 and (y1 - y0) - cy1 <= margin + 15  # context, no more
    np.testing.assert_array_equal(covered, 1)


def loss_and_gradient(
    objective: core.Objective | TiledObjective, image: torch.Tensor
) -> tuple[float, core.Losses, torch.Tensor]:
    pixels = image.clone().requires_grad_(True)
    loss, losses = objective.evaluate(pixels)
    assert pixels.grad is not None
    return float(loss), losses, pixels.grad


def masked_targets(net: torch.nn.Module, side: int) -> core.ScaleTargets:
    """The astronaut's content and Starry Night's style on a soft left-to-right map."""
    targets = scale_for(net, side, side)
    ramp = np.tile(np.linspace(0, 1, side, dtype=np.float32), (side, 1))
    channel = dataclasses.replace(targets.channels[0], mask=ramp)
    return dataclasses.replace(targets, channels=[channel])


def test_one_tile_is_the_whole_objective(net: torch.nn.Module) -> None:
    targets = masked_targets(net, 64)
    weights = core.LossWeights(content=1.0, style=10.0, tv=5.0)
    image = pixels_of("style/the_scream.jpg", 64, 64)
    whole = loss_and_gradient(core.Objective(net, targets, weights, STRIDES, CPU), image)
    tiled = TiledObjective(net, targets, weights, STRIDES, CPU, Tiling(64, 0, moving=False), seed=0)
    one = loss_and_gradient(tiled, image)
    assert one[0] == pytest.approx(whole[0], rel=1e-5)
    for name in ("content", "style", "tv"):
        assert getattr(one[1], name) == pytest.approx(getattr(whole[1], name), rel=1e-5)
    torch.testing.assert_close(one[2], whole[2], rtol=1e-4, atol=1e-7)


def test_tiles_with_full_context_add_up_to_the_whole_content_and_smoothness(
    net: torch.nn.Module,
) -> None:
    # Content and TV are sums over positions, so tiles that see the whole image (margin 64)
    # and own a quarter of it each must add up exactly; the style term is a mean of local Gram
    # errors by design, so it is left out here.
    targets = scale_for(net, 64, 64)
    weights = core.LossWeights(content=1.0, style=0.0, tv=5.0)
    image = pixels_of("style/the_scream.jpg", 64, 64)
    whole = loss_and_gradient(core.Objective(net, targets, weights, STRIDES, CPU), image)
    tiled = TiledObjective(
        net, targets, weights, STRIDES, CPU, Tiling(32, 64, moving=False), seed=0
    )
    quarters = loss_and_gradient(tiled, image)
    assert len(tiled.tiles(moving=False)) == 4
    assert quarters[0] == pytest.approx(whole[0], rel=1e-4)
    # Each tile's crop is the whole canvas, so each runs the whole's forward pass; the gradient
    # adds four backward passes, each rounding as the whole's does and none larger than it:
    # within five times the whole's own float32 error (against float64) of it. Compared in
    # norm, as a pixel whose four parts cancel keeps their rounding.
    exact = loss_and_gradient(
        core.Objective(copy.deepcopy(net).double(), targets, weights, STRIDES, CPU), image.double()
    )
    rounding = max(relative_error(whole[2], exact[2]), 2.0**-24)
    assert relative_error(quarters[2], whole[2]) < 5 * rounding


def test_without_context_the_tiles_differ_from_the_whole(net: torch.nn.Module) -> None:
    """The margin is what makes tiles agree: with none, features at the cuts change."""
    targets = scale_for(net, 64, 64)
    weights = core.LossWeights(content=1.0, style=0.0, tv=0.0)
    image = pixels_of("style/the_scream.jpg", 64, 64)
    whole = loss_and_gradient(core.Objective(net, targets, weights, STRIDES, CPU), image)
    bare = TiledObjective(net, targets, weights, STRIDES, CPU, Tiling(32, 0, moving=False), seed=0)
    assert abs(loss_and_gradient(bare, image)[0] - whole[0]) > 1e-3 * whole[0]


def test_a_tiled_run_optimises_the_whole_canvas(net: torch.nn.Module) -> None:
    scales = [scale_for(net, 64, 64, iterations=15)]
    init = pixels_of("content/astronaut.jpg", 64, 64)[0].permute(1, 2, 0).numpy()
    settings: dict[str, Any] = {
        "scales": scales,
        "init": init,
        "optimizer": "adam",
        "learning_rate": 0.03,
    }
    whole = result_of(run(net, job_for(net, **settings)))
    events = run(net, job_for(net, **settings, tiling=Tiling(32, 16)))
    tiled = result_of(events)
    # Judged by the whole image's loss, which the tiles only approximate.
    objective = core.Objective(net, scales[0], core.LossWeights(1.0, 10.0, 0.0), STRIDES, CPU)

    def loss(pixels: np.ndarray) -> float:
        return objective.measure(torch.as_tensor(pixels).permute(2, 0, 1)[None]).total

    start, done = loss(init), loss(tiled.pixels / np.float32(255))
    assert done < 0.3 * start
    assert done < 2.5 * loss(whole.pixels / np.float32(255))
    previews = [e for e in events if isinstance(e, core.Preview)]
    assert previews and all(p.pixels.shape == (64, 64, 3) for p in previews)
    # No cut stays put, so none shows: the mean step across x = 32 is like any other.
    steps = np.abs(np.diff(tiled.pixels.astype(float), axis=1)).mean(axis=(0, 2))
    assert steps[31] < 2 * np.median(steps)
