"""Encoded images: header checks before any pixel is decoded, decoding to a canvas, encoding.

Pixels travel between services as encoded bytes; arrays are H×W×3 RGB, float32 in [0, 1].
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from services.common.errors import InvalidArgument, ResourceExhausted

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# Our limits replace Pillow's global bomb check, whose error cannot say the image's size.
Image.MAX_IMAGE_PIXELS = None
DECODE_LIMIT_PIXELS = 100_000_000  # what any service decodes at most, whoever calls it
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
WHITE, BLACK = 255, 0  # what transparent pixels are composited over: images, maps
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int  # after the EXIF orientation is applied
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def probe(data: bytes, what: str, max_pixels: int) -> ImageHeader:
    """Read only the header: format and size, checked against `max_pixels` before decoding."""
    if not data:
        raise InvalidArgument(f"{what}: the image is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format or "", image.size
            if fmt not in FORMATS:
                raise InvalidArgument(
                    f"{what}: format {fmt or 'unknown'} is not one of {', '.join(FORMATS)}"
                )
            # The limit first: reading EXIF can allocate the whole canvas (see _orientation).
            if width * height > max_pixels:
                raise ResourceExhausted(
                    f"{what}: {width}×{height} = {width * height:,} pixels is over the limit "
                    f"of {max_pixels:,} pixels"
                )
            if _orientation(image) in _TRANSPOSED:
                width, height = height, width
    except (InvalidArgument, ResourceExhausted):
        raise
    except Exception as error:
        raise InvalidArgument(f"{what}: not a readable image ({_reason(error)})") from error
    return ImageHeader(fmt, width, height)


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation, if the header has one, read without decoding any pixel.

    Pillow's PNG getexif() decodes the whole image to look for an eXIf chunk after the pixels:
    a 60-byte file claiming 5000×20,000,000 pixels then takes seconds and gigabytes before any
    limit is checked. So a PNG's orientation comes only from an eXIf chunk before its pixels
    (where writers put it); one after them is still applied when the image is decoded.
    """
    try:
        if image.format == "PNG":
            raw = image.info.get("exif")
            if not isinstance(raw, bytes):
                return None
            exif = Image.Exif()
            exif.load(raw)
            return exif.get(_EXIF_ORIENTATION)
        return image.getexif().get(_EXIF_ORIENTATION)
    except (OSError, SyntaxError, ValueError, struct.error):
        return None  # a truncated file: decoding will say so


def fit_inside(width: int, height: int, side: int) -> tuple[int, int]:
    """The size with the same aspect ratio whose longest side is `side` (each side at least 1)."""
    scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode(
    data: bytes,
    what: str = "image",
    background: int = WHITE,
    max_pixels: int = DECODE_LIMIT_PIXELS,
) -> Image.Image:
    """Decode fully (a truncated file fails here), upright, as 8-bit RGB (see `to_rgb`)."""
    probe(data, what, max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image), background)
    except Exception as error:
        raise InvalidArgument(f"{what}: cannot decode the image ({_reason(error)})") from error


def check_decodes(data: bytes, what: str, max_pixels: int) -> ImageHeader:
    """The header, once every pixel has been decoded: what the services will decode later."""
    header = probe(data, what, max_pixels)
    decode(data, what, max_pixels=max_pixels)
    return header


def to_rgb(image: Image.Image, background: int = WHITE) -> Image.Image:
    """Any mode Pillow opens as 8-bit RGB, each value scaled, not clipped, to 0…255.

    Pillow's own convert("RGB") clips the wide modes at 255 (a 16-bit gradient comes out almost
    white) and drops alpha (showing whatever colour hides under a transparent pixel). Here 16-bit
    modes are scaled by 255/65535, "I" (how 16-bit samples arrive in a 32-bit container) the same
    after clipping to 0…65535, "F" is taken as 0…1, and transparency (an alpha band, or a
    palette's or a colour's `transparency`) is composited over `background`, a grey level.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        values = np.asarray(image)
        if mode == "F":
            unit = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)
            grey = (unit * 255.0 + 0.5).astype(np.uint8)
        else:
            wide = np.clip(values, 0, 65535).astype(np.uint32)
            grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "La":  # premultiplied: Pillow converts it only to LA
        image, mode = image.convert("LA"), "LA"
    if "A" in mode or mode == "RGBa" or "transparency" in image.info:
        rgba = image.convert("RGBA")
        behind = Image.new("RGBA", rgba.size, (background, background, background, 255))
        return Image.alpha_composite(behind, rgba).convert("RGB")
    return image.convert("RGB")


def _reason(error: Exception) -> str:
    """Pillow's message without the repr of our buffer (`<_io.BytesIO object at 0x…>`)."""
    if isinstance(error, UnidentifiedImageError):
        return f"not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} file"
    return (
        re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error))
        or type(error).__name__
    )


def to_canvas(data: bytes, width: int, height: int, what: str = "image") -> np.ndarray:
    """Decode and resize to cover width×height, centre-cropped: no distortion, no borders."""
    image = ImageOps.fit(decode(data, what), (width, height), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


def to_mask(data: bytes, width: int, height: int, what: str = "map") -> np.ndarray:
    """A greyscale influence map over the canvas, H×W float32 in [0, 1], fitted like a source."""
    image = decode(data, what, background=BLACK).convert("L")  # transparent: not painted
    fitted = ImageOps.fit(image, (width, height), Image.Resampling.BILINEAR)
    return np.asarray(fitted, dtype=np.float32) / 255.0


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str = "PNG", **options: object) -> bytes:
    """Encode an H×W×3 array (uint8, or float in [0, 1])."""
    if pixels.dtype != np.uint8:
        pixels = to_uint8(pixels)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format=fmt, **options)
    return buffer.getvalue()


def with_text(png: bytes, keyword: str, text: str) -> bytes:
    """The PNG with an iTXt chunk added before IEND; the pixels are not touched."""
    if not png.startswith(b"\x89PNG\r\n\x1a\n") or png[-12:-8] != b"\x00\x00\x00\x00":
        raise ValueError("not a PNG that ends with IEND")
    body = b"iTXt" + keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    return png[:-12] + chunk + png[-12:]


def encode_preview(pixels: np.ndarray) -> bytes:
    return encode(pixels, "JPEG", quality=90)
