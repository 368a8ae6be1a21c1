"""`styleblend video`: frames in, stylised frames out, steadier with --temporal, inputs checked."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from clients.cli.main import main
from clients.cli.video import steady


def moving_square(path: Path, frames: int = 12, size: tuple[int, int] = (64, 48)) -> Path:
    width, height = size
    clip = np.full((frames, height, width, 3), 40, np.uint8)
    for t in range(frames):
        clip[t, 10:26, 4 + 3 * t : 20 + 3 * t] = (230, 200, 60)
    imageio.mimwrite(path, list(clip), fps=12, macro_block_size=1)
    return path


def read(path: Path) -> np.ndarray:
    return np.stack([frame for frame in imageio.get_reader(path).iter_data()])


def test_a_clip_round_trips_with_its_frame_count_and_size(
    fast_model_dir: Path, tmp_path: Path
) -> None:
    clip = moving_square(tmp_path / "in.mp4")
    out, small = tmp_path / "out.mp4", tmp_path / "small.gif"
    args = ["--model", str(fast_model_dir), "--style", "starry=0.7", "--style", "scream=0.3"]
    assert main(["video", str(clip), "-o", str(out), *args, "--temporal", "0.5"]) == 0
    frames = read(out)
    assert frames.shape == (12, 48, 64, 3)
    assert np.abs(frames.astype(float) - read(clip).astype(float)).mean() > 5  # it was stylised
    assert main(["video", str(clip), "-o", str(small), *args, "--size", "32"]) == 0
    assert read(small).shape == (12, 24, 32, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4", "small.gif"]


def test_temporal_blending_steadies_still_pixels_and_leaves_moving_ones() -> None:
    rng = np.random.default_rng(0)
    frame = rng.random((8, 8, 3), dtype=np.float32)
    moved = frame.copy()
    moved[:, 4:] = 1 - moved[:, 4:]
    before, flicker = rng.random((8, 8, 3)), rng.random((8, 8, 3))
    out = steady(flicker, before, moved, frame, temporal=0.8)
    still, moving = np.s_[:, :4], np.s_[:, 4:]
    np.testing.assert_allclose(out[still], 0.8 * before[still] + 0.2 * flicker[still])
    assert np.abs(out[moving] - flicker[moving]).max() < 0.05 * np.abs(before - flicker).max()
    np.testing.assert_array_equal(steady(flicker, before, moved, frame, temporal=0.0), flicker)


@pytest.mark.parametrize(
    ("clip", "extra", "message"),
    [
        ("in.mp4", ["--style", "monet=1"], "has no style 'monet' (starry, scream, matisse)"),
        ("in.mp4", ["--style", "starry=0"], "at least one weight must be > 0"),
        ("in.mp4", ["--style", "starry", "--model", "nowhere"], "no fast model in nowhere; train"),
        ("missing.mp4", ["--style", "starry"], "no such file: missing.mp4"),
        ("notes.mp4", ["--style", "starry"], "cannot read notes.mp4 as a video"),
    ],
)
def test_bad_inputs_are_named_and_leave_no_output(
    fast_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clip: str,
    extra: list[str], message: str,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    moving_square(tmp_path / "in.mp4")
    (tmp_path / "notes.mp4").write_text("not a video")
    model = [] if "--model" in extra else ["--model", str(fast_model_dir)]
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        main(["video", clip, "-o", "out.mp4", *model, *extra])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "notes.mp4"]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--style", "starry=-1", "must be a finite number >= 0"),
     ("--strength", "1.5", "1.5 is not within 0..1"), ("--temporal", "x", "'x' is not a number")],
)  # fmt: skip
def test_bad_flags_are_refused_by_the_parser(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["video", "in.mp4", "-o", "out.mp4", "--style", "starry", flag, value])
    assert message in capsys.readouterr().err
