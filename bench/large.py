"""Large canvases: peak memory against size, whole and tiled, the estimate beside it, and a
2048 px picture made in tiles.

    python -m bench.large --out out/bench [--sizes 256 512 1024] [--tiled 1024 2048]
    python -m bench.large --out out/bench --picture 2048

Each measurement runs in a fresh process (peak RSS only grows), so one size cannot inherit
another's high-water mark: the targets come from another process (as they come from the
features service), then the baseline, then a few Adam iterations of the reconstruction core
with the network as the service configures it (Winograd convolutions on a CPU);
the figure is the peak above the baseline. The picture blends Starry Night
onto the astronaut coarse to fine (256, 512, 1024, then the final size), tiling wherever the
canvas is larger than a tile.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.graph import ROOT, write_report
from services.common import images
from services.common.manifest import layer_strides
from services.reconstruction import core
from services.reconstruction.memory import DEFAULT_TILING, Footprint, MiB, estimate_bytes
from services.reconstruction.tiles import Tiling

SAMPLES = ROOT / "clients" / "samples"
CONTENT = SAMPLES / "content" / "astronaut.jpg"
STYLE = SAMPLES / "style" / "starry_night.jpg"
STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
TILING: Tiling = DEFAULT_TILING  # the service's; the tests shrink it


def feature_net() -> torch.nn.Module:
    from export.models import build_feature_net

    return build_feature_net("vgg19")[0]


def served_net() -> torch.nn.Module:
    """The network as the reconstruction service computes with it here (Winograd on a CPU)."""
    from services.common.config import ReconstructionConfig
    from services.graph import computing_as_configured

    cpu = torch.device("cpu")
    return computing_as_configured(feature_net(), cpu, ReconstructionConfig(device="cpu"))


def strides(net: Any) -> dict[str, int]:
    return layer_strides(net.layers)


def canvas(path: Path, side: int) -> torch.Tensor:
    header = images.probe(path.read_bytes(), path.name, 10**9)
    width, height = images.fit_inside(header.width, header.height, side)
    pixels = images.to_canvas(path.read_bytes(), width, height)
    return torch.as_tensor(pixels).permute(2, 0, 1)[None]


def targets(net: core.FeatureNet, side: int, iterations: int) -> core.ScaleTargets:
    """Starry Night's Gram matrices at the canvas size and the astronaut's relu4_2."""
    content = canvas(CONTENT, side)
    with torch.no_grad():
        grams = {n: core.gram(f).numpy() for n, f in net(canvas(STYLE, side), STYLE_LAYERS).items()}
        features = net(content, ["relu4_2"])["relu4_2"][0].numpy()
    height, width = content.shape[-2:]
    return core.ScaleTargets(
        width, height, iterations, [core.StyleChannel(None, grams, 1.0)],
        {"relu4_2": features}, {"relu4_2": np.ones(features.shape[1:], np.float32)},
    )  # fmt: skip


def job(scales: list[core.ScaleTargets], tiled: bool, init: np.ndarray | None) -> core.Job:
    return core.Job(
        scales=scales, optimizer="adam", loss_weights=core.LossWeights(1.0, 10.0, 1.0),
        init=init, seed=7, preview_every=0, learning_rate=0.02,
        tiling=TILING if tiled else None,
    )  # fmt: skip


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_targets(side: int, path: Path) -> None:
    """Targets at `side` into an .npz, made in a process of their own: a whole-image forward
    pass at 2048 px takes gigabytes, which would hide a tiled run's peak under its own."""
    scale = targets(feature_net(), side, 1)
    arrays = {f"gram_{name}": gram for name, gram in scale.channels[0].grams.items()}
    arrays |= {"size": np.array([scale.width, scale.height]), "features": scale.features["relu4_2"]}
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub reads ** as allow_pickle


def load_targets(path: Path, iterations: int) -> core.ScaleTargets:
    with np.load(path) as saved:
        width, height = (int(v) for v in saved["size"])
        grams = {k.removeprefix("gram_"): saved[k] for k in saved.files if k.startswith("gram_")}
        features = saved["features"]
    return core.ScaleTargets(
        width, height, iterations, [core.StyleChannel(None, grams, 1.0)],
        {"relu4_2": features}, {"relu4_2": np.ones(features.shape[1:], np.float32)},
    )  # fmt: skip


def one(side: int, tiled: bool, iterations: int = 3) -> dict[str, Any]:
    """This process: the peak memory and time of `iterations` at `side` (run in a child),
    with the targets from another child, as the service gets them from the features service."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "targets.npz"
        command = [sys.executable, "-m", "bench.large", "--save-targets", str(side), str(path)]
        subprocess.run(command, check=True, capture_output=True)
        scale = load_targets(path, iterations)
    net = served_net()
    init = canvas(CONTENT, side)[0].permute(1, 2, 0).numpy()
    torch.set_flush_denormal(True)
    baseline = peak_mib()
    started = time.perf_counter()
    for _ in core.reconstruct(
        net, job([scale], tiled, init), core.Control(), torch.device("cpu"), strides(net)
    ):
        pass
    seconds = time.perf_counter() - started
    footprint = Footprint.measure(
        net, [*STYLE_LAYERS, "relu4_2"], torch.device("cpu"), STYLE_LAYERS, guided=tiled
    )  # as the planner measures it: tiles use guided Gram matrices
    target_bytes = scale.features["relu4_2"].nbytes
    estimate = estimate_bytes(
        footprint, scale.width, scale.height, optimizer="adam",
        tiling=TILING if tiled else None, target_bytes=target_bytes,
    )  # fmt: skip
    return {
        "side": side, "canvas": [scale.width, scale.height], "tiled": tiled,
        "peak_above_baseline_mib": peak_mib() - baseline, "estimate_mib": estimate / MiB,
        "seconds_per_iteration": seconds / iterations,
    }  # fmt: skip


def in_child(side: int, tiled: bool) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.large", "--one", str(side)]
    done = subprocess.run(command + (["--tile"] if tiled else []), check=True, capture_output=True)
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def picture(side: int, out: Path) -> dict[str, Any]:
    net = served_net()
    torch.set_flush_denormal(True)
    plan = [(256, 100), (512, 30), (1024, 4), (side, 2)]
    scales = [targets(net, s, n) for s, n in plan if s <= side]
    first = scales[0]
    init = canvas(CONTENT, plan[0][0])[0].permute(1, 2, 0).numpy()
    assert init.shape[:2] == (first.height, first.width)
    started = time.perf_counter()
    for event in core.reconstruct(
        net, job(scales, True, init), core.Control(), torch.device("cpu"), strides(net)
    ):
        if isinstance(event, core.Result):
            Image.fromarray(event.pixels).save(out / f"large-{side}.jpg", quality=90)
    return {
        "side": side,
        "plan": plan,
        "seconds": time.perf_counter() - started,
        "peak_mib": peak_mib(),
    }


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Large canvases on the CPU (`python -m bench.large`)",
        "",
        f"Adam, 3 iterations per row, tiles of {TILING.tile} px with {TILING.margin} px of "
        "context; peak RSS above the process's baseline, each row in a fresh process.",
        "",
        "| canvas | whole or tiled | peak MiB | estimate MiB | s per iteration |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        width, height = row["canvas"]
        lines.append(
            f"| {width}×{height} | {'tiled' if row['tiled'] else 'whole'} | "
            f"{row['peak_above_baseline_mib']:.0f} | {row['estimate_mib']:.0f} | "
            f"{row['seconds_per_iteration']:.1f} |"
        )
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.large", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 1024])
    parser.add_argument("--tiled", type=int, nargs="*", default=[1024, 2048])
    parser.add_argument("--picture", type=int, help="make a picture of this side, tiled")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save-targets", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_targets:
        save_targets(int(args.save_targets[0]), Path(args.save_targets[1]))
        return
    if args.one:
        print(json.dumps(one(args.one, args.tile)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.picture:
        made = picture(args.picture, args.out)
        print(json.dumps(made))
        (args.out / f"large-{args.picture}.json").write_text(json.dumps(made, indent=2))
        return
    rows = [in_child(side, False) for side in args.sizes]
    rows += [in_child(side, True) for side in args.tiled]
    write_report(args.out, "large", rows, report(rows))
    print(report(rows))


if __name__ == "__main__":
    main()
