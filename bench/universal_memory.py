"""The universal method's time and peak memory at large canvases (issue 14).

    python -m bench.universal_memory --out out/bench [--sides 1024 2048] [--levels relu3_1 …]

Each side runs in its own process, so one size's peak cannot hide another's: Chelsea at
side × ⅔·side in Starry Night at side × 0.79·side, the painting's statistics taken, then one
universal image. The peak is the process's own high-water mark (ru_maxrss), read after the
run; "loaded" is the same mark before the first image, with the encoder and decoders loaded.
Writes universal-memory.md and universal-memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.graph import ROOT, write_report
from bench.numbers import cpu_model

SAMPLES = ROOT / "clients" / "samples"


def measure(side: int, levels: list[str] | None) -> dict[str, float]:
    """One side, in this process: seconds and peak MiB."""
    from services.common import images
    from services.features.universal import ContentSource, UniversalStyle, UniversalStyliser

    styliser = UniversalStyliser(
        ROOT / "models" / "vgg19", ROOT / "models" / "universal", intra_op_threads=2,
        max_side_px=4 * side, max_pixels=4 * side * side,
    )  # fmt: skip
    photo = images.to_canvas((SAMPLES / "content/chelsea.jpg").read_bytes(), side, side * 2 // 3)
    painting = images.to_canvas(
        (SAMPLES / "style/starry_night.jpg").read_bytes(), side, side * 405 // 512
    )
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    statistics = styliser.statistics(painting)
    taken = time.perf_counter() - start
    start = time.perf_counter()
    styliser.stylise([ContentSource(photo, 1.0)], [UniversalStyle(statistics, 1.0)], levels=levels)
    made = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"side": side, "statistics_s": taken, "image_s": made, "loaded_mib": loaded,
            "peak_mib": peak}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--sides", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--levels", nargs="+", help="default: the decoders' default levels")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child's own side
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.levels)))
        return
    rows = []
    for side in args.sides:
        command = [sys.executable, "-m", "bench.universal_memory", "--one", str(side)]
        command += ["--levels", *args.levels] if args.levels else []
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.splitlines()[-1]))
    levels = " + ".join(args.levels) if args.levels else "the default levels"
    lines = [
        "# The universal method at large canvases",
        "",
        f"`python -m bench.universal_memory --sides {' '.join(map(str, args.sides))}`"
        + (f" `--levels {' '.join(args.levels)}`" if args.levels else ""),
        "",
        f"{cpu_model()}, 2 ONNX Runtime threads, {levels}; a process per size.",
        "",
        "| canvas | statistics | universal image | peak RSS | loaded |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['side']}×{r['side'] * 2 // 3} | {r['statistics_s']:.1f} s | {r['image_s']:.1f} s "
        f"| {r['peak_mib']:.0f} MiB | {r['loaded_mib']:.0f} MiB |"
        for r in rows
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out, "universal-memory", rows, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
