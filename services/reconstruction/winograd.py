"""VGG's 3×3 convolutions by Winograd's minimal filtering on the CPU (NNPACK's F(6×6, 3×3)).

Winograd's transform computes a 6×6 block of a 3×3 convolution's output with 64
multiplications per pair of channels where the direct method needs 324 (docs/perf.md has
what that gave per layer and per iteration).
PyTorch hands a convolution to NNPACK only for batches of 16 or more, and a reconstruction's
batch is one image, so the layers here call it themselves.

The image's gradient takes the same road: with stride 1 and padding 1, the gradient of a 3×3
convolution with respect to its input is the convolution of the output's gradient with the
filters turned 180° and their input and output channels swapped.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from services.common.config import Compile, Convolution, Precision

# NNPACK's F(6×6, 3×3) works on 8×8 input tiles, each giving 6×6 outputs; it keeps every tile of
# a layer transformed, for a block of the input's channels and all the output's, as 64 float32
# numbers each, and the kernel transformed for that block and every output channel.
TILE_OUT = 6
TRANSFORMED_TILE_BYTES = 8 * 8 * 4
# The block is what fits, with its 3×4 GEMM's operands, in a thread's share of the L1 data
# cache: 8-float tuples, x86-64 FMA3's micro-kernel (NNPACK's src/convolution-inference.c).
TUPLE_BYTES, GEMM_MR, GEMM_NR = 8 * 4, 3, 4
CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def _cpus_in(listed: str) -> int:
    """How many CPUs "0-3,8" names."""
    ranges = [part.split("-") for part in listed.strip().split(",") if part]
    return sum(int(r[-1]) - int(r[0]) + 1 for r in ranges)


def input_channel_block(caches: Path = CPU_CACHES) -> int | None:
    """NNPACK's block of input channels on this CPU; None where Linux does not say its L1."""
    for index in sorted(caches.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
            threads = _cpus_in((index / "shared_cpu_list").read_text())
        except (OSError, ValueError):
            continue
        if level == "1" and kind in ("Data", "Unified") and size.endswith("K"):
            elements = int(size[:-1]) * 1024 // max(threads, 1) // TUPLE_BYTES
            return max(elements // (GEMM_MR + GEMM_NR) // 2 * 2, 2)
    return None


CHANNEL_BLOCK = input_channel_block()
# Below this many pixels a layer takes the direct convolution: NNPACK transforms the filters on
# every call, which costs more than the multiplications it saves on a small input (measured a
# layer at a time, 2 threads: 512→512 at 12×12 px 17.4 ms against 3.9 direct, at 48×48 48.5
# against 58.1; 256→256 at 24×24 6.0 against 3.9, at 48×48 10.4 against 14.6).
MIN_PIXELS = 48 * 48


class Workspace(NamedTuple):
    """NNPACK's buffer for one convolution, in bytes: `tiles`, what grows with the image, and
    `kernel`, the filters' transform, which does not."""

    tiles: int
    kernel: int


T = TypeVar("T")


def nnpack_available() -> bool:
    return torch.backends.nnpack.is_available()  # also initialises NNPACK, which it needs first


class _Winograd(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        turned: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        ctx.turned = turned  # a constant of the layer, not an activation to save
        return torch._nnpack_spatial_convolution(x.contiguous(), weight, bias, [1, 1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        dx = torch._nnpack_spatial_convolution(grad.contiguous(), ctx.turned, None, [1, 1])
        return dx, None, None, None


class WinogradConv2d(nn.Module):
    """A frozen 3×3, stride 1, padding 1 convolution, by Winograd on a CPU in float32.

    Elsewhere (another device, the meta device of shape probes, autocast's lower precision, or
    weights that learn) it is the plain convolution. Its state dict is the convolution's."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not winograd_shaped(conv):
            raise ValueError(f"{conv} is not a 3×3, stride 1, padding 1, ungrouped convolution")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.weight, self.bias = conv.weight, conv.bias
        turned = conv.weight.detach().transpose(0, 1).flip(2, 3).contiguous()
        self.register_buffer("turned", turned, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._nnpack_fits(x):
            return F.conv2d(x, self.weight, self.bias, padding=1)
        pixels, listed = x.shape[-2] * x.shape[-1], _ASKED.filters
        measuring = listed is not None  # only while workspace_of measures: not in a session
        if listed is not None:
            listed.append((pixels, self.workspace(1, 1).kernel))
        if pixels < MIN_PIXELS:
            return F.conv2d(x, self.weight, self.bias, padding=1)
        if measuring:
            _ASKED.tiles = max(_ASKED.tiles, self.workspace(x.shape[-2], x.shape[-1]).tiles)
        weight = self.weight.contiguous()
        return _Winograd.apply(x, weight, self.bias, self.turned)

    def _nnpack_fits(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not self.weight.requires_grad
        )

    def workspace(self, height: int, width: int, block: int | None = CHANNEL_BLOCK) -> Workspace:
        """NNPACK's buffer at a height×width input, the larger of the convolution's and the
        image gradient's, which swaps the channel counts; `block` is this CPU's block of input
        channels (None: all of them, an upper bound). PyTorch keeps the largest buffer a thread
        has needed until the thread ends."""
        tiles = math.ceil(height / TILE_OUT) * math.ceil(width / TILE_OUT)

        def one(inputs: int, outputs: int) -> Workspace:
            blocked = min(inputs, block) if block else inputs
            return Workspace(
                tiles * (blocked + outputs) * TRANSFORMED_TILE_BYTES,
                outputs * blocked * TRANSFORMED_TILE_BYTES,
            )

        forward, backward = (
            one(self.in_channels, self.out_channels),
            one(self.out_channels, self.in_channels),
        )
        return Workspace(max(forward.tiles, backward.tiles), max(forward.kernel, backward.kernel))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), Winograd F(6×6, 3×3)"


def winograd_shaped(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def with_winograd(net: nn.Module) -> int:
    """Swap, in place, each frozen 3×3 convolution that fits for its Winograd form; the count."""
    if not nnpack_available():
        raise RuntimeError("this PyTorch build has no NNPACK, so no Winograd convolutions")
    swaps = [
        (parent, name, child)
        for parent in net.modules()
        for name, child in parent.named_children()
        if winograd_shaped(child) and not any(p.requires_grad for p in child.parameters())
    ]
    for parent, name, child in swaps:
        setattr(parent, name, WinogradConv2d(child))  # type: ignore[arg-type]
    return len(swaps)


class Asked(NamedTuple):
    """What a run's Winograd layers asked of NNPACK: the largest transformed tiles, in bytes,
    and for every layer that fits NNPACK, its input's pixels and the bytes of its transformed
    filters (asked for only from MIN_PIXELS on)."""

    tiles: int
    filters: list[tuple[int, int]]


class _Asked(threading.local):
    """This thread's: per thread, as PyTorch keeps NNPACK's buffer, and so exact while other
    sessions run. The filters are listed only while workspace_of measures."""

    def __init__(self) -> None:
        self.tiles = 0
        self.filters: list[tuple[int, int]] | None = None


_ASKED = _Asked()


def workspace_of(run: Callable[[], T]) -> tuple[T, Asked]:
    """`run`'s result, and what its Winograd layers asked of NNPACK."""
    _ASKED.tiles, _ASKED.filters = 0, []
    try:
        result = run()
        return result, Asked(_ASKED.tiles, _ASKED.filters)
    finally:
        _ASKED.filters = None


def convolution_for(
    choice: Convolution, device: torch.device, precision: Precision, compile: Compile
) -> str:
    """ "winograd" or "direct": what `choice` means here. Winograd runs on NNPACK, which takes
    float32 on a CPU; torch.compile and autocast bring kernels of their own."""
    fits = device.type == "cpu" and precision == "float32" and compile == "off"
    if choice == "auto":
        return "winograd" if fits and nnpack_available() else "direct"
    if choice == "winograd" and not fits:
        raise ValueError(
            "convolution winograd runs on NNPACK, in float32 on a CPU and without torch.compile; "
            f"this service has device {device}, precision {precision}, compile {compile}. "
            "Use convolution auto or direct"
        )
    if choice == "winograd" and not nnpack_available():
        raise ValueError("convolution winograd needs NNPACK, which this PyTorch build lacks")
    return choice
