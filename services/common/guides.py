"""Guides (influence maps) at a feature layer's resolution.

A feature-map cell at stride s summarises the s×s block of input pixels it sits on, so a mask
is brought to a layer by averaging it over those blocks (area resampling). Averaging keeps soft
edges soft and counts every pixel once; nearest-neighbour sampling would alias thin strokes and
bilinear sampling would skip most pixels at strides of 8 or 16.
"""

from __future__ import annotations

import numpy as np


def area_weights(n_in: int, n_out: int, stride: int) -> np.ndarray:
    """(n_out × n_in) matrix: output cell i is the mean of input pixels [i·s, (i+1)·s) ∩ [0, n_in).

    Layers that round down (VGG's max pooling) drop the last partial block; layers that round
    up (TensorFlow's SAME padding) average what there is of it.
    """
    starts = np.arange(n_out)[:, None] * stride
    pixels = np.arange(n_in)[None, :]
    covered = (pixels >= starts) & (pixels < np.minimum(starts + stride, n_in))
    weights = covered.astype(np.float64)
    counts = weights.sum(axis=1, keepdims=True)
    if (counts == 0).any():
        raise ValueError(f"{n_out} cells of stride {stride} do not fit in {n_in} pixels")
    return weights / counts


def to_layer(mask: np.ndarray, height: int, width: int, stride: int) -> np.ndarray:
    """An H×W mask averaged onto a height×width feature map of the given stride."""
    rows = area_weights(mask.shape[0], height, stride)
    columns = area_weights(mask.shape[1], width, stride)
    return (rows @ mask.astype(np.float64) @ columns.T).astype(np.float32)
