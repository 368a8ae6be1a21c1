"""Parsing `--source PATH[:style=W][:content=W][:mask=PATH][:content-mask=PATH]`."""

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
