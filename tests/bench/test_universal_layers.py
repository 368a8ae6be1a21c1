"""bench.universal_layers' per-layer yardstick: zero for the targets' own image, and each layer's
error where only that layer differs."""

from __future__ import annotations

import numpy as np

from bench import universal, universal_layers
from bench.large import STYLE_LAYERS, served_net


def test_per_layer_is_zero_for_the_painting_itself_and_counts_each_layer() -> None:
    net = served_net()
    pair = universal.Pair(
        universal.SAMPLES / "content" / "chelsea.jpg",
        universal.SAMPLES / "style" / "the_scream.jpg",
    )
    photo, painting = pair.pixels(64)
    itself = universal_layers.per_layer(
        net, universal.scale_targets(net, painting, painting), painting
    )
    assert len(itself) == len(STYLE_LAYERS) + 2
    assert max(itself) < 1e-6  # float32 features against their own Gram: rounding only
    targets = universal.scale_targets(net, photo, painting)
    errors = universal_layers.per_layer(net, targets, photo)
    assert min(errors[: len(STYLE_LAYERS)]) > 0.05 and errors[-1] < 1e-6  # the photo's own content
    assert np.isclose(errors[len(STYLE_LAYERS)], np.mean(errors[: len(STYLE_LAYERS)]))
