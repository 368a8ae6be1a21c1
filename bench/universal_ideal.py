"""The universal method's ceiling: its transform with ideal decoders in place of trained ones.

    python -m bench.universal_ideal [--size 256] [--pairs 2] [--iterations 150] [--refine] \\
        [--starts grey previous] [--levels relu3_1 --levels relu4_1,relu3_1 …]

Each level whitens and colours the image's features exactly as the service does
(`transform_channels`), and then, where the service runs a trained decoder, L-BFGS on the pixels
inverts the encoder: it looks for the image whose features at that layer are the transformed
ones. What error is left is the method's own (the layers its levels never set, and transformed
features no image has), not the decoders' training, so it bounds what any decoder could buy.

Two starts for the inversion: `grey` sees only the features, as a decoder does; `previous`
starts from the image the level is given (the photo at the first), so it keeps more of the
photo than a decoder could and is the optimistic bound.

With --refine, each ideal image is also the start of the iterative path, as `--universal
--refine` starts from the universal image: the iterations it takes to reach the style loss of
150 iterations from the photo (the issue's target is 75), or none within 150.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import bench.universal as universal
import bench.universal_layers as layers_bench
from bench.graph import ROOT, write_report
from bench.large import STYLE_LAYERS, served_net
from bench.pictures import contact_sheet
from services.common import images
from services.features import core as features_core
from services.features.universal import ChannelTarget, transform_channels
from services.reconstruction import core

STARTS = ("grey", "previous")
GREY = 0.5
LBFGS_HISTORY = 50  # as the reconstruction service keeps
EVALUATIONS = 2  # per iteration at most, on average, line searches included
DEFAULT_SETS = (
    ("relu3_1",), ("relu4_1",), ("relu3_1", "relu2_1", "relu1_1"),
    ("relu4_1", "relu3_1", "relu2_1", "relu1_1"),
    ("relu5_1", "relu4_1", "relu3_1", "relu2_1", "relu1_1"),
)  # fmt: skip


@dataclass(frozen=True)
class Inversion:
    pixels: np.ndarray  # H×W×3 float32 in [0, 1]
    error: float  # ‖Φ(x) − f‖² / ‖f‖² at the end
    iterations: int


def invert(
    net: torch.nn.Module,
    layer: str,
    features: np.ndarray,
    start: np.ndarray,
    iterations: int,
) -> Inversion:
    """The image (from `start`, clamped to [0, 1] at the end) whose `layer` features are
    nearest `features` (C×h×w), by L-BFGS with a line search: with the reconstruction service's
    fixed steps and a clamp after each, it blew up at relu1_1."""
    wanted = torch.as_tensor(features)[None]
    norm = float(wanted.pow(2).sum())
    image = universal.to_batch(start.astype(np.float32)).clone(
        memory_format=torch.contiguous_format
    )
    image.requires_grad_(True)
    # `iterations` steps in one call, each line search a few evaluations (bounded in all).
    optimizer = torch.optim.LBFGS(
        [image], max_iter=iterations, max_eval=EVALUATIONS * iterations,
        tolerance_grad=0.0, tolerance_change=0.0, history_size=LBFGS_HISTORY,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = (net(image, [layer])[layer] - wanted).pow(2).sum() / norm
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        image.clamp_(0, 1)
        error = float((net(image, [layer])[layer] - wanted).pow(2).sum()) / norm
        pixels = image[0].permute(1, 2, 0).numpy().copy()
    return Inversion(pixels, error, int(optimizer.state[image]["n_iter"]))


def statistics(
    net: torch.nn.Module, painting: np.ndarray, levels: Sequence[str]
) -> dict[str, ChannelTarget]:
    """The painting's mean and Gram at each level, as the features service takes them."""
    with torch.no_grad():
        taps = net(universal.to_batch(painting), list(levels))
    return {
        layer: ChannelTarget(
            None, taps[layer][0].double().mean(dim=(1, 2)).numpy(),
            features_core.gram(taps[layer][0].numpy()),
        )
        for layer in levels
    }  # fmt: skip


def ideal_image(
    net: torch.nn.Module,
    photo: np.ndarray,
    painting: np.ndarray,
    levels: Sequence[str],
    iterations: int,
    start: str = "grey",
) -> tuple[np.ndarray, list[Inversion]]:
    """The universal image of one photo in one painting, coarse to fine, each level's decoder
    an inversion; and each inversion, to show how near exact it came."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    targets = statistics(net, painting, levels)
    image, inversions = photo.astype(np.float32), []
    for layer in levels:
        with torch.no_grad():
            features = net(universal.to_batch(image), [layer])[layer][0].numpy()
        coloured = transform_channels(features, [targets[layer]], 1.0)
        begin = np.full_like(image, GREY) if start == "grey" else image
        inversion = invert(net, layer, coloured, begin, iterations)
        image = inversion.pixels
        inversions.append(inversion)
    return image, inversions


def refine_iterations(
    net: torch.nn.Module, targets: core.ScaleTargets, start: np.ndarray, long_style: float
) -> int | None:
    """L-BFGS from `start` until the style term is at most `long_style` (weighted)."""
    refined = universal.optimise(net, targets, universal.loss_weights(), start,
                                 universal.REFINE_CAP, stop_at_style=long_style)  # fmt: skip
    return universal.iterations_to_reach([loss.style for loss in refined.losses], long_style)


def coarse_to_fine(text: str) -> tuple[str, ...]:
    chosen = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(chosen - set(STYLE_LAYERS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown levels {unknown or [text]}; choose from "
                                         f"{','.join(STYLE_LAYERS)}")  # fmt: skip
    return tuple(layer for layer in reversed(STYLE_LAYERS) if layer in chosen)


@dataclass
class PairResult:
    rows: dict[str, list[float]]  # picture -> per-layer errors, their mean, content
    inversions: dict[str, list[float]]  # ideal picture -> each level's inversion error
    refined: dict[str, int | None]  # ideal picture -> refine iterations (with --refine)
    tiles: list[tuple[str, Image.Image]] = field(default_factory=list)  # for the contact sheet


def judge_pair(
    net: torch.nn.Module,
    pair: universal.Pair,
    args: argparse.Namespace,
    sets: Sequence[tuple[str, ...]],
) -> PairResult:
    photo, painting = pair.pixels(args.size)
    targets = universal.scale_targets(net, photo, painting)
    result = PairResult(layers_bench.rows_for(net, pair, args.size, [], ()), {}, {})
    result.tiles += [("photo", picture(photo)), ("painting", picture(painting))]
    if args.refine:
        weights = universal.loss_weights()
        from_photo = universal.optimise(net, targets, weights, photo, universal.LONG)
        long_style = from_photo.losses[universal.LONG].style
    for levels, start in ((levels, start) for levels in sets for start in args.starts):
        name = f"ideal {universal.level_name(levels)}, from {start}"
        image, inversions = ideal_image(net, photo, painting, levels, args.iterations, start)
        row = result.rows[name] = layers_bench.per_layer(net, targets, image)
        result.inversions[name] = [i.error for i in inversions]
        result.tiles.append((name.removeprefix("ideal "), picture(image)))
        if args.refine:
            result.refined[name] = refine_iterations(net, targets, image, long_style)
        print(f"{pair.name}, {name}: style {row[-2]:.3f}, content {row[-1]:.3f}", flush=True)
    return result


def picture(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(images.to_uint8(pixels))


def markdown(command: str, results: dict[str, PairResult]) -> str:
    text = layers_bench.markdown(command, {name: r.rows for name, r in results.items()})
    text = text.replace("Per-layer errors of universal images", "Universal images, ideal decoders")
    text += "\n## Inversion errors, level by level (‖Φ(x) − f‖² / ‖f‖²)\n\n"
    for pair, result in results.items():
        for name, errors in result.inversions.items():
            text += f"- {pair}, {name}: " + ", ".join(f"{e:.1e}" for e in errors) + "\n"
    if any(r.refined for r in results.values()):
        text += f"\n## Refined from the ideal image: iterations to {universal.LONG}'s style\n\n"
        for pair, result in results.items():
            for name, taken in result.refined.items():
                reached = f"over {universal.REFINE_CAP}" if taken is None else str(taken)
                text += f"- {pair}, {name}: {reached}\n"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.universal_ideal", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--levels", type=coarse_to_fine, action="append", dest="sets",
                        help="a comma-separated level set (repeatable)")  # fmt: skip
    parser.add_argument("--starts", nargs="+", choices=STARTS, default=list(STARTS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=150, help="per level's inversion")
    parser.add_argument("--pairs", type=int, default=2, choices=range(1, len(universal.PAIRS) + 1))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--refine", action="store_true",
                        help="refine from each ideal image to 150 iterations' style")  # fmt: skip
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error(f"--iterations must be at least 1, got {args.iterations}")
    sets = args.sets or list(DEFAULT_SETS)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    net = served_net()
    pairs = universal.sample_pairs(args.pairs)
    results = {pair.name: judge_pair(net, pair, args, sets) for pair in pairs}
    command = "python -m bench.universal_ideal " + " ".join(
        [*(f"--levels {','.join(s)}" for s in sets), "--starts", *args.starts,
         "--size", str(args.size), "--iterations", str(args.iterations),
         "--pairs", str(args.pairs), *(["--refine"] if args.refine else [])]
    )  # fmt: skip
    text = markdown(command, results)
    data = {
        name: {"rows": r.rows, "inversions": r.inversions, "refined": r.refined}
        for name, r in results.items()
    }
    write_report(args.out, "universal-ideal", {"command": command} | data, text)
    sheet = contact_sheet([r.tiles for r in results.values()])
    sheet.save(args.out / "universal-ideal.jpg", quality=90)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
