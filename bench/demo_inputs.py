"""Inputs for `make demo-fast`: left and right halves as masks, and a short panning clip.

python -m bench.demo_inputs out
"""

from __future__ import annotations

import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[1] / "clients" / "samples"


def halves(folder: Path, side: int = 512) -> None:
    """White on the left (or right) half with a soft seam, so the styles blend across it."""
    ramp = np.clip((np.arange(side) - side / 2) / (side / 16) + 0.5, 0, 1)
    right = np.tile(ramp, (side, 1))
    for name, mask in (("left", 1 - right), ("right", right)):
        Image.fromarray((mask * 255).astype(np.uint8), "L").save(folder / f"{name}.png")


def panning_clip(folder: Path, frames: int = 48, size: tuple[int, int] = (320, 240)) -> None:
    """A camera pan across the astronaut photo, 24 frames per second."""
    photo = Image.open(SAMPLES / "content" / "astronaut.jpg").convert("RGB")
    width, height = size
    photo = photo.resize((width * 3 // 2, round(photo.height * width * 3 / 2 / photo.width)))
    top = (photo.height - height) // 2
    steps = np.linspace(0, photo.width - width, frames).round().astype(int)
    clip = np.stack([np.asarray(photo.crop((x, top, x + width, top + height))) for x in steps])
    iio.imwrite(folder / "clip.mp4", clip, fps=24)


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "out")
    folder.mkdir(parents=True, exist_ok=True)
    halves(folder)
    panning_clip(folder)
    print(f"wrote {folder}/left.png, {folder}/right.png, {folder}/clip.mp4")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
