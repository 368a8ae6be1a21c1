"""Training photos brought down to size in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.photos import main, shrink


def _photo(path: Path, size: tuple[int, int], orientation: int = 1) -> Path:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 2] = (250, 10, 10)  # a red left half, to see which way it turned
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif)
    return path


def test_a_large_photo_shrinks_to_the_side_keeping_its_shape(tmp_path: Path) -> None:
    path = _photo(tmp_path / "wide.jpg", (3000, 2000))
    assert shrink(path, 600)
    assert Image.open(path).size == (600, 400)


def test_a_small_upright_photo_is_left_byte_for_byte(tmp_path: Path) -> None:
    path = _photo(tmp_path / "small.jpg", (300, 200))
    before = path.read_bytes()
    assert not shrink(path, 600)
    assert path.read_bytes() == before


def test_the_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = _photo(tmp_path / "turned.jpg", (300, 200), orientation=6)  # to be turned 90° clockwise
    assert shrink(path, 600)
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert image.shape[:2] == (300, 200)  # now portrait
    top, bottom = image[:40].mean(axis=(0, 1)), image[-40:].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 60, top  # the red left half is on top now
    assert abs(bottom[0] - 127) < 40, bottom


def test_the_command_names_an_unreadable_file_and_keeps_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _photo(tmp_path / "good.jpg", (900, 300))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit) as exit:
        main([str(good), str(bad), "--largest", "300"])
    assert exit.value.code == 2
    assert f"{bad}: not a readable image" in capsys.readouterr().err
    assert Image.open(good).size == (300, 100)  # done before the bad one: kept
    assert bad.read_bytes() == b"not a jpeg"
