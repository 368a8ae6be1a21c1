"""Parsing `--source PATH[:style=W][:content=W]`."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

KEYS = ("style", "content")


@dataclass(frozen=True)
class SourceArg:
    path: Path
    style_weight: float
    content_weight: float


def parse_source(text: str) -> SourceArg:
    """`photo.jpg:content=1`, `starry.jpg:style=0.7`; an unnamed weight is 0."""
    parts = text.split(":")
    weights: dict[str, float] = {}
    while len(parts) > 1 and "=" in parts[-1]:
        key, _, value = parts.pop().partition("=")
        if key not in KEYS:
            raise argparse.ArgumentTypeError(
                f"{text}: unknown weight {key!r}; use style= or content="
            )
        try:
            weight = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: {key}={value!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise argparse.ArgumentTypeError(f"{text}: {key} must be a finite number >= 0")
        weights[key] = weight
    path = Path(":".join(parts))
    if not weights:
        raise argparse.ArgumentTypeError(
            f"{text}: give a weight, e.g. {path}:style=1 or :content=1"
        )
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path}: no such file")
    return SourceArg(path, weights.get("style", 0.0), weights.get("content", 0.0))
