"""The feed-forward path: one network for N styles with conditional instance normalisation.

Dumoulin, Shlens and Kudlur (2017): every normalisation layer keeps a (γ, β) per style, and a
weighted mix of styles is the weighted mix of their (γ, β). The body follows Johnson et al.
(downsampling convolutions, residual blocks, resize-then-convolve upsampling against
checkerboard artefacts); it departs from them for speed on small machines: 16/32/64 channels
instead of 32/64/128, and depthwise-separable convolutions in the residual blocks.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConditionalInstanceNorm(nn.Module):
    """Instance normalisation whose scale and shift are a weighted mix of per-style (γ, β)."""

    def __init__(self, channels: int, styles: int) -> None:
        super().__init__()
        self.gammas = nn.ParameterList(nn.Parameter(torch.ones(channels)) for _ in range(styles))
        self.betas = nn.ParameterList(nn.Parameter(torch.zeros(channels)) for _ in range(styles))

    def mixed(self, weights: Tensor) -> tuple[Tensor, Tensor]:
        """(γ, β) for a B×N batch of style weights: B×C each."""
        return weights @ torch.stack(list(self.gammas)), weights @ torch.stack(list(self.betas))

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        gamma, beta = self.mixed(weights)
        return F.instance_norm(x, eps=1e-5) * gamma[:, :, None, None] + beta[:, :, None, None]

    def add_style(self, like: int | None = None) -> None:
        """One more style, starting from style `like` (or the identity scale and shift)."""
        start = (self.gammas[like], self.betas[like]) if like is not None else None
        gamma = start[0].detach().clone() if start else torch.ones_like(self.gammas[0])
        beta = start[1].detach().clone() if start else torch.zeros_like(self.betas[0])
        self.gammas.append(nn.Parameter(gamma))
        self.betas.append(nn.Parameter(beta))


class ConvNorm(nn.Module):
    """Reflection padding, a convolution, conditional instance norm, and ReLU unless `last`."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, styles: int, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.pad = nn.ReflectionPad2d(kernel // 2)
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, groups=groups)
        self.norm = ConditionalInstanceNorm(c_out, styles)

    def forward(self, x: Tensor, weights: Tensor, relu: bool = True) -> Tensor:
        x = self.norm(self.conv(self.pad(x)), weights)
        return F.relu(x) if relu else x


class SeparableResidual(nn.Module):
    """x + f(x), each half of f a depthwise 3×3 then a pointwise 1×1, conditionally normalised."""

    def __init__(self, channels: int, styles: int) -> None:
        super().__init__()
        self.depthwise = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, groups=channels) for _ in range(2)
        )
        self.pointwise = nn.ModuleList(ConvNorm(channels, channels, 1, styles) for _ in range(2))

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        y = x
        for half, (depthwise, pointwise) in enumerate(
            zip(self.depthwise, self.pointwise, strict=True)
        ):
            y = pointwise(
                depthwise(F.pad(y, (1, 1, 1, 1), mode="reflect")), weights, relu=half == 0
            )
        return x + y


MULTIPLE = 4  # two stride-2 layers: sides must divide by 4 to come back at the same size


class FastStyleNet(nn.Module):
    """RGB in [0, 1] (sides a multiple of 4) and B×N style weights → stylised RGB in [0, 1]."""

    def __init__(self, styles: int, width: int = 16, residuals: int = 4) -> None:
        super().__init__()
        w = width
        self.down = nn.ModuleList(
            [ConvNorm(3, w, 5, styles), ConvNorm(w, 2 * w, 3, styles, stride=2),
             ConvNorm(2 * w, 4 * w, 3, styles, stride=2)]
        )  # fmt: skip
        self.residuals = nn.ModuleList(SeparableResidual(4 * w, styles) for _ in range(residuals))
        self.up = nn.ModuleList([ConvNorm(4 * w, 2 * w, 3, styles), ConvNorm(2 * w, w, 3, styles)])
        self.out = nn.Sequential(nn.ReflectionPad2d(2), nn.Conv2d(w, 3, 5))

    @property
    def styles(self) -> int:
        return len(self.norms()[0].gammas)

    def norms(self) -> list[ConditionalInstanceNorm]:
        return [m for m in self.modules() if isinstance(m, ConditionalInstanceNorm)]

    def forward(self, image: Tensor, weights: Tensor) -> Tensor:
        x = image * 2 - 1
        for layer in self.down:
            x = layer(x, weights)
        for block in self.residuals:
            x = block(x, weights)
        for layer in self.up:
            # Resize, then convolve: no checkerboard from transposed convolutions.
            x = layer(F.interpolate(x, scale_factor=2.0, mode="nearest"), weights)
        return torch.sigmoid(self.out(x))

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


def export_onnx(net: FastStyleNet, path: Path, opset: int = 17) -> Path:
    """ONNX with inputs `image` (B×3×H×W) and `style_weights` (B×N); mixing happens inside."""
    net = net.eval()
    example = (torch.rand(1, 3, 64, 64), one_hot(0, net.styles))
    torch.onnx.export(
        net,
        example,
        str(path),
        input_names=["image", "style_weights"],
        output_names=["stylised"],
        dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "style_weights": {0: "batch"},
                      "stylised": {0: "batch", 2: "height", 3: "width"}},
        opset_version=opset,
        dynamo=False,
    )  # fmt: skip
    return path
