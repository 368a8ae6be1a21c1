import numpy as np
import pytest

from services.common.guides import area_weights, to_layer


def test_each_cell_averages_its_block() -> None:
    mask = np.arange(64, dtype=np.float32).reshape(8, 8)
    small = to_layer(mask, 2, 2, stride=4)
    expected = mask.reshape(2, 4, 2, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(small, expected, rtol=1e-6)


def test_rounding_down_drops_the_partial_block_and_rounding_up_keeps_it() -> None:
    weights_down = area_weights(43, 5, stride=8)  # VGG at 43 px: 5 cells, 3 pixels dropped
    assert weights_down[:, 40:].sum() == 0
    weights_up = area_weights(43, 6, stride=8)  # SAME padding: a 6th cell on the last 3 pixels
    np.testing.assert_allclose(weights_up[5, 40:], 1 / 3)
    np.testing.assert_allclose(weights_up.sum(axis=1), 1.0)


def test_soft_edges_stay_soft_and_halves_stay_halves() -> None:
    mask = np.zeros((64, 64), np.float32)
    mask[:, :32] = 1.0
    small = to_layer(mask, 8, 8, stride=8)
    assert (small[:, :4] == 1).all() and (small[:, 4:] == 0).all()
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    assert np.all(np.diff(to_layer(ramp, 4, 4, stride=16)[0]) > 0)


def test_cells_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="7 cells of stride 8 do not fit in 43 pixels"):
        area_weights(43, 7, stride=8)
