"""bench.universal_ideal: the inversion that stands in for a decoder finds an image with the
features asked for, and the ideal universal image moves the statistics its level sets."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from bench import universal, universal_ideal, universal_layers
from bench.large import STYLE_LAYERS, served_net

SIDE = 48


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return served_net()


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    return universal.Pair(
        universal.SAMPLES / "content" / "chelsea.jpg",
        universal.SAMPLES / "style" / "the_scream.jpg",
    ).pixels(SIDE)


def features_of(net: torch.nn.Module, pixels: np.ndarray, layer: str) -> np.ndarray:
    with torch.no_grad():
        return net(universal.to_batch(pixels), [layer])[layer][0].numpy()


def test_invert_finds_an_image_with_the_features_asked_for(
    net: torch.nn.Module, pair: tuple[np.ndarray, np.ndarray]
) -> None:
    photo, _ = pair
    wanted = features_of(net, photo, "relu2_1")
    grey = np.full_like(photo, universal_ideal.GREY)
    start_error = float(((features_of(net, grey, "relu2_1") - wanted) ** 2).sum()
                        / (wanted**2).sum())  # fmt: skip
    inversion = universal_ideal.invert(net, "relu2_1", wanted, grey, iterations=60)
    assert inversion.iterations == 60
    assert inversion.pixels.shape == photo.shape
    assert inversion.pixels.min() >= 0 and inversion.pixels.max() <= 1
    assert inversion.error < start_error / 20
    # relu2_1 keeps most of a photo: the inversion comes back near it, pixel by pixel.
    assert np.abs(inversion.pixels - photo).mean() < np.abs(grey - photo).mean() / 3


def test_ideal_image_is_the_photo_when_the_style_is_the_photo_itself(
    net: torch.nn.Module, pair: tuple[np.ndarray, np.ndarray]
) -> None:
    photo, _ = pair
    # Whitening and colouring with the photo's own statistics is the identity (up to float32
    # rounding), so an inversion starting at the photo has nowhere to go.
    image, (inversion,) = universal_ideal.ideal_image(
        net, photo, photo, ("relu2_1",), iterations=5, start="previous"
    )
    assert inversion.error < 1e-6
    assert np.abs(image - photo).max() < 1e-3


def test_ideal_image_sets_the_statistics_of_its_level(
    net: torch.nn.Module, pair: tuple[np.ndarray, np.ndarray]
) -> None:
    photo, painting = pair
    targets = universal.scale_targets(net, photo, painting)
    before = universal_layers.per_layer(net, targets, photo)
    image, _ = universal_ideal.ideal_image(net, photo, painting, ("relu2_1",), iterations=60)
    after = universal_layers.per_layer(net, targets, image)
    at = STYLE_LAYERS.index("relu2_1")
    # Not to zero: coloured features can be negative, which no image gives after a ReLU.
    assert after[at] < before[at] / 2


def test_refusals_and_level_order() -> None:
    with pytest.raises(ValueError, match="start must be one of"):
        universal_ideal.ideal_image(
            None,  # type: ignore[arg-type]  # refused before the net is used
            np.zeros((16, 16, 3), np.float32), np.zeros((16, 16, 3), np.float32),
            ("relu1_1",), 1, start="photo",
        )  # fmt: skip
    assert universal_ideal.coarse_to_fine("relu1_1, relu3_1,relu5_1") == (
        "relu5_1", "relu3_1", "relu1_1",
    )  # fmt: skip
    with pytest.raises(argparse.ArgumentTypeError, match="relu6_1"):
        universal_ideal.coarse_to_fine("relu3_1,relu6_1")
    with pytest.raises(argparse.ArgumentTypeError):
        universal_ideal.coarse_to_fine(" , ")
