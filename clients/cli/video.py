"""`styleblend video`: every frame of a clip through a trained fast network, on this machine.

Runs the network locally on ONNX Runtime (no graph needed): a video is many frames, and sending
each through the gateway would cost more than stylising it.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
from PIL import Image
from tqdm import tqdm

from services.common.config import FeaturesConfig
from services.common.errors import StyleBlendError
from services.common.fastmodel import FAST_MANIFEST_FILE, IDENTITY, FastManifest
from services.common.faststyliser import FastStyliser
from services.common.stylemix import StyleSource, mix_styles

# Frame differences above a few grey levels (0.03 ≈ 8/255) are motion; below, they are sensor
# noise and compression, which σ must treat as still or the steadying never engages.
MOTION_SCALE = 0.03

OUTPUT_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".gif")
# ffmpeg would put H.264 in a WebM, which the container refuses; VP9 at constant quality.
FFMPEG_CODECS = {".webm": ("libvpx-vp9", ["-crf", "32", "-b:v", "0"])}


class VideoError(Exception):
    """A bad input or a failed read or write, said the way a person can act on it."""


def style_mix(
    manifest: FastManifest, styles: list[tuple[str, float]], strength: float
) -> np.ndarray:
    """Named weights, normalised, then (1 − strength)·identity + strength·styles."""
    names = [style.name for style in manifest.styles]
    for name, _ in styles:
        if name == IDENTITY or name not in names:
            trained = ", ".join(n for n in names if n != IDENTITY)
            hint = "; --strength mixes in the clip itself" if name == IDENTITY else ""
            raise VideoError(
                f"--style {name}: {manifest.name} has no style {name!r} ({trained}){hint}"
            )
    if sum(weight for _, weight in styles) <= 0:
        raise VideoError("--style: at least one weight must be > 0")
    if manifest.identity is None and strength < 1:
        raise VideoError(f"--strength: {manifest.name} has no identity style to mix in")
    sources = [StyleSource(names.index(name), weight) for name, weight in styles]
    return mix_styles(sources, [], len(names), manifest.identity, strength)


def steady(
    current: np.ndarray,
    previous_out: np.ndarray | None,
    frame: np.ndarray,
    previous_frame: np.ndarray | None,
    temporal: float,
) -> np.ndarray:
    """Blend with the previous stylised frame where the content did not move.

    The weight is temporal · exp(−|Δframe| / MOTION_SCALE) per pixel, |Δframe| the mean over
    channels: near `temporal` where the frame is still (the network's flicker is damped), near 0
    where it moved (no ghosts).
    """
    if previous_out is None or previous_frame is None or temporal == 0:
        return current
    motion = np.abs(frame - previous_frame).mean(axis=2, keepdims=True)
    keep = temporal * np.exp(-motion / MOTION_SCALE)
    return keep * previous_out + (1 - keep) * current


def fit(width: int, height: int, side: int | None) -> tuple[int, int]:
    """The frame size with its longest side `side` (up or down), keeping the aspect ratio."""
    if side is None:
        return width, height
    scale = side / max(width, height)
    return max(2, round(width * scale)), max(2, round(height * scale))


@dataclass(frozen=True)
class Clip:
    fps: float
    frames: int | None  # None where the container does not say


def describe(reader: Any) -> Clip:
    """The frame rate and frame count of an open imageio reader (ffmpeg or Pillow's GIF)."""
    meta = reader.metadata()
    if meta.get("fps"):  # ffmpeg: `duration` in seconds, `nframes` is inf
        fps = float(meta["fps"])
        seconds = meta.get("duration")
        count = round(seconds * fps) if seconds and math.isfinite(seconds) else None
        return Clip(fps, count or None)
    # Pillow: `duration` in milliseconds per frame; browsers play 0 at 10 fps.
    fps = 1000 / meta["duration"] if meta.get("duration") else 10.0
    return Clip(fps, int(reader.properties().n_images))


def rgb_frames(frames: Iterable[np.ndarray], size: int | None) -> Iterator[np.ndarray]:
    """H×W×3 float32 in [0, 1], resized to `size` on the longest side."""
    for raw in frames:
        image = Image.fromarray(np.asarray(raw)).convert("RGB")
        width, height = fit(*image.size, size)
        if (width, height) != image.size:
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        yield np.asarray(image, dtype=np.float32) / 255


def write_video(path: Path, suffix: str, frames: Iterable[np.ndarray], fps: float) -> None:
    """Write H×W×3 uint8 frames as they come, in the format `suffix` names."""
    if suffix == ".gif":
        # Pillow keeps the frames and saves them on close. GIF counts time in hundredths of a
        # second, so the frame rate is kept to that.
        gif = iio.imopen(path, "w", plugin="pillow", extension=".gif")
        try:
            for frame in frames:
                gif.write(frame, duration=1000 / fps, loop=0)
        finally:
            gif.close()
        return
    codec, params = FFMPEG_CODECS.get(suffix, (None, []))
    # v3's own ffmpeg plugin needs PyAV; imageio-ffmpeg's plugin streams through its v2 writer.
    legacy = iio.imopen(path, "w", plugin="FFMPEG", extension=suffix, legacy_mode=True)
    # macro_block_size 2: yuv420p needs even sides (odd ones are scaled up a pixel); the default
    # 16 would resize most clips.
    writer = legacy.legacy_get_writer(
        fps=fps, codec=codec, output_params=params, macro_block_size=2, ffmpeg_log_level="error"
    )
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()
        legacy.close()


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def gist(error: Exception) -> str:
    """An error's first line and, where ffmpeg's log follows it, the log's last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]}: {lines[-1]}"


def load_model(folder: Path) -> FastStyliser:
    if not (folder / FAST_MANIFEST_FILE).is_file():
        raise VideoError(
            f"no fast model in {folder} (no {FAST_MANIFEST_FILE}); train one with "
            f"`make fast-model` or `python -m export.train_fast ... -o {folder}`"
        )
    try:
        # The features service's providers and threads (STYLEBLEND_PROVIDERS, …): GPU if any.
        config = FeaturesConfig()
        return FastStyliser(folder, config.providers, config.intra_op_threads)
    except Exception as error:  # a bad manifest, ONNX file or setting; they are no one class
        raise VideoError(f"cannot load the fast model in {folder}: {gist(error)}") from None


def open_video(path: Path) -> tuple[Any, Clip, Iterator[np.ndarray]]:
    """An open reader, its clip's rate and length, and its frames (the first already decoded,
    so an unreadable file fails here rather than halfway)."""
    if not path.is_file():
        raise VideoError(f"no such file: {path}")
    reader = None
    try:
        reader = iio.imopen(path, "r")
        clip = describe(reader)
        frames = reader.iter()
        first = next(frames, None)
    except Exception as error:  # imageio and ffmpeg raise many kinds; all mean the same here
        if reader is not None:
            reader.close()
        raise VideoError(f"cannot read {path} as a video ({gist(error)})") from None
    if first is None:
        reader.close()
        raise VideoError(f"{path} has no frames")
    return reader, clip, itertools.chain([first], frames)


def stylise_video(args: argparse.Namespace) -> None:
    suffix = args.output.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise VideoError(
            f"-o {args.output}: cannot write {suffix or 'a file without a suffix'}; "
            f"give one of {', '.join(OUTPUT_SUFFIXES)}"
        )
    styliser = load_model(args.model)
    mix = style_mix(styliser.manifest, args.styles, args.strength)
    reader, clip, frames = open_video(args.input)

    def stylised() -> Iterator[np.ndarray]:
        previous_out = previous_frame = None
        progress = tqdm(rgb_frames(frames, args.size), total=clip.frames, unit="frame")
        for frame in progress:
            out = steady(styliser.stylise(frame, mix), previous_out, frame, previous_frame,
                         args.temporal)  # fmt: skip
            yield (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
            previous_out, previous_frame = out, frame

    args.output.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the output and renamed at the end: a failure leaves no half video.
    handle, partial = tempfile.mkstemp(
        prefix=f".{args.output.stem}-", suffix=suffix, dir=args.output.parent
    )
    os.close(handle)
    try:
        with reader:
            write_video(Path(partial), suffix, stylised(), clip.fps)
        os.chmod(partial, 0o666 & ~umask())  # mkstemp's 0600 is for the file while partial
        os.replace(partial, args.output)
    except (StyleBlendError, OSError, RuntimeError, ValueError) as error:
        raise VideoError(f"stylising {args.input} failed: {gist(error)}") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def video(args: argparse.Namespace) -> int:
    try:
        stylise_video(args)
    except VideoError as error:
        print(f"styleblend video: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
