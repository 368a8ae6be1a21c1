"""ONNX Runtime's execution providers: which to use, and TensorRT's options.

Shared by everything that opens an ONNX Runtime session (the features service's extractor, the
fast network wherever it runs); imports no ONNX Runtime itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import FailedPrecondition
from services.common.manifest import MIN_SIDE_PX

# TensorRT's optimisation profile: the smallest side a model takes, the usual, the largest served.
TENSORRT_SIDES = (MIN_SIDE_PX, 512, 2048)


def choose_providers(wanted: Sequence[str], available: Sequence[str]) -> list[str]:
    """The wanted providers that this ONNX Runtime offers, in the wanted order."""
    chosen = [name for name in wanted if name in available]
    if not chosen:
        raise FailedPrecondition(
            f"none of the execution providers {list(wanted)} is available; "
            f"this ONNX Runtime offers {list(available)}"
        )
    return chosen


@dataclass(frozen=True)
class TensorRTSettings:
    """fp16, an engine cache (building an engine takes minutes), and one optimisation profile
    from the smallest to the largest square side served, tuned for the usual one."""

    fp16: bool = True
    engine_cache: Path | None = None
    sides: tuple[int, int, int] = TENSORRT_SIDES  # min, opt, max


DEFAULT_TENSORRT = TensorRTSettings()
Shapes = Callable[[int], dict[str, tuple[int, ...]]]  # the inputs' shapes at a square side


def session_providers(
    chosen: Sequence[str], tensorrt: TensorRTSettings, shapes: Shapes
) -> list[str | tuple[str, dict[str, str]]]:
    """The chosen providers, TensorRT with its options (ONNX Runtime takes them as strings)."""

    def profile(side: int) -> str:
        return ",".join(
            f"{name}:{'x'.join(map(str, shape))}" for name, shape in shapes(side).items()
        )

    providers: list[str | tuple[str, dict[str, str]]] = []
    for name in chosen:
        if name != "TensorrtExecutionProvider":
            providers.append(name)
            continue
        low, usual, high = tensorrt.sides
        options = {
            "trt_fp16_enable": str(tensorrt.fp16),
            "trt_profile_min_shapes": profile(low),
            "trt_profile_opt_shapes": profile(usual),
            "trt_profile_max_shapes": profile(high),
        }
        if tensorrt.engine_cache is not None:
            options |= {
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(tensorrt.engine_cache),
                "trt_timing_cache_enable": "True",
            }
        providers.append((name, options))
    return providers
