"""A labelled grid of pictures, rows of (label, image): the benchmarks' side-by-side sheets."""

from __future__ import annotations

from PIL import Image, ImageDraw


def contact_sheet(rows: list[list[tuple[str, Image.Image]]]) -> Image.Image:
    """Each tile fitted, aspect kept, into the largest tile's box, its label above it."""
    width = max(t.width for row in rows for _, t in row)
    height = max(t.height for row in rows for _, t in row)
    picture = Image.new("RGB", (len(rows[0]) * (width + 4), len(rows) * (height + 20)), "white")
    draw = ImageDraw.Draw(picture)
    for r, row in enumerate(rows):
        for c, (label, tile) in enumerate(row):
            x, y = c * (width + 4), r * (height + 20)
            tile = tile.convert("RGB")
            tile.thumbnail((width, height))
            picture.paste(tile, (x, y + 18))
            draw.text((x + 2, y + 3), label, fill="black")
    return picture
