"""Where a universal image misses the blended targets: the relative Gram error at each style
layer, beside the photo and 20 L-BFGS iterations from it, for one or more decoder folders.

    python -m bench.universal_layers --universal-dir models/universal [--universal-dir …] \\
        [--levels relu3_1 [relu2_1 …]] [--size 256] [--pairs 2]

A decoder that inverted the encoder exactly would leave no error at the layers its transform
sets; what is left there is the decoders' training, what is left deeper is what the chosen
levels never touch.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

import bench.universal as universal
from bench.graph import ROOT, write_report
from bench.large import STYLE_LAYERS, served_net
from services.features import core as features_core
from services.features.universal import UniversalStyliser
from services.reconstruction import core

CONTENT_LAYER = "relu4_2"


def per_layer(net: torch.nn.Module, targets: core.ScaleTargets, pixels: np.ndarray) -> list[float]:
    """‖G − T‖² / ‖T‖² at each style layer, then their mean, then the content's relative error."""
    if pixels.dtype == np.uint8:
        pixels = pixels.astype(np.float32) / 255
    with torch.no_grad():
        taps = net(universal.to_batch(pixels.astype(np.float32)), [*STYLE_LAYERS, CONTENT_LAYER])
    errors = []
    for layer in STYLE_LAYERS:
        gram = features_core.gram(taps[layer][0].double().numpy())  # the service's own Gram
        target = targets.channels[0].grams[layer]
        errors.append(float(((gram - target) ** 2).sum() / (target**2).sum()))
    content, wanted = taps[CONTENT_LAYER][0].double().numpy(), targets.features[CONTENT_LAYER]
    return [
        *errors,
        float(np.mean(errors)),
        float(((content - wanted) ** 2).sum() / (wanted**2).sum()),
    ]


def rows_for(
    net: torch.nn.Module,
    pair: universal.Pair,
    size: int,
    folders: list[Path],
    levels: tuple[str, ...],
) -> dict[str, list[float]]:
    photo, painting = pair.pixels(size)
    targets = universal.scale_targets(net, photo, painting)
    iterated = universal.optimise(net, targets, universal.loss_weights(), photo, universal.SHORT)
    rows = {
        "photo": per_layer(net, targets, photo),
        f"iterative {universal.SHORT}": per_layer(net, targets, iterated.pictures[universal.SHORT]),
    }
    for folder in folders:
        styliser = UniversalStyliser(
            universal.MODEL_DIR, folder, intra_op_threads=torch.get_num_threads()
        )
        image = universal.universal_image(styliser, photo, styliser.statistics(painting), levels)
        rows[f"{os.path.relpath(folder, ROOT)} {universal.level_name(levels)}"] = per_layer(
            net, targets, image
        )
    return rows


def markdown(command: str, tables: dict[str, dict[str, list[float]]]) -> str:
    columns = [*STYLE_LAYERS, "style (mean)", "content"]
    lines = [
        "# Per-layer errors of universal images", "", f"`{command}`", "",
        "Relative errors against the painting's Gram matrices and the photo's relu4_2 (VGG19).",
    ]  # fmt: skip
    for pair, rows in tables.items():
        lines += ["", f"## {pair}", "", "| picture | " + " | ".join(columns) + " |"]
        lines.append("| --- " * (len(columns) + 1) + "|")
        lines += [
            f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
            for name, row in rows.items()
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.universal_layers", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--universal-dir", type=Path, action="append", dest="folders")
    parser.add_argument("--levels", nargs="+", default=["relu3_1"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=2, choices=range(1, len(universal.PAIRS) + 1))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    folders = args.folders or [universal.UNIVERSAL_DIR]
    levels = tuple(layer for layer in reversed(STYLE_LAYERS) if layer in args.levels)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    net = served_net()
    pairs = universal.sample_pairs(args.pairs)
    tables = {pair.name: rows_for(net, pair, args.size, folders, levels) for pair in pairs}
    command = "python -m bench.universal_layers " + " ".join(
        [*(f"--universal-dir {os.path.relpath(f, ROOT)}" for f in folders),
         "--levels", *levels, "--size", str(args.size), "--pairs", str(args.pairs)]
    )  # fmt: skip
    text = markdown(command, tables)
    write_report(args.out, "universal-layers", {"command": command, "tables": tables}, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
