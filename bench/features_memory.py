"""The features service's memory after extractions of varied sizes, for each setting of ONNX
Runtime's CPU arena, and what each setting costs in extraction time (issue 12 §3).

    python -m bench.features_memory --out out/bench [--sizes 96x96 512x384 …] [--repeats N]

Each setting runs in its own process, started with MALLOC_ARENA_MAX=2 as the graph is (README,
Reliability): a FeatureExtractor over the VGG19 export on the CPU provider, a small cache. Its
RSS is read from outside, from /proc/<pid>/status (VmRSS, and VmHWM for the peak): once the
model is loaded and a 64 px image extracted (style taps, then content taps: a session each),
after each size of a sweep (a fresh image each time, so nothing comes from the cache; style
and content taps alternate, as the gateway asks for them), and last after glibc's malloc_trim.
Then 256 and 512 px extractions are timed, the settings interleaved round by round, only one
process running at a time. Writes features-memory.md and features-memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from services.common import images
from services.common.config import CpuArena
from services.common.heap import malloc_trim
from services.features.core import FeatureExtractor

MiB = 1024 * 1024
ARENAS: tuple[CpuArena, ...] = ("keep", "shrink", "off")
# Canvas sizes up to the gateway's largest (1024 px), and style images raised to 32 px across.
SIZES = ((96, 96), (256, 192), (512, 512), (384, 768), (1024, 768), (1024, 1024), (2048, 256),
         (640, 480), (4096, 32), (200, 150))  # fmt: skip
TIMED = (256, 512)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB, as the kernel counts them."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def noise_png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return images.encode(pixels)


# --- the measured process ------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    """Extract as told; print a line at each point to be measured, then wait for the parent."""

    def mark(name: str, **data: Any) -> None:
        print(json.dumps({"mark": name, **data}), flush=True)
        sys.stdin.readline()

    extractor = FeatureExtractor(
        Path(args.model_dir),
        ["CPUExecutionProvider"],
        cache_bytes=args.cache_mib * MiB,
        intra_op_threads=args.threads,
        cpu_arena=args.child,
    )
    manifest = extractor.manifest
    style, content = manifest.default_style_layers, manifest.default_content_layers
    none: list[str] = []
    for grams, features in ((style, none), (none, content)):  # a session each, as the gateway
        extractor.extract(noise_png(64, 64, 0), 64, 64, grams, features)
    mark("loaded", cache_bytes=extractor.cache_bytes)
    for k, (width, height) in enumerate(args.sizes):
        image = noise_png(min(width, 512), min(height, 512), 1 + k)  # fitted to the size asked
        grams, features = (style, none) if k % 2 == 0 else (none, content)
        extractor.extract(image, width, height, grams, features)
        mark(f"{width}x{height}", cache_bytes=extractor.cache_bytes)
    mark("varied", cache_bytes=extractor.cache_bytes)
    start = time.perf_counter()
    malloc_trim()
    mark("trimmed", cache_bytes=extractor.cache_bytes, trim_ms=(time.perf_counter() - start) * 1e3)
    seed = 1000
    for _ in range(args.repeats + 1):  # the first of each size is a warm-up
        times, cpu, faults = {}, {}, {}
        for side in TIMED:
            seed += 1
            image = noise_png(side, side, seed)
            start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            extractor.extract(image, side, side, style, content)
            after = resource.getrusage(resource.RUSAGE_SELF)
            times[side] = (time.perf_counter() - start) * 1000
            cpu[side] = {
                "user": (after.ru_utime - before.ru_utime) * 1000,
                "sys": (after.ru_stime - before.ru_stime) * 1000,
            }
            faults[side] = after.ru_minflt - before.ru_minflt
        mark("timed", ms=times, cpu_ms=cpu, faults=faults)
    mark("end")


@dataclass
class Measured:
    """One setting's process: its RSS at each mark, its extraction times."""

    arena: str
    rss_mib: dict[str, float] = field(default_factory=dict)
    peak_mib: float = 0.0
    cache_mib: float = 0.0
    trim_ms: float = 0.0
    ms: dict[int, list[float]] = field(default_factory=dict)  # wall time
    user_ms: dict[int, list[float]] = field(default_factory=dict)  # all its threads' CPU time
    sys_ms: dict[int, list[float]] = field(default_factory=dict)  # the kernel's, e.g. faults
    faults: dict[int, list[float]] = field(default_factory=dict)  # minor page faults


class Child:
    def __init__(self, arena: str, args: argparse.Namespace) -> None:
        command = [sys.executable, "-m", "bench.features_memory", "--child", arena,
                   "--model-dir", str(args.model_dir), "--cache-mib", str(args.cache_mib),
                   "--threads", str(args.threads), "--repeats", str(args.repeats),
                   "--sizes", *(f"{w}x{h}" for w, h in args.sizes)]  # fmt: skip
        env = os.environ | {"MALLOC_ARENA_MAX": "2"}
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.measured = Measured(arena)

    def step(self) -> str:
        """Read the next mark and measure; the process waits there until `go`."""
        stdout: IO[str] = self.process.stdout  # type: ignore[assignment]
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"arena {self.measured.arena}: the process ended early")
        mark = json.loads(line)
        status = rss_kib(self.process.pid)
        measured = self.measured
        if mark["mark"] == "timed":
            for side, ms in mark["ms"].items():
                measured.ms.setdefault(int(side), []).append(ms)
                cpu = mark["cpu_ms"][side]
                measured.user_ms.setdefault(int(side), []).append(cpu["user"])
                measured.sys_ms.setdefault(int(side), []).append(cpu["sys"])
                measured.faults.setdefault(int(side), []).append(mark["faults"][side])
        elif mark["mark"] != "end":
            measured.rss_mib[mark["mark"]] = status["VmRSS"] / 1024
            measured.peak_mib = status["VmHWM"] / 1024
            measured.cache_mib = mark["cache_bytes"] / MiB
            measured.trim_ms = mark.get("trim_ms", measured.trim_ms)
        return str(mark["mark"])

    def go(self) -> None:
        stdin: IO[str] = self.process.stdin  # type: ignore[assignment]
        stdin.write("go\n")
        stdin.flush()

    def until(self, name: str) -> None:
        """On from mark to mark; the process is left waiting at `name`."""
        while self.step() != name:
            self.go()


def measure(args: argparse.Namespace) -> list[Measured]:
    """Sweeps one setting at a time, then times them interleaved; only one process runs at a
    time, the others wait at a mark, so each has the CPUs to itself."""
    children = []
    for arena in args.arenas:
        process = Child(arena, args)
        process.until("trimmed")
        children.append(process)
    for _ in range(args.repeats + 1):
        for process in children:
            process.go()
            process.until("timed")
    for process in children:
        process.go()
        process.until("end")
        process.go()
        process.process.wait(timeout=60)
    for process in children:
        measured = process.measured
        for times in (measured.ms, measured.user_ms, measured.sys_ms, measured.faults):
            for side in times:
                times[side] = times[side][1:]  # drop the warm-up
    return [process.measured for process in children]


def markdown(results: list[Measured], args: argparse.Namespace) -> str:
    sizes = ", ".join(f"{w}×{h}" for w, h in args.sizes)
    lines = [
        "# Features service: memory after varied sizes, per CPU arena setting",
        "",
        f"Command: `python -m bench.features_memory --out {args.out}` (MALLOC_ARENA_MAX=2, "
        f"VGG19 on the CPU provider, cache budget {args.cache_mib} MiB, {args.repeats} timed "
        "rounds). RSS from /proc/<pid>/status of the extracting process. Times: median "
        "(min–max) wall time, then medians of the process's user and system CPU time (all its "
        "threads; other jobs on the machine disturb them less) and of its minor page faults: "
        "memory given back is faulted in again by the next run.",
        f"Sweep: {sizes}.",
        "",
        "| CPU arena | RSS loaded, MiB | peak, MiB | after the sweep | after malloc_trim "
        "| over loaded | cache held | "
        + " | ".join(f"{side} px extraction, ms" for side in TIMED)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(TIMED),
    ]
    for result in results:
        rss = result.rss_mib
        times = " | ".join(
            f"{statistics.median(result.ms[side]):.0f} "
            f"({min(result.ms[side]):.0f}–{max(result.ms[side]):.0f}); "
            f"user {statistics.median(result.user_ms[side]):.0f}, "
            f"sys {statistics.median(result.sys_ms[side]):.0f}; "
            f"{statistics.median(result.faults[side]) / 1000:.0f}k faults"
            for side in TIMED
        )
        lines.append(
            f"| {result.arena} | {rss['loaded']:.0f} | {result.peak_mib:.0f} | "
            f"{rss['varied']:.0f} | {rss['trimmed']:.0f} | "
            f"{rss['varied'] - rss['loaded']:+.0f} | {result.cache_mib:.1f} | {times} |"
        )
    lines += ["", "RSS after each size of the sweep, MiB:", ""]
    marks = [f"{w}x{h}" for w, h in args.sizes]
    lines.append("| CPU arena | " + " | ".join(marks) + " |")
    lines.append("|---|" + "---|" * len(marks))
    for result in results:
        lines.append(
            f"| {result.arena} | " + " | ".join(f"{result.rss_mib[m]:.0f}" for m in marks) + " |"
        )
    return "\n".join(lines) + "\n"


def size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--model-dir", type=Path, default=Path("models/vgg19"))
    parser.add_argument("--cache-mib", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=size, nargs="+", default=list(SIZES))
    parser.add_argument("--arenas", nargs="+", choices=ARENAS, default=list(ARENAS))
    parser.add_argument("--child", choices=ARENAS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    report = markdown(results, args)
    (args.out / "features-memory.md").write_text(report)
    data = [result.__dict__ for result in results]
    (args.out / "features-memory.json").write_text(json.dumps(data, indent=2) + "\n")
    print(report)


if __name__ == "__main__":
    main()
