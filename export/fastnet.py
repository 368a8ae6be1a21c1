"""The feed-forward path: one network for N styles with conditional instance normalisation.

Dumoulin, Shlens and Kudlur (2017): every normalisation layer keeps a (γ, β) per style, and a
weighted mix of styles is the weighted mix of their (γ, β). The body follows Johnson et al.
(downsampling convolutions, residual blocks, resize-then-convolve upsampling against
checkerboard artefacts); it departs from them for speed on small machines: few channels at
full resolution, and depthwise-separable convolutions wherever a layer is wide
(docs/perf.md has the measurements behind each choice).

Style weights are either B×N (one mix for the whole image) or B×N×H×W (a mix per pixel, for
influence maps). The per-pixel form mixes (γ, β) per pixel, after normalising with the whole
image's statistics: one pass of the network whatever the number of styles, where running each
style and blending the outputs would cost one pass per style.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Layout:
    """Channels at full, half and quarter resolution, and residual blocks at quarter."""

    full: int = 8
    half: int = 32
    quarter: int = 64
    residuals: int = 4

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ConditionalInstanceNorm(nn.Module):
    """Instance normalisation whose scale and shift are a weighted mix of per-style (γ, β)."""

    def __init__(self, channels: int, styles: int) -> None:
        super().__init__()
        self.gammas = nn.ParameterList(nn.Parameter(torch.ones(channels)) for _ in range(styles))
        self.betas = nn.ParameterList(nn.Parameter(torch.zeros(channels)) for _ in range(styles))

    def mixed(self, weights: Tensor) -> tuple[Tensor, Tensor]:
        """(γ, β) for B×N weights (B×C×1×1 each) or B×N×H×W weights (B×C×H×W each)."""
        gammas, betas = torch.stack(list(self.gammas)), torch.stack(list(self.betas))
        if weights.dim() == 2:
            return (weights @ gammas)[:, :, None, None], (weights @ betas)[:, :, None, None]
        # A 1×1 convolution with the N×C tables is the per-pixel weighted sum.
        return (
            F.conv2d(weights, gammas.t()[:, :, None, None]),
            F.conv2d(weights, betas.t()[:, :, None, None]),
        )

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        gamma, beta = self.mixed(weights)
        return F.instance_norm(x, eps=1e-5) * gamma + beta

    def add_style(self, like: int | None = None) -> None:
        """One more style, starting from style `like` (or the identity scale and shift)."""
        start = (self.gammas[like], self.betas[like]) if like is not None else None
        gamma = start[0].detach().clone() if start else torch.ones_like(self.gammas[0])
        beta = start[1].detach().clone() if start else torch.zeros_like(self.betas[0])
        self.gammas.append(nn.Parameter(gamma))
        self.betas.append(nn.Parameter(beta))


class ConvNorm(nn.Module):
    """A convolution, conditional instance norm, and ReLU unless told otherwise.

    Zero padding inside the convolution, not reflection padding: on ONNX Runtime's CPU provider
    a separate Pad node, and the layout reorders around it, took a large share of the time
    (ONNX Runtime's profile in docs/perf.md, issue 5), and training learns the border.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, styles: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)
        self.norm = ConditionalInstanceNorm(c_out, styles)

    def forward(self, x: Tensor, weights: Tensor, relu: bool = True) -> Tensor:
        x = self.norm(self.conv(x), weights)
        return F.relu(x) if relu else x


class SeparableConvNorm(nn.Module):
    """A depthwise 3×3 then a pointwise 1×1: about a ninth of a full 3×3's work when wide."""

    def __init__(self, c_in: int, c_out: int, styles: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, groups=c_in, padding=1)
        self.pointwise = ConvNorm(c_in, c_out, 1, styles)

    def forward(self, x: Tensor, weights: Tensor, relu: bool = True) -> Tensor:
        return self.pointwise(self.depthwise(x), weights, relu)


class Upsample(nn.Module):
    """Narrow with a 1×1 at the low resolution, double by nearest neighbour, then convolve.

    Resize-then-convolve avoids the checkerboard of transposed convolutions; narrowing before
    the resize means the wide tensor is never made at the higher resolution.
    """

    def __init__(self, c_in: int, c_out: int, styles: int) -> None:
        super().__init__()
        self.narrow = nn.Conv2d(c_in, c_out, 1)
        self.smooth = SeparableConvNorm(c_out, c_out, styles)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        return self.smooth(F.interpolate(self.narrow(x), scale_factor=2.0, mode="nearest"), weights)


class SeparableResidual(nn.Module):
    """x + f(x), f two separable convolutions, the second without ReLU."""

    def __init__(self, channels: int, styles: int) -> None:
        super().__init__()
        self.first = SeparableConvNorm(channels, channels, styles)
        self.second = SeparableConvNorm(channels, channels, styles)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        return x + self.second(self.first(x, weights), weights, relu=False)


MULTIPLE = 4  # two stride-2 layers: sides must divide by 4 to come back at the same size


class FastStyleNet(nn.Module):
    """RGB in [0, 1] (sides a multiple of 4) and style weights → stylised RGB in [0, 1].

    The network adds a residual to its input. With `identity`, style 0 is the identity: its
    (γ, β) in the last normalisation are zero and frozen, so its residual is exactly 0 and
    mixing it in with weight 1 − s is a strength s that reaches the photo itself at 0.
    """

    def __init__(self, styles: int, layout: Layout = Layout(), identity: bool = False) -> None:
        super().__init__()
        self.layout = layout
        full, half, quarter = layout.full, layout.half, layout.quarter
        self.down = nn.ModuleList(
            [ConvNorm(3, full, 5, styles), ConvNorm(full, half, 3, styles, stride=2),
             ConvNorm(half, quarter, 3, styles, stride=2)]
        )  # fmt: skip
        self.residuals = nn.ModuleList(
            SeparableResidual(quarter, styles) for _ in range(layout.residuals)
        )
        self.up = nn.ModuleList([Upsample(quarter, half, styles), Upsample(half, full, styles)])
        # No bias: a residual of exactly 0 must be possible; the styles' β shift it instead.
        self.out = nn.Conv2d(full, 3, 3, padding=1, bias=False)
        self.identity = identity
        if identity:
            last = self.norms()[-1]  # the one before the output convolution
            for parameter in (last.gammas[0], last.betas[0]):
                nn.init.zeros_(parameter)
                parameter.requires_grad_(False)

    @property
    def styles(self) -> int:
        return len(self.norms()[0].gammas)

    def norms(self) -> list[ConditionalInstanceNorm]:
        return [m for m in self.modules() if isinstance(m, ConditionalInstanceNorm)]

    def forward(self, image: Tensor, weights: Tensor) -> Tensor:
        # Per-pixel weights are area-averaged onto each resolution the layers work at.
        full = weights
        half = F.avg_pool2d(full, 2) if weights.dim() == 4 else weights
        quarter = F.avg_pool2d(half, 2) if weights.dim() == 4 else weights
        x = self.down[0](image * 2 - 1, full)
        x = self.down[1](x, half)
        x = self.down[2](x, quarter)
        for block in self.residuals:
            x = block(x, quarter)
        x = self.up[0](x, half)
        x = self.up[1](x, full)
        return torch.clamp(image + self.out(x), 0.0, 1.0)

    def add_style(self, like: int | None = None) -> list[nn.Parameter]:
        """Grow every CIN layer by one style; returns the new (γ, β), the only ones to train."""
        new = []
        for norm in self.norms():
            norm.add_style(like)
            new += [norm.gammas[-1], norm.betas[-1]]
        return new


def one_hot(style: int, styles: int, batch: int = 1) -> Tensor:
    weights = torch.zeros(batch, styles)
    weights[:, style] = 1.0
    return weights


def export_onnx(net: FastStyleNet, path: Path, *, per_pixel: bool = False, opset: int = 17) -> Path:
    """ONNX with inputs `image` (B×3×H×W) and `style_weights` (B×N, or B×N×H×W if per_pixel)."""
    net = net.eval()
    image = torch.rand(1, 3, 64, 64)
    weights = torch.full((1, net.styles, 64, 64) if per_pixel else (1, net.styles), 1 / net.styles)
    spatial = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        net,
        (image, weights),
        str(path),
        input_names=["image", "style_weights"],
        output_names=["stylised"],
        dynamic_axes={"image": spatial, "style_weights": spatial if per_pixel else {0: "batch"},
                      "stylised": spatial},
        opset_version=opset,
        dynamo=False,
    )  # fmt: skip
    return path
