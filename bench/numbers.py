"""What the benchmarks' reports share: spreads of samples, the machine's CPU."""

from __future__ import annotations

import platform
import statistics
from pathlib import Path


def spread(samples: list[float]) -> dict[str, float]:
    """Median, min, max and count of samples (already in the unit wanted)."""
    if not samples:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
