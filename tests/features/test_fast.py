"""The fast network's runner: any image size, both mix forms, and checked inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.faststyliser import FastStyliser


@pytest.fixture(scope="module")
def styliser(fast_model_dir: Path) -> FastStyliser:
    return FastStyliser(fast_model_dir, ["CPUExecutionProvider"])


def test_any_size_comes_back_at_its_size_and_the_mix_decides(styliser: FastStyliser) -> None:
    pixels = np.random.default_rng(0).random((37, 53, 3), dtype=np.float32)
    starry = styliser.stylise(pixels, np.array([0, 1, 0, 0], np.float32))
    scream = styliser.stylise(pixels, np.array([0, 0, 1, 0], np.float32))
    assert starry.shape == (37, 53, 3) and starry.min() >= 0 and starry.max() <= 1
    assert np.abs(starry - scream).mean() > 0.01
    per_pixel = np.broadcast_to(np.array([0, 1, 0, 0], np.float32)[:, None, None], (4, 37, 53))
    np.testing.assert_allclose(styliser.stylise(pixels, per_pixel), starry, atol=1e-5)


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        (np.ones(3, np.float32), "the style mix must be 4 weights or 4×H×W, got shape (3,)"),
        (np.ones((4, 5, 5), np.float32), "a per-pixel style mix must match the image's 8×8"),
        (np.array([0, -1, 0, 0], np.float32), "finite and non-negative"),
        (np.array([0, np.nan, 0, 0], np.float32), "finite and non-negative"),
    ],
)
def test_bad_mixes_are_refused_by_name(
    styliser: FastStyliser, mix: np.ndarray, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        styliser.stylise(np.zeros((8, 8, 3), np.float32) + 0.5, mix)


def test_stylise_refuses_a_run_over_the_size_limits_before_decoding(fast_model_dir: Path) -> None:
    from services.common.errors import ResourceExhausted
    from services.features.fast import FastModels

    models = FastModels(fast_model_dir.parent, ["CPUExecutionProvider"], max_side_px=64,
                        max_pixels=48 * 48)  # fmt: skip
    mix = np.array([0, 1, 0, 0], np.float32)
    # The image is not even an image: the size is refused before anything is decoded or run.
    with pytest.raises(ResourceExhausted, match="longest side allowed is 64 px"):
        models.stylise(fast_model_dir.name, b"not an image", 4000, 2, mix, False)
    with pytest.raises(ResourceExhausted, match="over the limit of 2,304"):
        models.stylise(fast_model_dir.name, b"not an image", 60, 60, mix, False)
