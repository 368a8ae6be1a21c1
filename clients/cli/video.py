"""`styleblend video`: every frame of a clip through a trained fast network, on this machine.

Runs the network locally on ONNX Runtime (no graph needed): a video is many frames, and sending
each through the gateway would cost more than stylising it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imageio.v2 as imageio
import numpy as np
from PIL import Image
from tqdm import tqdm

from services.common.errors import StyleBlendError
from services.common.fastmodel import FAST_MANIFEST_FILE
from services.features.fast import FastStyliser

# Frame differences above a few grey levels are motion, not sensor noise or compression.
MOTION_SCALE = 0.03


def parse_style(text: str) -> tuple[str, float]:
    name, _, weight = text.partition("=")
    try:
        value = float(weight) if weight else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: give NAME or NAME=WEIGHT") from None
    if not name or not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text}: the weight must be a finite number >= 0")
    return name, value


def unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not within 0..1")
    return value


def style_mix(
    styliser: FastStyliser, styles: list[tuple[str, float]], strength: float
) -> np.ndarray:
    """Named weights, normalised, then (1 − strength)·identity + strength·styles."""
    manifest = styliser.manifest
    names = [style.name for style in manifest.styles]
    mix = np.zeros(len(names), np.float32)
    for name, weight in styles:
        if name not in names or not manifest.styles[names.index(name)].sha256:
            trained = ", ".join(s.name for s in manifest.styles if s.sha256)
            raise ValueError(f"--style {name}: {manifest.name} has no style {name!r} ({trained})")
        mix[names.index(name)] += weight
    if mix.sum() <= 0:
        raise ValueError("--style: at least one weight must be > 0")
    identity = manifest.identity
    if identity is None and strength < 1:
        raise ValueError(f"--strength: {manifest.name} has no identity style to mix in")
    mix = strength * mix / mix.sum()
    if identity is not None:
        mix[identity] += 1 - strength
    return mix


def steady(
    current: np.ndarray,
    previous_out: np.ndarray | None,
    frame: np.ndarray,
    previous_frame: np.ndarray | None,
    temporal: float,
) -> np.ndarray:
    """Blend with the previous stylised frame where the content did not move.

    The weight is temporal · exp(−|Δframe| / MOTION_SCALE) per pixel: near `temporal` where the
    frame is still (the network's flicker is damped), near 0 where it moved (no ghosts).
    """
    if previous_out is None or previous_frame is None or temporal == 0:
        return current
    motion = np.abs(frame - previous_frame).mean(axis=2, keepdims=True)
    keep = temporal * np.exp(-motion / MOTION_SCALE)
    return keep * previous_out + (1 - keep) * current


def frames(reader: Any, side: int | None) -> Iterator[np.ndarray]:
    for frame in reader:
        image = Image.fromarray(np.asarray(frame)[..., :3])
        if side:
            image.thumbnail((side, side), Image.Resampling.LANCZOS)
        yield np.asarray(image, dtype=np.float32) / 255


def open_video(path: Path) -> tuple[Any, float, int | None]:
    """A reader, the frame rate and the frame count (None where the format does not say)."""
    try:
        reader = imageio.get_reader(path)
        meta = reader.get_meta_data()
    except Exception as error:  # imageio raises many kinds; all mean the same to a person
        raise SystemExit(f"styleblend video: cannot read {path} as a video ({error})") from None
    fps = float(meta.get("fps") or (1000 / meta["duration"] if meta.get("duration") else 24))
    count = reader.count_frames() if hasattr(reader, "count_frames") else len(reader)
    return reader, fps, count if count and math.isfinite(count) else None


def open_writer(path: Path, suffix: str, fps: float) -> Any:
    if suffix.lower() == ".gif":
        return imageio.get_writer(path, format="GIF", duration=1000 / fps, loop=0)
    # macro_block_size 2: H.264 needs even sides; larger blocks would resize every frame.
    return imageio.get_writer(path, format="FFMPEG", fps=fps, macro_block_size=2)


def video(args: argparse.Namespace) -> int:
    if not args.input.is_file():
        raise SystemExit(f"styleblend video: no such file: {args.input}")
    if not (args.model / FAST_MANIFEST_FILE).is_file():
        raise SystemExit(
            f"styleblend video: no fast model in {args.model}; train one with `make fast-model` "
            "(or `python -m export.train_fast ... -o models/fast/NAME`)"
        )
    if args.size is not None and args.size < 8:
        raise SystemExit(f"styleblend video: --size must be at least 8, got {args.size}")
    styliser = FastStyliser(args.model, ["CPUExecutionProvider"])
    try:
        mix = style_mix(styliser, args.styles, args.strength)
    except ValueError as error:
        raise SystemExit(f"styleblend video: {error}") from None
    reader, fps, total = open_video(args.input)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the output and renamed at the end: a failure leaves no half video.
    handle, partial = tempfile.mkstemp(suffix=args.output.suffix, dir=args.output.parent)
    os.close(handle)
    try:
        with reader, open_writer(Path(partial), args.output.suffix, fps) as writer:
            previous_out = previous_frame = None
            for frame in tqdm(frames(reader, args.size), total=total, unit="frame"):
                styled = steady(
                    styliser.stylise(frame, mix), previous_out, frame, previous_frame, args.temporal
                )
                writer.append_data((np.clip(styled, 0, 1) * 255 + 0.5).astype(np.uint8))
                previous_out, previous_frame = styled, frame
        os.replace(partial, args.output)
    except (StyleBlendError, OSError, RuntimeError) as error:
        raise SystemExit(f"styleblend video: {error}") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "video", help="stylise every frame of a video with a trained fast network"
    )
    parser.add_argument("input", type=Path, help="a video (mp4, webm, gif, …)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the stylised video")
    parser.add_argument("--model", type=Path, default=Path("models/fast/demo"))
    parser.add_argument(
        "--style", dest="styles", action="append", type=parse_style, required=True,
        metavar="NAME[=WEIGHT]", help="a style of the model and its weight; repeat to mix",
    )  # fmt: skip
    parser.add_argument("--strength", type=unit_interval, default=1.0, help="0 (the clip) .. 1")
    parser.add_argument(
        "--temporal", type=unit_interval, default=0.0,
        help="0..1: how much of the previous frame to keep where nothing moved (less flicker)",
    )  # fmt: skip
    parser.add_argument("--size", type=int, help="longest side of the frames (default: as is)")
