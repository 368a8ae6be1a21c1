import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from services.common import images
from services.common.errors import InvalidArgument, ResourceExhausted


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size without the pixels to back it: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)


def test_probe_reads_format_and_size() -> None:
    header = images.probe(png(40, 30), "sources[0] image", max_pixels=10_000)
    assert (header.format, header.width, header.height) == ("PNG", 40, 30)


def test_probe_refuses_a_bomb_from_its_header() -> None:
    with pytest.raises(ResourceExhausted, match=r"sources\[1\] image: 100000×100000 .* 1,000,000"):
        images.probe(png_header_only(100_000, 100_000), "sources[1] image", max_pixels=1_000_000)


@pytest.mark.parametrize("data", [b"", b"not an image", png(8, 8)[:20]])
def test_probe_refuses_garbage(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match="sources\\[2\\] image"):
        images.probe(data, "sources[2] image", max_pixels=1_000_000)


def test_truncated_image_fails_at_decode_with_its_name() -> None:
    data = images.encode(np.random.default_rng(0).random((64, 64, 3)), "JPEG")
    with pytest.raises(InvalidArgument, match="init_image: cannot decode"):
        images.to_canvas(data[: len(data) // 2], 32, 32, "init_image")


def test_to_canvas_covers_and_crops_without_distortion() -> None:
    # Left half red, right half blue, 200×100; a 50×50 canvas keeps the middle, half and half.
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, :100] = (255, 0, 0)
    pixels[:, 100:] = (0, 0, 255)
    canvas = images.to_canvas(images.encode(pixels), 50, 50)
    assert canvas.shape == (50, 50, 3) and canvas.dtype == np.float32
    assert canvas[:, :20, 0].min() > 0.95 and canvas[:, 30:, 2].min() > 0.95


def test_exif_rotation_is_applied() -> None:
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: stored 60×20, shown 20×60
    Image.new("RGB", (60, 20)).save(buffer, "JPEG", exif=exif)
    header = images.probe(buffer.getvalue(), "image", 10_000)
    assert (header.width, header.height) == (20, 60)
    assert images.decode(buffer.getvalue()).size == (20, 60)


def test_fit_inside_keeps_aspect() -> None:
    assert images.fit_inside(512, 256, 128) == (128, 64)
    assert images.fit_inside(300, 400, 64) == (48, 64)


def test_encode_round_trip() -> None:
    pixels = (np.random.default_rng(1).random((16, 24, 3)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(images.decode(images.encode(pixels))), pixels)


def test_text_chunk_is_added_without_touching_the_pixels() -> None:
    pixels = (np.random.default_rng(2).random((8, 8, 3)) * 255).astype(np.uint8)
    png = images.with_text(images.encode(pixels), "styleblend", '{"model": "vgg19", "é": 1}')
    image = Image.open(io.BytesIO(png))
    assert image.text["styleblend"] == '{"model": "vgg19", "é": 1}'  # type: ignore[attr-defined]
    np.testing.assert_array_equal(np.asarray(image), pixels)
