"""Training photos brought down in place to at most 1920 px a side (EXIF orientation applied).

The universal decoders train on crops downscaled to 128–256 px, so pixels beyond that side buy
nothing but memory: a 6000×4000 wallpaper alone holds 72 MB decoded.

    python -m export.photos data/photos/*.jpg
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps

LARGEST_SIDE_PX = 1920
JPEG_QUALITY = 92


def shrink(path: Path, largest: int = LARGEST_SIDE_PX) -> bool:
    """Rewrite `path` at most `largest` px a side; False if it was small enough already."""
    with Image.open(path) as opened:
        if max(opened.size) <= largest and opened.getexif().get(0x0112, 1) == 1:
            return False
        image = ImageOps.exif_transpose(opened).convert("RGB")
    image.thumbnail((largest, largest), Image.Resampling.LANCZOS)
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="JPEG", quality=JPEG_QUALITY)
    partial.replace(path)  # a crash mid-write leaves the original
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.photos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("photos", type=Path, nargs="+")
    parser.add_argument("--largest", type=int, default=LARGEST_SIDE_PX, help="px a side")
    args = parser.parse_args(argv)
    if args.largest < 16:
        parser.error(f"--largest must be at least 16 px, got {args.largest}")
    missing = [str(p) for p in args.photos if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    shrunk = 0
    for path in args.photos:
        try:
            shrunk += shrink(path, args.largest)
        except (OSError, Image.DecompressionBombError) as error:  # the others are kept
            parser.error(f"{path}: not a readable image ({error})")
    print(f"{shrunk} of {len(args.photos)} photos brought down to {args.largest} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
