import numpy as np

from services.common import colour

rng = np.random.default_rng(0)


def test_yiq_round_trip() -> None:
    pixels = rng.random((8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(colour.to_rgb(colour.to_yiq(pixels)), pixels, atol=1e-6)


def test_luminance_is_grey_and_matches_the_reference_tones() -> None:
    dark = rng.random((16, 16, 3)).astype(np.float32) * 0.3
    bright = 0.5 + rng.random((16, 16, 3)).astype(np.float32) * 0.4
    grey = colour.luminance(dark, reference=bright)
    assert np.allclose(grey[..., 0], grey[..., 1]) and np.allclose(grey[..., 0], grey[..., 2])
    y_ref = colour.to_yiq(bright)[..., 0]
    assert abs(grey[..., 0].mean() - y_ref.mean()) < 1e-3
    assert abs(grey[..., 0].std() - y_ref.std()) < 1e-3


def test_with_chrominance_keeps_the_colour_images_iq() -> None:
    grey = colour.luminance((0.4 + 0.2 * rng.random((8, 8, 3))).astype(np.float32))
    photo = (0.35 + 0.3 * rng.random((8, 8, 3))).astype(np.float32)  # no clipping
    mixed = colour.to_yiq(colour.with_chrominance(grey, photo))
    np.testing.assert_allclose(mixed[..., 1:], colour.to_yiq(photo)[..., 1:], atol=2e-3)
    np.testing.assert_allclose(mixed[..., 0], grey[..., 0], atol=2e-3)


def test_match_colour_moves_mean_and_covariance_onto_the_reference() -> None:
    style = rng.random((32, 32, 3)).astype(np.float32) * np.array([0.9, 0.3, 0.2], np.float32)
    reference = 0.3 + 0.4 * rng.random((32, 32, 3)).astype(np.float32)
    moved = colour.match_colour(style, reference).reshape(-1, 3).astype(np.float64)
    target = reference.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(moved.mean(axis=0), target.mean(axis=0), atol=1e-3)
    np.testing.assert_allclose(np.cov(moved.T), np.cov(target.T), atol=1e-3)
