"""Colour preservation (Gatys et al. 2017): luminance-only transfer and colour matching.

Arrays are H×W×3 RGB, float32 in [0, 1].
"""

from __future__ import annotations

import numpy as np

# NTSC YIQ: Y is luminance, I and Q carry the chrominance.
RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64
)
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ)


def to_yiq(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64) @ RGB_TO_YIQ.T


def to_rgb(yiq: np.ndarray) -> np.ndarray:
    return np.clip(yiq @ YIQ_TO_RGB.T, 0.0, 1.0).astype(np.float32)


def luminance(pixels: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """The image's luminance as grey RGB; with a reference, its mean and spread matched to the
    reference's, so that the style's tones sit where the content's do."""
    y = to_yiq(pixels)[..., 0]
    if reference is not None:
        target = to_yiq(reference)[..., 0]
        y = (y - y.mean()) / max(float(y.std()), 1e-6) * target.std() + target.mean()
    return np.repeat(np.clip(y, 0.0, 1.0)[..., None], 3, axis=2).astype(np.float32)


def with_chrominance(grey: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Luminance from `grey` (its first channel), chrominance (I, Q) from `colour`."""
    yiq = to_yiq(colour)
    yiq[..., 0] = grey[..., 0]
    return to_rgb(yiq)


def _sqrtm(covariance: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(covariance)
    values = np.maximum(values, 1e-8)
    return (vectors * values**power) @ vectors.T


def match_colour(pixels: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Move the image's colour mean and covariance onto the reference's: x' = A(x − μ) + μ_ref
    with A = Σ_ref^½ Σ^-½ (the linear transfer of Gatys et al. 2017, section 4.2)."""
    flat = pixels.reshape(-1, 3).astype(np.float64)
    target = reference.reshape(-1, 3).astype(np.float64)
    mean, target_mean = flat.mean(axis=0), target.mean(axis=0)
    transfer = _sqrtm(np.cov(target.T), 0.5) @ _sqrtm(np.cov(flat.T), -0.5)
    moved = (flat - mean) @ transfer.T + target_mean
    return np.clip(moved, 0.0, 1.0).reshape(pixels.shape).astype(np.float32)
