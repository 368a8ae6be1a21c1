"""Session scripts: timed changes to a running blend, one per line.

# comments and blank lines are ignored
at 40: style 0.2,0.8          style weights of the sources, in order (also: weights)
at 40: content 1,0,0          content weights
at 60: mask 2 left.png        style map of source 2 (0-based); content-mask likewise
at 60: clear-mask 2           the style applies everywhere again; clear-content-mask likewise
at 80: style-loss 10          β; content-loss (α) and tv-loss (γ) likewise
at 120: finish                stop and keep the image as it is
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from styleblend.v1 import styleblend_pb2

_LINE = re.compile(r"^at\s+(\d+)\s*:\s*(\S+)\s*(.*)$")
_LOSSES = {
    "content-loss": "content_loss_weight",
    "style-loss": "style_loss_weight",
    "tv-loss": "tv_loss_weight",
}


class ScriptError(ValueError):
    pass


@dataclass(frozen=True)
class Step:
    at_iteration: int
    update: styleblend_pb2.SessionUpdate | None  # None: finish


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ScriptError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ScriptError(f"{where}: {text} must be a finite number >= 0")
    return value


def _index(text: str, where: str) -> int:
    if not text.isdigit():
        raise ScriptError(f"{where}: {text!r} is not a source index")
    return int(text)


def _update(command: str, argument: str, where: str, base: Path) -> styleblend_pb2.SessionUpdate:
    update = styleblend_pb2.SessionUpdate()
    if command in ("style", "weights", "content"):
        field = "content_weight" if command == "content" else "style_weight"
        for position, value in enumerate(argument.split(",")):
            change = update.sources.add(index=position)
            setattr(change, field, _number(value.strip(), where))
    elif command in _LOSSES:
        setattr(update, _LOSSES[command], _number(argument, where))
    elif command in ("mask", "content-mask"):
        number, _, path = argument.partition(" ")
        file = (base / path.strip()).resolve()
        if not file.is_file():
            raise ScriptError(f"{where}: {path.strip()}: no such file")
        field = "style_map" if command == "mask" else "content_map"
        getattr(update.sources.add(index=_index(number, where)), field).data = file.read_bytes()
    elif command in ("clear-mask", "clear-content-mask"):
        field = "clear_style_map" if command == "clear-mask" else "clear_content_map"
        setattr(update.sources.add(index=_index(argument, where)), field, True)
    else:
        raise ScriptError(f"{where}: unknown command {command!r}")
    return update


def parse_script(text: str, name: str = "script", base: Path = Path()) -> list[Step]:
    """The steps in iteration order; mask paths are relative to `base`."""
    steps = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{name}:{number}"
        match = _LINE.match(line)
        if match is None:
            raise ScriptError(f"{where}: expected `at N: command ...`, got {line!r}")
        at, command, argument = int(match[1]), match[2], match[3].strip()
        if at < 1:
            raise ScriptError(f"{where}: iterations count from 1")
        if command == "finish":
            steps.append(Step(at, None))
            continue
        update = _update(command, argument, where, base)
        update.update_id, update.at_iteration = number, at
        steps.append(Step(at, update))
    return sorted(steps, key=lambda step: step.at_iteration)
