"""How the network computes: its number format and whether it is compiled, from config.

Only the network runs in a lower precision. Its taps come back as float32, so the Gram
matrices, the errors and the optimiser's arithmetic keep float32's accuracy: a Gram matrix
sums H·W products, which bfloat16's 8-bit mantissa would round away.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.common.config import Compile, Precision

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class Autocast(torch.nn.Module):
    """`net` under autocast to `dtype`, its taps returned as float32."""

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype, device_type: str) -> None:
        super().__init__()
        self.net, self.dtype, self.device_type = net, dtype, device_type

    def forward(self, image: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device_type, dtype=self.dtype):
            taps = self.net(image, layers)
        return {name: tap.float() for name, tap in taps.items()}


def in_precision(
    net: torch.nn.Module, device: torch.device, precision: Precision
) -> torch.nn.Module:
    if precision == "float32":
        return net
    if precision == "float16" and device.type != "cuda":
        raise ValueError(
            f"precision float16 needs a CUDA device, and this service runs on {device}; "
            "use bfloat16 or float32 on a CPU"
        )
    return Autocast(net, DTYPES[precision], device.type)


def compiled(net: torch.nn.Module, device: torch.device, compile: Compile) -> torch.nn.Module:
    """`net` through torch.compile when asked; "reduce-overhead" also replays CUDA graphs."""
    if compile == "off":
        return net
    if compile == "reduce-overhead" and device.type != "cuda":
        raise ValueError(
            f"compile reduce-overhead replays CUDA graphs and needs a CUDA device, not {device}"
        )
    # Canvas sizes vary from run to run: dynamic shapes compile once, not once per size.
    return torch.compile(net, mode=compile, dynamic=True)  # type: ignore[return-value]
