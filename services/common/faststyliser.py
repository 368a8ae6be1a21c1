"""A trained feed-forward network on ONNX Runtime: a content image and a style mix in, a picture
out. Run by the features service and by `styleblend video`, which stylises frames locally."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.common.errors import InvalidArgument
from services.common.fastmodel import FastManifest
from services.common.providers import (
    DEFAULT_TENSORRT,
    TensorRTSettings,
    choose_providers,
    session_providers,
)

log = logging.getLogger(__name__)


class FastStyliser:
    """Both exports of a trained network: one style mix per image, or one per pixel."""

    def __init__(
        self,
        folder: Path,
        providers: Sequence[str],
        intra_op_threads: int = 0,
        tensorrt: TensorRTSettings = DEFAULT_TENSORRT,
    ) -> None:
        self.manifest = FastManifest.load(folder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        chosen = choose_providers(providers, ort.get_available_providers())
        n = len(self.manifest.styles)
        self._uniform = ort.InferenceSession(
            str(folder / self.manifest.onnx_file),
            sess_options=options,
            providers=session_providers(
                chosen,
                tensorrt,
                lambda side: {"image": (1, 3, side, side), "style_weights": (1, n)},
            ),
        )
        self._per_pixel = ort.InferenceSession(
            str(folder / self.manifest.per_pixel_onnx_file),
            sess_options=options,
            providers=session_providers(
                chosen,
                tensorrt,
                lambda side: {"image": (1, 3, side, side), "style_weights": (1, n, side, side)},
            ),
        )
        self.providers: list[str] = self._uniform.get_providers()
        log.info("fast model %s on ONNX Runtime, providers %s", self.manifest.name, self.providers)

    @property
    def styles(self) -> int:
        return len(self.manifest.styles)

    def stylise(self, pixels: np.ndarray, mix: np.ndarray) -> np.ndarray:
        """H×W×3 in [0, 1] and a mix of N weights (or N×H×W, per pixel) → H×W×3 in [0, 1].

        Sides are padded by reflection up to the network's multiple and cropped back.
        """
        height, width = self._check(pixels, mix)
        multiple = self.manifest.multiple
        pad = ((0, -height % multiple), (0, -width % multiple))
        image = np.pad(pixels, (*pad, (0, 0)), mode="reflect").transpose(2, 0, 1)[None]
        if mix.ndim == 1:
            session, weights = self._uniform, mix[None]
        else:
            session, weights = self._per_pixel, np.pad(mix, ((0, 0), *pad), mode="edge")[None]
        (out,) = session.run(
            None,
            {"image": np.ascontiguousarray(image, np.float32),
             "style_weights": np.ascontiguousarray(weights, np.float32)},
        )  # fmt: skip
        return out[0, :, :height, :width].transpose(1, 2, 0)

    def _check(self, pixels: np.ndarray, mix: np.ndarray) -> tuple[int, int]:
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise InvalidArgument(f"the image must be H×W×3, got shape {pixels.shape}")
        height, width = pixels.shape[:2]
        if min(height, width) < 2:
            raise InvalidArgument(f"the image must be at least 2×2 pixels, got {width}×{height}")
        if mix.ndim not in (1, 3) or mix.shape[0] != self.styles:
            raise InvalidArgument(
                f"the style mix must be {self.styles} weights or {self.styles}×H×W, "
                f"got shape {mix.shape}"
            )
        if mix.ndim == 3 and mix.shape[1:] != (height, width):
            raise InvalidArgument(
                f"a per-pixel style mix must match the image's {height}×{width}, "
                f"got {mix.shape[1]}×{mix.shape[2]}"
            )
        if not np.all(np.isfinite(mix)) or np.any(mix < 0):
            raise InvalidArgument("style mix weights must be finite and non-negative")
        return height, width
