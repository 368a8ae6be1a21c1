"""`styleblend video`: frames in, stylised frames out, steadier with --temporal, inputs checked."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from clients.cli.main import main
from clients.cli.video import MOTION_SCALE, steady
from services.common.errors import InvalidArgument
from services.common.faststyliser import FastStyliser

FPS = 12


@pytest.fixture(autouse=True)
def spawn_ffmpeg(monkeypatch: pytest.MonkeyPatch) -> None:
    """imageio-ffmpeg starts ffmpeg through fork() (to put it in its own process group), and
    with this session's gRPC servers running (conftest's `graph`) the child fails in gRPC's fork
    handling before ffmpeg starts. Without the process group ffmpeg is spawned instead."""
    monkeypatch.setenv("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")


def write_clip(path: Path, clip: np.ndarray) -> Path:
    iio.imwrite(path, clip, plugin="FFMPEG", fps=FPS, macro_block_size=1)
    return path


def moving_square(path: Path, frames: int = 12, size: tuple[int, int] = (64, 48)) -> Path:
    width, height = size
    clip = np.full((frames, height, width, 3), 40, np.uint8)
    for t in range(frames):
        clip[t, 10:26, 4 + 3 * t : 20 + 3 * t] = (230, 200, 60)
    return write_clip(path, clip)


def read(path: Path) -> np.ndarray:
    return np.stack(list(iio.imiter(path)))[..., :3]


def flicker(frames: np.ndarray) -> float:
    """Mean absolute change from one frame to the next."""
    return float(np.abs(np.diff(frames.astype(np.float64), axis=0)).mean())


def styles(model: Path) -> list[str]:
    return ["--model", str(model), "--style", "starry=0.7", "--style", "scream=0.3"]


def test_a_clip_round_trips_with_its_frame_count_size_and_rate(
    fast_model_dir: Path, tmp_path: Path
) -> None:
    clip = moving_square(tmp_path / "in.mp4")
    out = tmp_path / "out.mp4"
    assert main(["video", str(clip), "-o", str(out), *styles(fast_model_dir)]) == 0
    frames = read(out)
    assert frames.shape == (12, 48, 64, 3)
    assert iio.immeta(out, plugin="FFMPEG")["fps"] == FPS
    assert np.abs(frames.astype(float) - read(clip).astype(float)).mean() > 5  # it was stylised
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]  # no temp file


@pytest.mark.parametrize(
    ("name", "size", "shape"),
    [("small.gif", 32, (12, 24, 32, 3)), ("big.webm", 96, (12, 72, 96, 3))],
)
def test_size_resizes_frames_to_the_longest_side(
    fast_model_dir: Path, tmp_path: Path, name: str, size: int, shape: tuple[int, ...]
) -> None:
    clip = moving_square(tmp_path / "in.mp4")
    out = tmp_path / name
    assert (
        main(["video", str(clip), "-o", str(out), *styles(fast_model_dir), "--size", str(size)])
        == 0
    )
    assert read(out).shape == shape


def test_strength_zero_gives_back_the_clip(fast_model_dir: Path, tmp_path: Path) -> None:
    clip = moving_square(tmp_path / "in.mp4")
    out = tmp_path / "out.mp4"
    assert (
        main(["video", str(clip), "-o", str(out), *styles(fast_model_dir), "--strength", "0"]) == 0
    )
    assert np.abs(read(out).astype(float) - read(clip).astype(float)).mean() < 3  # codec only


def test_temporal_steadies_a_flickering_network_end_to_end(
    fast_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scene = np.random.default_rng(0).integers(30, 220, (1, 48, 64, 3), np.uint8)
    clip = write_clip(tmp_path / "still.mp4", np.repeat(scene, 12, axis=0))
    stylise, rng = FastStyliser.stylise, np.random.default_rng(1)

    def flickering(self: FastStyliser, pixels: np.ndarray, mix: np.ndarray) -> np.ndarray:
        # Flicker strong enough to survive the codec, unlike an untrained network's.
        return stylise(self, pixels, mix) + rng.normal(0, 0.1, pixels.shape).astype(np.float32)

    monkeypatch.setattr(FastStyliser, "stylise", flickering)
    runs = {}
    for temporal in ("0", "0.8"):
        out = tmp_path / f"out-{temporal}.mp4"
        args = ["video", str(clip), "-o", str(out), *styles(fast_model_dir), "--temporal", temporal]
        assert main(args) == 0
        runs[temporal] = read(out)
    assert flicker(runs["0.8"]) < 0.5 * flicker(runs["0"])


def test_temporal_blending_lowers_flicker_where_the_scene_is_still() -> None:
    rng = np.random.default_rng(0)
    scene, styled = rng.random((16, 16, 3)), rng.random((16, 16, 3))
    # A still scene with sensor noise well under MOTION_SCALE; the network flickers much more.
    frames = [scene + rng.normal(0, MOTION_SCALE / 10, scene.shape) for _ in range(20)]
    stylised = [styled + rng.normal(0, 0.1, scene.shape) for _ in range(20)]

    def run(temporal: float) -> np.ndarray:
        out: list[np.ndarray] = []
        for t, (frame, current) in enumerate(zip(frames, stylised, strict=True)):
            previous = (out[-1], frames[t - 1]) if out else (None, None)
            out.append(steady(current, previous[0], frame, previous[1], temporal))
        return np.stack(out)

    assert flicker(run(0.8)) < 0.5 * flicker(run(0.0))
    np.testing.assert_array_equal(run(0.0), np.stack(stylised))


def test_temporal_blending_follows_the_formula_and_leaves_moving_pixels() -> None:
    rng = np.random.default_rng(0)
    frame = rng.random((8, 8, 3), dtype=np.float32)
    moved = frame.copy()
    moved[:, 4:] = 1 - moved[:, 4:]
    before, current = rng.random((8, 8, 3)), rng.random((8, 8, 3))
    out = steady(current, before, moved, frame, temporal=0.8)
    still, moving = np.s_[:, :4], np.s_[:, 4:]
    np.testing.assert_allclose(out[still], 0.8 * before[still] + 0.2 * current[still])
    m = 0.8 * np.exp(-np.abs(moved - frame).mean(axis=2, keepdims=True) / MOTION_SCALE)
    np.testing.assert_allclose(out, m * before + (1 - m) * current)
    assert np.abs(out[moving] - current[moving]).max() < 0.05 * np.abs(before - current).max()


@pytest.mark.parametrize(
    ("clip", "extra", "message"),
    [
        ("in.mp4", ["--style", "monet=1"], "has no style 'monet' (starry, scream, matisse)"),
        ("in.mp4", ["--style", "identity=1"], "--strength mixes in the clip itself"),
        ("in.mp4", ["--style", "starry=0"], "at least one weight must be > 0"),
        ("in.mp4", ["--model", "nowhere"], "no fast model in nowhere"),
        ("in.mp4", ["--model", "nowhere"], "python -m export.train_fast ... -o nowhere"),
        ("missing.mp4", [], "no such file: missing.mp4"),
        ("notes.mp4", [], "cannot read notes.mp4 as a video"),
        ("in.mp4", ["-o", "out.txt"], "cannot write .txt; give one of .mp4,"),
    ],
)
def test_bad_inputs_are_named_and_leave_no_output(
    fast_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], clip: str, extra: list[str], message: str,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    moving_square(tmp_path / "in.mp4")
    (tmp_path / "notes.mp4").write_text("not a video")
    model = [] if "--model" in extra else ["--model", str(fast_model_dir)]
    style = [] if "--style" in extra else ["--style", "starry"]
    assert main(["video", clip, "-o", "out.mp4", *model, *style, *extra]) == 1
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "notes.mp4"]


def test_a_failure_halfway_leaves_no_partial_output(
    fast_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    clip = moving_square(tmp_path / "in.mp4")
    stylise = FastStyliser.stylise
    calls = 0

    def failing(self: FastStyliser, pixels: np.ndarray, mix: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise InvalidArgument("frame 5 went wrong")
        return stylise(self, pixels, mix)

    monkeypatch.setattr(FastStyliser, "stylise", failing)
    assert main(["video", str(clip), "-o", str(tmp_path / "out.mp4"), *styles(fast_model_dir)]) == 1
    assert "frame 5 went wrong" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--style", "starry=-1", "the weight must be a finite number >= 0"),
        ("--style", "starry=inf", "the weight must be a finite number >= 0"),
        ("--style", "starry=lots", "the weight 'lots' is not a number"),
        ("--style", "=0.5", "give NAME=WEIGHT"),
        ("--strength", "1.5", "1.5 is not within 0..1"),
        ("--temporal", "-0.1", "-0.1 is not within 0..1"),
        ("--temporal", "x", "'x' is not a number"),
        ("--size", "4", "4 is too small"),
    ],
)
def test_bad_flags_are_refused_by_the_parser(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["video", "in.mp4", "-o", "out.mp4", "--style", "starry", f"{flag}={value}"])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
