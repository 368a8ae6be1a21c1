"""What the reliability run measured, as JSON and as a Markdown page."""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


def percentiles(samples: Sequence[float], points: Sequence[int] = (50, 90, 95, 99)) -> dict:
    """Nearest-rank percentiles in milliseconds, with the count, mean and max."""
    if not samples:
        return {"count": 0}
    ordered = sorted(samples)
    result: dict[str, float] = {"count": len(ordered)}
    for p in points:
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        result[f"p{p}_ms"] = round(ordered[rank - 1] * 1000, 1)
    result["mean_ms"] = round(sum(ordered) / len(ordered) * 1000, 1)
    result["max_ms"] = round(ordered[-1] * 1000, 1)
    return result


@dataclass
class Report:
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, name: str, data: dict[str, Any]) -> None:
        self.sections[name] = data

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        document = {
            "written": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": {"cpus": _cpus(), "python": platform.python_version(), "load": _load()},
            "sections": self.sections,
        }
        (folder / "report.json").write_text(json.dumps(document, indent=2) + "\n")
        (folder / "report.md").write_text(markdown(document))


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _load() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def markdown(document: dict[str, Any]) -> str:
    machine = document["machine"]
    lines = [
        "# styleblend reliability report",
        "",
        f"Written {document['written']} on {machine['cpus']} CPUs (load average "
        f"{', '.join(map(str, machine['load']))} at the end; other jobs may share the machine).",
    ]
    for name, data in document["sections"].items():
        lines += ["", f"## {name}", ""]
        lines += _table(data)
    return "\n".join(lines) + "\n"


def _table(data: dict[str, Any], prefix: str = "") -> list[str]:
    rows = list(_rows(data, prefix))
    return ["| what | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)]


def _rows(data: dict[str, Any], prefix: str) -> Any:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if value and all(not isinstance(v, dict) for v in value.values()):
                yield name, ", ".join(f"{k} {_value(v)}" for k, v in value.items())
            else:
                yield from _rows(value, f"{name} / ")
        else:
            yield name, _value(value)


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
