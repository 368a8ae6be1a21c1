import math
import re

import numpy as np
import pytest

from services.blending.core import SourceFeatures, blend_targets
from services.common.errors import InvalidArgument
from services.common.stylemix import Region, StyleSource, mix_styles

rng = np.random.default_rng(0)


def source(style: float, content: float, seed: int) -> SourceFeatures:
    r = np.random.default_rng(seed)
    return SourceFeatures(
        grams={"relu1_1": r.random((4, 4), np.float32), "relu2_1": r.random((8, 8), np.float32)},
        features={"relu4_2": r.random((16, 3, 5), np.float32)},
        style_weight=style,
        content_weight=content,
    )


STRIDES = {"relu4_2": 8}


def test_targets_are_weighted_means_with_their_scales() -> None:
    sources = [source(0.7, 1.0, 1), source(0.3, 0.0, 2), source(0.0, 3.0, 3)]
    targets = blend_targets(sources, strides=STRIDES)
    [channel] = targets.channels
    assert channel.mask is None and channel.scale == pytest.approx(1.0)
    for layer in ("relu1_1", "relu2_1"):
        expected = 0.7 * sources[0].grams[layer] + 0.3 * sources[1].grams[layer]
        np.testing.assert_allclose(channel.grams[layer], expected, rtol=1e-6)
    expected = (1.0 * sources[0].features["relu4_2"] + 3.0 * sources[2].features["relu4_2"]) / 4
    np.testing.assert_allclose(targets.features["relu4_2"], expected, rtol=1e-6)
    np.testing.assert_allclose(targets.content_weights["relu4_2"], 4.0)


def test_weighted_sum_of_losses_equals_scaled_loss_against_the_blend() -> None:
    """Σᵢ sᵢ‖G − Gᵢ‖² = (Σ sᵢ)‖G − G*‖² + const, for any G (DESIGN.md)."""
    sources = [source(w, 0.0, seed) for seed, w in enumerate([0.2, 1.5, 0.8])]
    blended = blend_targets(sources).channels[0].grams["relu2_1"].astype(np.float64)
    weights = np.array([s.style_weight for s in sources])
    grams = [s.grams["relu2_1"].astype(np.float64) for s in sources]

    def per_source(g: np.ndarray) -> float:
        return sum(w * np.sum((g - gi) ** 2) for w, gi in zip(weights, grams, strict=True))

    def against_blend(g: np.ndarray) -> float:
        return weights.sum() * np.sum((g - blended) ** 2)

    constants = [per_source(g) - against_blend(g) for g in rng.random((5, 8, 8))]
    np.testing.assert_allclose(constants, constants[0], rtol=1e-5)
    # …and the constant is the weighted spread of the sources around their blend.
    spread = sum(w * np.sum((gi - blended) ** 2) for w, gi in zip(weights, grams, strict=True))
    assert constants[0] == pytest.approx(spread, rel=1e-5)


def test_zero_content_weights_drop_the_content_term() -> None:
    targets = blend_targets([source(1.0, 0.0, 1), source(2.0, 0.0, 2)])
    assert targets.features == {} and targets.content_weights == {}


@pytest.mark.parametrize(
    ("style", "content", "message"),
    [
        (-1.0, 1.0, r"sources\[1\]\.style_weight must be a finite number >= 0, got -1.0"),
        (math.nan, 1.0, r"sources\[1\]\.style_weight .* got nan"),
        (1.0, math.inf, r"sources\[1\]\.content_weight .* got inf"),
    ],
)
def test_bad_weights_are_named(style: float, content: float, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        blend_targets([source(1.0, 1.0, 1), source(style, content, 2)], strides=STRIDES)


def test_all_zero_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="nothing to blend"):
        blend_targets([source(0.0, 0.0, 1)])


def test_mismatched_shapes_are_refused() -> None:
    odd = source(1.0, 0.0, 2)
    odd = SourceFeatures({**odd.grams, "relu1_1": np.zeros((5, 5), np.float32)}, {}, 1.0, 0.0)
    with pytest.raises(InvalidArgument, match=r"grams\[relu1_1\]: shapes differ"):
        blend_targets([source(1.0, 0.0, 1), odd])


def halves(width: int = 40, height: int = 24) -> tuple[np.ndarray, np.ndarray]:
    left = np.zeros((height, width), np.float32)
    left[:, : width // 2] = 1.0
    return left, 1.0 - left


def test_a_mapped_source_gets_a_channel_of_its_own() -> None:
    left, _ = halves()
    everywhere, mapped = source(1.0, 0.0, 1), source(2.0, 0.0, 2)
    mapped = SourceFeatures(mapped.grams, {}, 2.0, 0.0, style_map=left)
    channels = blend_targets([everywhere, mapped]).channels
    assert [(c.mask is None, c.scale) for c in channels] == [(True, 1.0), (False, 2.0)]
    np.testing.assert_array_equal(channels[1].mask, left)
    np.testing.assert_allclose(channels[1].grams["relu1_1"], mapped.grams["relu1_1"])


def test_regions_blend_their_own_weights() -> None:
    left, right = halves()
    a, b = source(0.0, 0.0, 1), source(0.0, 1.0, 2)
    regions = [Region(left, [1.0, 0.0]), Region(right, [0.25, 0.75])]
    channels = blend_targets([a, b], regions, STRIDES).channels
    assert [c.scale for c in channels] == [1.0, 1.0]
    expected = 0.25 * a.grams["relu2_1"] + 0.75 * b.grams["relu2_1"]
    np.testing.assert_allclose(channels[1].grams["relu2_1"], expected, rtol=1e-6)
    with pytest.raises(
        InvalidArgument, match=r"regions\[0\]\.style_weights: 1 weights for 2 sources"
    ):
        blend_targets([a, b], [Region(left, [1.0])], STRIDES)
    mapped = SourceFeatures(a.grams, {}, 1.0, 0.0, style_map=left)
    with pytest.raises(InvalidArgument, match="cannot be combined"):
        blend_targets([mapped, b], regions, STRIDES)


def test_content_maps_split_the_canvas() -> None:
    """Left half from one photo, right half from the other: F* takes each where its map is."""
    left, right = halves(40, 24)  # relu4_2 at stride 8: 5×3 cells
    a_features = {"relu4_2": np.random.default_rng(5).random((16, 3, 5), np.float32)}
    b_features = {"relu4_2": np.random.default_rng(6).random((16, 3, 5), np.float32)}
    a = SourceFeatures({}, a_features, 0.0, 2.0, content_map=left)
    b = SourceFeatures({}, b_features, 0.0, 1.0, content_map=right)
    targets = blend_targets([a, b], strides=STRIDES)
    f, w = targets.features["relu4_2"], targets.content_weights["relu4_2"]
    np.testing.assert_allclose(f[:, :, :2], a_features["relu4_2"][:, :, :2], rtol=1e-6)
    np.testing.assert_allclose(f[:, :, 3:], b_features["relu4_2"][:, :, 3:], rtol=1e-6)
    # The middle column straddles the edge: half of each, weighted by their content weights.
    mixed = (
        2.0 * 0.5 * a_features["relu4_2"][:, :, 2] + 0.5 * b_features["relu4_2"][:, :, 2]
    ) / 1.5
    np.testing.assert_allclose(f[:, :, 2], mixed, rtol=1e-5)
    np.testing.assert_allclose(w[:, 0], 2.0)
    np.testing.assert_allclose(w[:, 2], 1.5)


def test_style_mix_normalises_weights_and_strength_mixes_in_the_identity() -> None:
    sources = [StyleSource(-1, 0.0), StyleSource(1, 3.0), StyleSource(2, 1.0)]
    mix = mix_styles(sources, [], styles=4, identity=0, strength=1.0, size=(8, 4))
    np.testing.assert_allclose(mix, [0.0, 0.75, 0.25, 0.0])
    half = mix_styles(sources, [], styles=4, identity=0, strength=0.5, size=(8, 4))
    np.testing.assert_allclose(half, [0.5, 0.375, 0.125, 0.0])


def test_style_mix_per_pixel_from_maps_and_regions_with_the_identity_where_no_style() -> None:
    left = np.zeros((4, 8), np.float32)
    left[:, :4] = 1.0
    sources = [StyleSource(1, 1.0, style_map=left), StyleSource(2, 0.0)]
    mix = mix_styles(sources, [], styles=3, identity=0, strength=1.0, size=(8, 4))
    assert mix.shape == (3, 4, 8)
    np.testing.assert_allclose(mix[:, 0, 0], [0, 1, 0])
    np.testing.assert_allclose(mix[:, 0, 7], [1, 0, 0])  # no style here: the photo itself
    regions = [Region(mask=1 - left, style_weights=[0.0, 2.0])]
    mixed = mix_styles(sources, regions, styles=3, identity=0, strength=1.0, size=(8, 4))
    np.testing.assert_allclose(mixed[:, 0, 7], [0, 0, 1])
    np.testing.assert_allclose(mixed.sum(axis=0), 1.0, rtol=1e-6)


def test_a_network_without_an_identity_takes_strength_1_and_a_style_everywhere() -> None:
    sources = [StyleSource(0, 1.0), StyleSource(1, 3.0)]
    mix = mix_styles(sources, [], styles=2, identity=None, strength=1.0)
    np.testing.assert_allclose(mix, [0.25, 0.75])
    with pytest.raises(InvalidArgument, match="no identity style"):
        mix_styles(sources, [], styles=2, identity=None, strength=0.5)
    with pytest.raises(InvalidArgument, match="no identity style"):
        mix_styles([StyleSource(0, 0.0)], [], styles=2, identity=None, strength=1.0)


@pytest.mark.parametrize(
    ("sources", "strength", "message"),
    [
        ([StyleSource(-1, 1.0)], 1.0, "sources[0] has a style weight but no style in the network"),
        ([StyleSource(1, -1.0)], 1.0, "sources[0].style_weight must be a finite number >= 0"),
        ([StyleSource(5, 1.0)], 1.0, "sources[0].style: 5 is not one of 3"),
        ([StyleSource(1, 1.0)], 1.5, "strength must be within 0..1, got 1.5"),
    ],
)
def test_bad_style_mixes_are_refused_by_name(
    sources: list[StyleSource], strength: float, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        mix_styles(sources, [], styles=3, identity=0, strength=strength, size=(8, 4))
