import math

import numpy as np
import pytest

from services.blending.core import SourceFeatures, blend_targets
from services.common.errors import InvalidArgument

rng = np.random.default_rng(0)


def source(style: float, content: float, seed: int) -> SourceFeatures:
    r = np.random.default_rng(seed)
    return SourceFeatures(
        grams={"relu1_1": r.random((4, 4), np.float32), "relu2_1": r.random((8, 8), np.float32)},
        features={"relu4_2": r.random((16, 3, 5), np.float32)},
        style_weight=style,
        content_weight=content,
    )


def test_targets_are_weighted_means_with_their_scales() -> None:
    sources = [source(0.7, 1.0, 1), source(0.3, 0.0, 2), source(0.0, 3.0, 3)]
    targets = blend_targets(sources)
    assert targets.style_scale == pytest.approx(1.0)
    assert targets.content_scale == pytest.approx(4.0)
    for layer in ("relu1_1", "relu2_1"):
        expected = 0.7 * sources[0].grams[layer] + 0.3 * sources[1].grams[layer]
        np.testing.assert_allclose(targets.grams[layer], expected, rtol=1e-6)
    expected = (1.0 * sources[0].features["relu4_2"] + 3.0 * sources[2].features["relu4_2"]) / 4
    np.testing.assert_allclose(targets.features["relu4_2"], expected, rtol=1e-6)


def test_weighted_sum_of_losses_equals_scaled_loss_against_the_blend() -> None:
    """Σᵢ sᵢ‖G − Gᵢ‖² = (Σ sᵢ)‖G − G*‖² + const, for any G (DESIGN.md)."""
    sources = [source(w, 0.0, seed) for seed, w in enumerate([0.2, 1.5, 0.8])]
    blended = blend_targets(sources).grams["relu2_1"].astype(np.float64)
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
    assert targets.features == {} and targets.content_scale == 0.0


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
        blend_targets([source(1.0, 1.0, 1), source(style, content, 2)])


def test_all_zero_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="nothing to blend"):
        blend_targets([source(0.0, 0.0, 1)])


def test_mismatched_shapes_are_refused() -> None:
    odd = source(1.0, 0.0, 2)
    odd = SourceFeatures({**odd.grams, "relu1_1": np.zeros((5, 5), np.float32)}, {}, 1.0, 0.0)
    with pytest.raises(InvalidArgument, match=r"grams\[relu1_1\]: shapes differ"):
        blend_targets([source(1.0, 0.0, 1), odd])
