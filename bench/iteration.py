"""One reconstruction iteration at 512 px, each CPU option on its own.

    python -m bench.iteration --out out/bench [--size 512] [--repeats 5]

An iteration is the objective's forward and backward to the image (five style layers and
relu4_2), as `services.reconstruction.core` runs it. Variants: plain float32 NCHW with the
Gram matrix as autograd differentiates it (the baseline), the project's Gram backward,
channels_last, the 3×3 convolutions by Winograd (NNPACK, as the service runs them on a CPU),
bfloat16 autocast (on a CPU without native bf16 it is emulated, and its loss and
gradient are compared with float32; `--bf16`, as it is slow here), and one thread against all.
Medians after a warm-up, the variants taking turns so that the machine's drift falls on all.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bench.graph import ROOT, interleaved_ms, timed_ms, write_report
from bench.large import STYLE_LAYERS, feature_net, strides, targets
from export.onnx_export import relative_error
from services.reconstruction import core, objective
from services.reconstruction.winograd import with_winograd


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Plain PyTorch: autograd differentiates F Fᵀ as two products and a sum.
BASELINE = "float32 NCHW, autograd's Gram"
WINOGRAD = "float32 NCHW, Winograd (NNPACK)"  # what the service runs on a CPU


@contextlib.contextmanager
def autograd_gram() -> Iterator[None]:
    """The objective with the textbook Gram matrix, whose backward autograd derives."""

    def gram(features: torch.Tensor) -> torch.Tensor:
        flat = features.flatten(2)
        return (flat @ flat.transpose(1, 2))[0] / flat.shape[2]

    ours = objective.gram
    objective.gram = gram
    try:
        yield
    finally:
        objective.gram = ours


def measure(size: int, repeats: int, bf16: bool = False) -> dict[str, Any]:
    torch.set_flush_denormal(True)
    net = feature_net()
    scale = targets(net, size, 1)
    weights = core.LossWeights(1.0, 10.0, 1.0)
    fused = copy.deepcopy(net).to(memory_format=torch.channels_last)
    winograd = copy.deepcopy(net)
    with_winograd(winograd)
    start = torch.rand(1, 3, scale.height, scale.width, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")

    def iteration(
        model: Any, layout: torch.memory_format, bf16: bool, plain: bool = False
    ) -> Callable[[], Any]:
        objective = core.Objective(model, scale, weights, strides(net), cpu)

        def step() -> tuple[float, torch.Tensor]:
            image = start.clone(memory_format=layout).requires_grad_(True)
            with (
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
                autograd_gram() if plain else contextlib.nullcontext(),
            ):
                loss, _ = objective(image)
            loss.backward()
            assert image.grad is not None
            return float(loss.detach()), image.grad

        return step

    variants = {
        "float32 NCHW, autograd's Gram": iteration(net, torch.contiguous_format, False, True),
        "float32 NCHW": iteration(net, torch.contiguous_format, False),
        "float32 channels_last": iteration(fused, torch.channels_last, False),
        WINOGRAD: iteration(winograd, torch.contiguous_format, False),
    }
    if bf16:  # emulated where the CPU lacks bf16 instructions: minutes per step at 512 px
        variants["bfloat16 autocast, channels_last"] = iteration(fused, torch.channels_last, True)
    rows: dict[str, Any] = interleaved_ms(variants, repeats)
    with threads(1):
        one_thread = timed_ms(variants["float32 channels_last"], repeats)
    rows["float32 channels_last, 1 thread"] = one_thread
    reference_loss, reference_grad = variants[BASELINE]()
    for name, step in variants.items():
        loss, grad = step()
        rows[name]["loss_relative_error"] = relative_error(loss, reference_loss)
        rows[name]["gradient_relative_error"] = relative_error(grad, reference_grad)
    baseline = rows[BASELINE]["median"]
    for row in rows.values():
        row["speedup"] = baseline / row["median"]
    return {
        "size": size, "canvas": [scale.width, scale.height], "repeats": repeats,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "style_layers": STYLE_LAYERS, "variants": rows,
    }  # fmt: skip


def report(result: dict[str, Any]) -> str:
    width, height = result["canvas"]
    lines = [
        "# One reconstruction iteration on the CPU (`python -m bench.iteration`)",
        "",
        f"{width}×{height}, forward and backward to the image, torch {result['torch']}, "
        f"{result['threads']} threads unless marked; median (min–max) of {result['repeats']}.",
        "",
        "| variant | ms | speed-up | loss rel. error | gradient rel. error |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in result["variants"].items():
        errors = (
            f"{row['loss_relative_error']:.1e} | {row['gradient_relative_error']:.1e}"
            if "loss_relative_error" in row
            else "(as above) | (as above)"
        )
        lines.append(
            f"| {name} | {row['median']:.0f} ({row['min']:.0f}–{row['max']:.0f}) | "
            f"{row['speedup']:.2f}× | {errors} |"
        )
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.iteration", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="also bfloat16 autocast")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = measure(args.size, args.repeats, args.bf16)
    write_report(args.out, "iteration", result, report(result))
    print(report(result))


if __name__ == "__main__":
    main()
