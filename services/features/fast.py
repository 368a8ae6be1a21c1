"""The trained feed-forward networks the features service serves, found by name."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.common import colour, images
from services.common.config import EXTRACT_PIXELS, EXTRACT_SIDE_PX
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.fastmodel import FAST_MANIFEST_FILE
from services.common.faststyliser import FastStyliser
from services.common.providers import DEFAULT_TENSORRT, TensorRTSettings
from services.common.stylemix import Region, StyleSource, mix_styles
from services.features.core import check_run_size


class FastModels:
    """Every trained network in a folder (one subfolder each), loaded once, found by name."""

    def __init__(
        self,
        root: Path,
        providers: Sequence[str],
        intra_op_threads: int = 0,
        tensorrt: TensorRTSettings = DEFAULT_TENSORRT,
        max_side_px: int = EXTRACT_SIDE_PX,
        max_pixels: int = EXTRACT_PIXELS,
    ) -> None:
        self.root = root
        self.max_side_px = max_side_px
        self.max_pixels = max_pixels
        folders = sorted(p.parent for p in root.glob(f"*/{FAST_MANIFEST_FILE}"))
        self.models = {
            folder.name: FastStyliser(folder, providers, intra_op_threads, tensorrt)
            for folder in folders
        }

    def get(self, name: str) -> FastStyliser:
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise FailedPrecondition(
                f"no fast model named {name!r} in {self.root} (there are: {known}); "
                "train one with `make fast-model` or `python -m export.train_fast`"
            )
        return self.models[name]

    def check_size(self, width: int, height: int) -> None:
        if width < 2 or height < 2:
            raise InvalidArgument(
                f"width_px and height_px must be at least 2, got {width}×{height}"
            )
        check_run_size(width, height, self.max_side_px, self.max_pixels)

    def style_mix(
        self,
        name: str,
        width: int,
        height: int,
        sources: Sequence[StyleSource],
        regions: Sequence[Region],
        strength: float,
    ) -> np.ndarray:
        """The network's style weights for these sources at width × height (stylemix.py)."""
        manifest = self.get(name).manifest
        self.check_size(width, height)
        styles, identity = len(manifest.styles), manifest.identity
        return mix_styles(sources, regions, styles, identity, strength, (width, height))

    def stylise(
        self,
        name: str,
        image: bytes,
        width: int,
        height: int,
        mix: np.ndarray,
        keep_chrominance: bool,
    ) -> tuple[bytes, float]:
        """PNG bytes of the network's image at width × height, and the milliseconds it took."""
        styliser = self.get(name)
        self.check_size(width, height)
        content = images.to_canvas(image, width, height, "image")
        started = time.perf_counter()
        pixels = styliser.stylise(content, mix)
        milliseconds = (time.perf_counter() - started) * 1000
        if keep_chrominance:
            pixels = colour.with_chrominance(colour.luminance(pixels), content)
        return images.encode(pixels), milliseconds
