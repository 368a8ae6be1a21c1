"""Every mode Pillow opens comes out as 8-bit RGB scaled, not clipped (issue 12 §3)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from services.common import images

WIDTH = 256
RAMP = np.linspace(0.0, 1.0, WIDTH)  # left to right, black to white


def saved(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(images.decode(data, "sources[0] image"), dtype=np.int32)


def grey(values: np.ndarray) -> np.ndarray:
    """The expected H×W×3 image of one row of 8-bit grey levels, four rows high."""
    return np.repeat(np.tile(values.astype(np.int32), (4, 1))[..., None], 3, axis=2)


def assert_close(got: np.ndarray, want: np.ndarray, tolerance: int = 1) -> None:
    assert got.shape == want.shape
    worst = int(np.abs(got - want).max())
    assert worst <= tolerance, f"off by up to {worst} levels (allowed {tolerance})"


SIXTEEN = np.round(RAMP * 65535).astype(np.uint16)
SIXTEEN_AS_8 = np.round(SIXTEEN.astype(np.float64) * 255 / 65535)


@pytest.mark.parametrize(
    ("mode", "fmt", "dtype"),
    [("I;16", "PNG", "<u2"), ("I;16", "TIFF", "<u2"), ("I;16B", "TIFF", ">u2"),
     ("I;16L", "TIFF", "<u2")],
)  # fmt: skip
def test_sixteen_bit_grey_is_scaled_not_clipped(mode: str, fmt: str, dtype: str) -> None:
    row = np.tile(SIXTEEN.astype(dtype), (4, 1))
    image = Image.frombytes(mode, (WIDTH, 4), row.tobytes())
    data = saved(image, fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    assert_close(decoded(data), grey(SIXTEEN_AS_8))


def test_thirty_two_bit_integers_are_sixteen_bit_samples_clipped_to_their_range() -> None:
    values = np.concatenate([[-500, 70_000], SIXTEEN[2:]]).astype(np.int32)
    data = saved(Image.fromarray(np.tile(values, (4, 1)), "I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert_close(decoded(data), grey(np.concatenate([[0, 255], SIXTEEN_AS_8[2:]])))


def test_floats_are_zero_to_one() -> None:
    values = np.concatenate([[-1.0, 2.0, np.nan], RAMP[3:]]).astype(np.float32)
    data = saved(Image.fromarray(np.tile(values, (4, 1)), "F"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert_close(decoded(data), grey(np.round(np.concatenate([[0, 1, 0], RAMP[3:]]) * 255)))


EIGHT = np.round(RAMP * 255).astype(np.uint8)


@pytest.mark.parametrize(("fmt", "opens_as"), [("PNG", "L"), ("TIFF", "L"), ("BMP", "L")])
def test_eight_bit_grey(fmt: str, opens_as: str) -> None:
    data = saved(Image.fromarray(np.tile(EIGHT, (4, 1)), "L"), fmt)
    assert Image.open(io.BytesIO(data)).mode == opens_as
    assert_close(decoded(data), grey(EIGHT), tolerance=0)


def test_one_bit() -> None:
    bilevel = Image.fromarray(np.tile(EIGHT, (4, 1)), "L").convert("1", dither=None)
    data = saved(bilevel, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    white = np.asarray(bilevel.convert("L")) > 0  # dithered: each row its own
    assert not white[:, 0].any() and white[:, -1].all()
    want = np.repeat(np.where(white, 255, 0)[..., None], 3, axis=2)
    assert_close(decoded(data), want, tolerance=0)


def colour_ramp() -> np.ndarray:
    """4×256×3: red rises, green falls, blue stays at 64."""
    row = np.stack([EIGHT, EIGHT[::-1], np.full(WIDTH, 64, np.uint8)], axis=-1)
    return np.tile(row[None], (4, 1, 1))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_rgb_and_rgbx(fmt: str) -> None:
    rgb = colour_ramp()
    assert_close(decoded(saved(Image.fromarray(rgb, "RGB"), fmt)), rgb.astype(np.int32), 0)
    rgbx = Image.fromarray(rgb, "RGB").convert("RGBX")
    assert_close(np.asarray(images.to_rgb(rgbx), np.int32), rgb.astype(np.int32), 0)


def test_palette_without_transparency() -> None:
    rgb = colour_ramp()
    palette = Image.fromarray(rgb, "RGB").quantize(256, dither=Image.Dither.NONE)
    data = saved(palette, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert_close(decoded(data), np.asarray(palette.convert("RGB"), np.int32), 0)


def test_cmyk_is_subtractive() -> None:
    cyan, black = EIGHT, EIGHT[::-1] // 2
    cmyk = np.stack([cyan, np.zeros_like(cyan), np.zeros_like(cyan), black], axis=-1)
    data = saved(Image.fromarray(np.tile(cmyk[None], (4, 1, 1)), "CMYK"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    ink = (1 - black / 255.0) * 255
    want = np.stack([ink * (1 - cyan / 255.0), ink, ink], axis=-1)
    assert_close(decoded(data), np.tile(np.round(want)[None], (4, 1, 1)).astype(np.int32))


def test_ycbcr_grey_is_its_luma() -> None:
    ycbcr = np.stack([EIGHT, np.full(WIDTH, 128, np.uint8), np.full(WIDTH, 128, np.uint8)], -1)
    data = saved(Image.fromarray(np.tile(ycbcr[None], (4, 1, 1)), "YCbCr"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "YCbCr"
    assert_close(decoded(data), grey(EIGHT))


def test_lab_through_a_colour_profile() -> None:
    lab = np.stack([EIGHT, np.full(WIDTH, 128, np.uint8), np.full(WIDTH, 160, np.uint8)], -1)
    image = Image.fromarray(np.tile(lab[None], (4, 1, 1)), "LAB")
    data = saved(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "LAB"
    srgb, space = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
    transform = ImageCms.buildTransformFromOpenProfiles(space, srgb, "LAB", "RGB")
    want = np.asarray(ImageCms.applyTransform(image, transform), np.int32)
    assert_close(decoded(data), want, tolerance=2)
    assert np.all(np.diff(decoded(data)[0, :, 0]) >= 0)  # lightness rises left to right


def test_hsv() -> None:
    hsv = np.stack([EIGHT, np.full(WIDTH, 255, np.uint8), np.full(WIDTH, 255, np.uint8)], -1)
    image = Image.fromarray(np.tile(hsv[None], (4, 1, 1)), "HSV")
    got = np.asarray(images.to_rgb(image), np.int32)
    assert tuple(got[0, 0]) == (255, 0, 0)  # hue 0: red, full saturation and value
    assert tuple(got[0, 85]) == (0, 255, 0) and tuple(got[0, 170]) == (0, 0, 255)


ALPHA = EIGHT  # transparent on the left, opaque on the right


def over(colour: np.ndarray, background: int) -> np.ndarray:
    a = ALPHA[:, None] / 255.0
    return np.tile(np.round(colour * a + background * (1 - a))[None], (4, 1, 1)).astype(np.int32)


COLOUR = np.array([200, 40, 0], np.float64)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_rgba_is_composited_over_white(fmt: str) -> None:
    rgba = np.concatenate([np.tile(COLOUR.astype(np.uint8), (WIDTH, 1)), ALPHA[:, None]], -1)
    options = {"lossless": True} if fmt == "WEBP" else {}
    buffer = io.BytesIO()
    Image.fromarray(np.tile(rgba[None], (4, 1, 1)), "RGBA").save(buffer, fmt, **options)
    assert_close(decoded(buffer.getvalue()), over(COLOUR, 255))


def test_premultiplied_rgba() -> None:
    rgba = np.concatenate([np.tile(COLOUR.astype(np.uint8), (WIDTH, 1)), ALPHA[:, None]], -1)
    image = Image.fromarray(np.tile(rgba[None], (4, 1, 1)), "RGBA").convert("RGBa")
    assert_close(np.asarray(images.to_rgb(image), np.int32), over(COLOUR, 255), tolerance=3)


@pytest.mark.parametrize("mode", ["LA", "La"])
def test_grey_with_alpha(mode: str) -> None:
    la = np.stack([np.full(WIDTH, 100, np.uint8), ALPHA], -1)
    image = Image.fromarray(np.tile(la[None], (4, 1, 1)), "LA")
    if mode == "LA":
        data = saved(image, "PNG")
        assert Image.open(io.BytesIO(data)).mode == "LA"
        got = decoded(data)
    else:
        got = np.asarray(images.to_rgb(image.convert("La")), np.int32)
    assert_close(got, over(np.array([100.0] * 3), 255), tolerance=3 if mode == "La" else 1)


def test_palette_with_a_transparent_index() -> None:
    palette = Image.new("P", (WIDTH, 4), 1)
    palette.putpalette([0, 0, 0, 200, 40, 0])
    palette.paste(0, (0, 0, WIDTH // 2, 4))  # the left half: index 0, black but transparent
    palette.info["transparency"] = 0
    data = saved(palette, "PNG")
    reopened = Image.open(io.BytesIO(data))
    assert reopened.mode == "P" and "transparency" in reopened.info
    got = decoded(data)
    assert np.all(got[:, : WIDTH // 2] == 255) and np.all(got[:, WIDTH // 2 :] == (200, 40, 0))


def test_palette_with_alpha() -> None:
    palette = Image.new("P", (WIDTH, 4), 1)
    palette.putpalette([0, 0, 0, 200, 40, 0])
    image = palette.convert("PA")
    image.putalpha(Image.fromarray(np.tile(ALPHA, (4, 1)), "L"))
    data = saved(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "PA"
    assert_close(decoded(data), over(COLOUR, 255))


def test_grey_with_a_transparent_level() -> None:
    image = Image.fromarray(np.tile(EIGHT, (4, 1)), "L")
    image.info["transparency"] = 0
    data = saved(image, "PNG")
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    got = decoded(data)
    assert np.all(got[:, 0] == 255) and np.all(got[:, 1:] == grey(EIGHT)[:, 1:])


def test_a_transparent_map_is_unpainted() -> None:
    """An influence map's transparent pixels weigh 0, whatever colour hides under them."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255  # white, but transparent on the left half
    rgba[:, 4:, 3] = 255
    mask = images.to_mask(saved(Image.fromarray(rgba, "RGBA"), "PNG"), 8, 8, "sources[1] style_map")
    assert mask[:, :3].max() == 0.0 and mask[:, 5:].min() == 1.0


def test_a_sixteen_bit_gradient_reaches_the_canvas_as_a_gradient() -> None:
    row = np.tile(SIXTEEN, (WIDTH, 1))  # square, so the canvas keeps every column
    canvas = images.to_canvas(saved(Image.fromarray(row), "PNG"), 64, 64)
    assert abs(float(canvas.mean()) - 0.5) < 0.02
    assert canvas[:, :4].max() < 0.08 and canvas[:, -4:].min() > 0.92


@pytest.mark.parametrize(
    ("data", "where"),
    [(b"not an image at all", "probe"), (saved(Image.new("RGB", (64, 64)), "PNG")[:-40], "decode")],
)
def test_errors_name_the_image_not_a_buffer(data: bytes, where: str) -> None:
    with pytest.raises(images.InvalidArgument) as caught:
        if where == "probe":
            images.probe(data, "sources[3].style_map image", 1_000_000)
        else:
            images.decode(data, "sources[3].style_map image")
    message = str(caught.value)
    assert message.startswith("sources[3].style_map image: ")
    assert "BytesIO" not in message and "0x" not in message
