"""Reading flag values: `--source PATH[:style=W][:content=W][:mask=PATH][:content-mask=PATH]`,
`--style NAME=WEIGHT`, amounts within 0..1 and sides in pixels.

Standard library only: `styleblend` builds every command's flags before it knows which runs.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

WEIGHTS = ("style", "content")
MAPS = {"mask": "style_map", "content-mask": "content_map"}


@dataclass(frozen=True)
class SourceArg:
    path: Path
    style_weight: float
    content_weight: float
    style_map: Path | None = None
    content_map: Path | None = None


def _weight(text: str, key: str, value: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: {key}={value!r} is not a number") from None
    if not math.isfinite(weight) or weight < 0:
        raise argparse.ArgumentTypeError(f"{text}: {key} must be a finite number >= 0")
    return weight


def _file(text: str, path: Path) -> Path:
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: {path}: no such file")
    return path


def parse_source(text: str) -> SourceArg:
    """`photo.jpg:content=1`, `starry.jpg:style=0.7:mask=left.png`; an unnamed weight is 0."""
    parts = text.split(":")
    weights: dict[str, float] = {}
    maps: dict[str, Path] = {}
    while len(parts) > 1 and "=" in parts[-1]:
        key, _, value = parts.pop().partition("=")
        if key in WEIGHTS:
            weights[key] = _weight(text, key, value)
        elif key in MAPS:
            maps[MAPS[key]] = _file(text, Path(value))
        else:
            raise argparse.ArgumentTypeError(
                f"{text}: unknown option {key!r}; use style=, content=, mask= or content-mask="
            )
    path = Path(":".join(parts))
    if not weights:
        raise argparse.ArgumentTypeError(
            f"{text}: give a weight, e.g. {path}:style=1 or :content=1"
        )
    return SourceArg(path=_file(text, path), style_weight=weights.get("style", 0.0),
                     content_weight=weights.get("content", 0.0), **maps)  # fmt: skip


def parse_style(text: str) -> tuple[str, float]:
    name, equals, weight = text.partition("=")
    if not name or (equals and not weight):
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=WEIGHT, e.g. starry=0.7")
    try:
        value = float(weight) if equals else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the weight {weight!r} is not a number"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight must be a finite number >= 0")
    return name, value


def unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value} is not within 0..1")
    return value


def positive_side(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 8:
        raise argparse.ArgumentTypeError(f"{value} is too small: at least 8 pixels")
    return value
