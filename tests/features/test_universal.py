"""The universal method (WCT): the transform against its formula in feature space, the blend's
moments against a pooled sample, and the whole pass on images with trained decoders.

Tolerances come from float32 rounding. The transform runs in float64 and its output is rounded
once to float32: each element moves by at most u = ε₃₂/2 of itself, so a second moment
E[yₐy_b] moves by at most 2u·√(E[yₐ²]E[y_b²]) ≤ ε₃₂·max diag G, and the mean's outer product
by as much again: 2ε₃₂·max diag G in all; the float64 arithmetic before it adds ~1e-13.
Asserted at twice that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.blending.core import SourceFeatures, style_channels
from services.common import images
from services.common.errors import InvalidArgument
from services.features.core import FeatureExtractor, gram
from services.features.universal import (
    ChannelTarget,
    ContentSource,
    UniversalStyle,
    UniversalStyliser,
    masked_moments,
    mixture_covariance,
    transform_channels,
)

EPS = float(np.finfo(np.float32).eps)
CHANNELS, HEIGHT, WIDTH = 8, 40, 50


def sample(rng: np.random.Generator, mean: np.ndarray, spread: float) -> np.ndarray:
    """C×H×W float32 features with the given mean and a random, well-conditioned covariance
    (condition ≤ ~10, far from the eigenvalue floor's 1/(C·ε₃₂))."""
    mixing = np.eye(CHANNELS) + 0.3 * rng.standard_normal((CHANNELS, CHANNELS))
    flat = spread * mixing @ rng.standard_normal((CHANNELS, HEIGHT * WIDTH)) + mean[:, None]
    return flat.reshape(CHANNELS, HEIGHT, WIDTH).astype(np.float32)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A source's mean and uncentred Gram, float64 (the blend rounds them to float32)."""
    flat = features.reshape(features.shape[0], -1).astype(np.float64)
    return flat.mean(axis=1), flat @ flat.T / flat.shape[1]


def second_moment_bound(mean: np.ndarray, second: np.ndarray) -> float:
    return 4 * EPS * float(np.max(np.diag(second.astype(np.float64))))


def assert_moments(
    features: np.ndarray, mean: np.ndarray, second: np.ndarray, where: np.ndarray | None = None
) -> None:
    """The features' mean and covariance (over `where`) are μ and G − μμᵀ, to float32 rounding."""
    got_mean, got_covariance = masked_moments(features, where)
    largest = float(np.max(np.diag(second.astype(np.float64))))
    np.testing.assert_allclose(
        got_mean, mean.astype(np.float64), rtol=0, atol=2 * EPS * largest**0.5
    )
    np.testing.assert_allclose(
        got_covariance,
        mixture_covariance(mean, second),
        rtol=0,
        atol=second_moment_bound(mean, second),
    )


def test_one_channel_at_strength_1_gives_the_targets_mean_and_covariance() -> None:
    rng = np.random.default_rng(0)
    content = sample(rng, rng.uniform(0, 2, CHANNELS), 1.0)
    mean, second = statistics(sample(rng, rng.uniform(1, 3, CHANNELS), 0.5))
    target = ChannelTarget(None, mean.astype(np.float32), second.astype(np.float32))
    out = transform_channels(content, [target], 1.0)
    assert out.dtype == np.float32 and out.shape == content.shape
    assert_moments(out, target.mean, target.gram)


def test_two_sources_3_to_1_colour_with_the_moments_of_their_pooled_mixture() -> None:
    rng = np.random.default_rng(1)
    red, blue = sample(rng, np.full(CHANNELS, 2.0), 0.4), sample(rng, np.full(CHANNELS, -1.0), 1.0)
    sources = [
        SourceFeatures({"l": g}, {}, weight, 0.0, means={"l": m})
        for (m, g), weight in ((statistics(red), 3.0), (statistics(blue), 1.0))
    ]
    (channel,) = style_channels(sources, ())
    # A sample three parts red to one part blue: its moments are the mixture's.
    pooled = np.concatenate([red, red, red, blue], axis=1).reshape(CHANNELS, -1).astype(np.float64)
    pooled_mean, pooled_second = pooled.mean(axis=1), pooled @ pooled.T / pooled.shape[1]
    # The blend rounds μ* and G* to float32 (u each); C* = G* − μ*μ*ᵀ then within 3u·max diag G*.
    np.testing.assert_allclose(
        mixture_covariance(channel.means["l"], channel.grams["l"]),
        np.cov(pooled, bias=True),
        rtol=0,
        atol=second_moment_bound(pooled_mean, pooled_second),
    )
    content = sample(rng, np.zeros(CHANNELS), 1.0)
    out = transform_channels(
        content, [ChannelTarget(None, channel.means["l"], channel.grams["l"])], 1.0
    )
    assert_moments(out, pooled_mean, pooled_second)


def test_strength_mixes_the_content_back_linearly_and_0_is_the_content() -> None:
    rng = np.random.default_rng(2)
    content = sample(rng, np.ones(CHANNELS), 1.0)
    mean, second = statistics(sample(rng, np.full(CHANNELS, 3.0), 0.5))
    target = [ChannelTarget(None, mean.astype(np.float32), second.astype(np.float32))]
    np.testing.assert_array_equal(transform_channels(content, target, 0.0), content)
    full = transform_channels(content, target, 1.0).astype(np.float64)
    half = transform_channels(content, target, 0.5).astype(np.float64)
    # Each of the three is rounded to float32 once: u·|y| each, 2u in all, asserted at 4u.
    np.testing.assert_allclose(
        half, 0.5 * full + 0.5 * content, rtol=0, atol=2 * EPS * float(np.abs(full).max())
    )


def test_a_masked_channel_keeps_the_content_outside_and_its_style_statistics_inside() -> None:
    rng = np.random.default_rng(3)
    content = sample(rng, np.ones(CHANNELS), 1.0)
    mean, second = statistics(sample(rng, np.full(CHANNELS, -2.0), 0.3))
    left = np.zeros((HEIGHT, WIDTH), np.float32)
    left[:, : WIDTH // 2] = 1
    target = ChannelTarget(2.0 * left, mean.astype(np.float32), second.astype(np.float32), 2.0)
    out = transform_channels(content, [target], 1.0)
    np.testing.assert_array_equal(out[:, :, WIDTH // 2 :], content[:, :, WIDTH // 2 :])
    # Whitened with the content's statistics under the mask, the region gets its style's.
    assert_moments(out, target.mean, target.gram, where=left)


def test_soft_masks_blend_the_coloured_features_by_their_weights() -> None:
    rng = np.random.default_rng(4)
    content = sample(rng, np.ones(CHANNELS), 1.0)
    ramp = np.broadcast_to(np.linspace(0, 1, WIDTH, dtype=np.float32), (HEIGHT, WIDTH))
    stats = [statistics(sample(rng, np.full(CHANNELS, m), 0.5)) for m in (-1.0, 3.0)]
    targets = [
        ChannelTarget(scale * mask, m.astype(np.float32), g.astype(np.float32), scale)
        for (m, g), scale, mask in zip(stats, (1.0, 3.0), (1 - ramp, ramp), strict=True)
    ]
    out = transform_channels(content, targets, 1.0)
    alone = [transform_channels(content, [t], 1.0).astype(np.float64) for t in targets]
    weights = [np.asarray(t.influence, np.float64) for t in targets]
    expected = (weights[0] * alone[0] + weights[1] * alone[1]) / (weights[0] + weights[1])
    # Where a channel's influence is 0 its own output is the content, weighted by 0.
    atol = 4 * EPS * max(float(np.abs(a).max()) for a in alone)
    np.testing.assert_allclose(out, expected, rtol=0, atol=atol)


def test_a_dead_channel_is_floored_not_amplified() -> None:
    """ReLU features are often 0 in a channel over a whole image: its variance is 0, and
    whitening must not divide by it."""
    rng = np.random.default_rng(5)
    content = sample(rng, np.ones(CHANNELS), 1.0)
    content[3] = 0.0
    mean, second = statistics(sample(rng, np.full(CHANNELS, 2.0), 0.5))
    out = transform_channels(content, [ChannelTarget(None, mean, second)], 1.0)
    assert np.all(np.isfinite(out))
    assert float(np.abs(out).max()) < 10 * float(np.max(np.diag(second))) ** 0.5


# --- Images, with decoders trained by export/train_universal.py ----------------------------------

SIDE = 64


@pytest.fixture(scope="session")
def styliser(vgg19_dir: Path, universal_dir: Path) -> UniversalStyliser:
    return UniversalStyliser(vgg19_dir, universal_dir, max_side_px=512, max_pixels=256 * 256)


def strokes(colour: tuple[float, float, float], seed: int, side: int = SIDE) -> np.ndarray:
    """A painting of thick flat-coloured strokes on off-white."""
    rng = np.random.default_rng(seed)
    pixels = np.full((side, side, 3), 0.9, np.float32)
    rows, columns = np.mgrid[:side, :side]
    for _ in range(12):
        r, c, angle = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(0, np.pi)
        distance = np.abs((rows - r) * np.cos(angle) - (columns - c) * np.sin(angle))
        along = np.abs((rows - r) * np.sin(angle) + (columns - c) * np.cos(angle))
        pixels[(distance < 3) & (along < side / 3)] = colour
    return pixels


def photo(level: float = 0.5, side: int = SIDE) -> np.ndarray:
    """A grey, structured picture: a gradient, a disc and bars."""
    rows, columns = np.mgrid[:side, :side] / side
    grey = level + 0.2 * (columns - 0.5)
    grey = np.where((rows - 0.5) ** 2 + (columns - 0.3) ** 2 < 0.04, grey + 0.2, grey)
    grey = np.where((np.floor(rows * 8) % 2 == 0) & (columns > 0.7), grey - 0.2, grey)
    return np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=2).astype(np.float32)


def redness(pixels: np.ndarray) -> float:
    return float(pixels[..., 0].mean() - pixels[..., 2].mean())


RED, BLUE = (0.85, 0.1, 0.1), (0.1, 0.15, 0.85)


def test_statistics_are_the_iterative_paths_grams(
    styliser: UniversalStyliser, vgg19_dir: Path
) -> None:
    data = images.encode(strokes(RED, 0))
    pixels = images.to_canvas(data, SIDE, SIDE)
    extractor = FeatureExtractor(vgg19_dir, ["CPUExecutionProvider"], cache_bytes=0)
    extracted = extractor.extract(data, SIDE, SIDE, styliser.layers, styliser.layers)
    found = styliser.statistics(pixels)
    for layer in styliser.layers:
        mean, second = found[layer]
        # The same float32 graph, cut at other taps: only the order of float32 sums may differ.
        largest = float(np.abs(extracted.grams[layer]).max())
        np.testing.assert_allclose(second, extracted.grams[layer], rtol=0, atol=1e-5 * largest)
        np.testing.assert_allclose(
            second, gram(extracted.features[layer]), rtol=0, atol=1e-5 * largest
        )
        features = extracted.features[layer].astype(np.float64)
        np.testing.assert_allclose(
            mean, features.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5 * largest**0.5
        )


def test_statistics_are_kept_by_key(styliser: UniversalStyliser) -> None:
    assert styliser.kept("blue-strokes") is None
    first = styliser.statistics(strokes(BLUE, 1))
    styliser.keep("blue-strokes", first)
    runs = styliser.encoder_runs
    assert styliser.kept("blue-strokes") is first
    assert styliser.encoder_runs == runs


def test_more_weight_on_red_moves_the_output_toward_red(styliser: UniversalStyliser) -> None:
    red, blue = styliser.statistics(strokes(RED, 0)), styliser.statistics(strokes(BLUE, 1))
    content = [ContentSource(photo(), 1.0)]
    reds = []
    for r, b in ((1.0, 3.0), (1.0, 1.0), (3.0, 1.0)):
        styles = [UniversalStyle(red, r), UniversalStyle(blue, b)]
        out = styliser.stylise(content, styles).pixels
        assert out.shape == (SIDE, SIDE, 3) and out.dtype == np.float32
        reds.append(redness(out))
    assert reds[0] < reds[1] < reds[2], reds
    assert reds[2] > 0 > reds[0], reds


def test_a_style_map_keeps_its_style_where_it_is_painted(styliser: UniversalStyliser) -> None:
    red = styliser.statistics(strokes(RED, 0))
    left = np.zeros((SIDE, SIDE), np.float32)
    left[:, : SIDE // 2] = 1
    content = [ContentSource(photo(), 1.0)]
    out = styliser.stylise(content, [UniversalStyle(red, 1.0, left)]).pixels
    plain = styliser.stylise(content, []).pixels  # the decoders' own reconstruction
    band = 12  # the reach of the encoder and decoders across the seam, in pixels
    assert redness(out[:, : SIDE // 2 - band]) > redness(plain[:, : SIDE // 2 - band]) + 0.05
    right, plain_right = out[:, SIDE // 2 + band :], plain[:, SIDE // 2 + band :]
    assert float(np.abs(right - plain_right).mean()) < 0.03


def test_content_maps_take_each_photo_where_it_is_mapped(styliser: UniversalStyliser) -> None:
    left = np.zeros((SIDE, SIDE), np.float32)
    left[:, : SIDE // 2] = 1
    dark, bright = photo(0.25), photo(0.75)
    out = styliser.stylise(
        [ContentSource(dark, 1.0, left), ContentSource(bright, 1.0, 1 - left)], []
    ).pixels
    band = 12
    assert (
        abs(float(out[:, : SIDE // 2 - band].mean()) - float(dark[:, : SIDE // 2 - band].mean()))
        < 0.1
    )
    assert (
        abs(float(out[:, SIDE // 2 + band :].mean()) - float(bright[:, SIDE // 2 + band :].mean()))
        < 0.1
    )


def test_any_side_comes_back_at_its_size(styliser: UniversalStyliser) -> None:
    red = styliser.statistics(strokes(RED, 0))
    out = styliser.stylise([ContentSource(photo()[:37, :53], 1.0)], [UniversalStyle(red, 1.0)])
    assert out.pixels.shape == (37, 53, 3)
    assert set(out.seconds) == {"encode", "transform", "decode"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"levels": ["relu9_1"]}, "levels: unknown level"),
        ({"style_weight": -1.0}, r"styles\[0\].style_weight must be a finite number >= 0"),
        ({"content_weight": 0.0}, "contents: at least one content_weight must be > 0"),
        ({"strength": 2.0}, "strength must be within 0..1"),
        ({"side": 16}, "contents: size 16×16: each side must be at least 32"),
        ({"style_map": np.ones((5, 5), np.float32)}, r"styles\[0\].style_map: shape \(5, 5\)"),
        ({"preserve_colors": "sepia"}, "preserve_colors: 'sepia'"),
    ],
)
def test_bad_input_is_refused_by_name(
    styliser: UniversalStyliser, change: dict[str, object], message: str
) -> None:
    red = styliser.statistics(strokes(RED, 0))
    side = int(change.get("side", SIDE))  # type: ignore[call-overload]
    content = ContentSource(photo(side=side), float(change.get("content_weight", 1.0)))  # type: ignore[arg-type]
    style = UniversalStyle(red, float(change.get("style_weight", 1.0)), change.get("style_map"))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=message):
        styliser.stylise(
            [content],
            [style],
            strength=float(change.get("strength", 1.0)),  # type: ignore[arg-type]
            preserve_colors=str(change.get("preserve_colors", "")),
            levels=change.get("levels"),  # type: ignore[arg-type]
        )
