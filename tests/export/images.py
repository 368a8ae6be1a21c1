"""The bundled sample images (clients/samples), as feature models take them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[2] / "clients" / "samples"


def load_image(name: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """clients/samples/<name> as a 1×3×H×W RGB tensor in [0, 1]; `size` is (width, height)."""
    image = Image.open(SAMPLES / name).convert("RGB")
    if size is not None:
        image = image.resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous()
