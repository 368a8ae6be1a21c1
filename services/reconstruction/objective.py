"""The loss of an image at one scale: α·L_content + β·L_style + γ·TV (DESIGN.md).

L_style = Σₖ sₖ · meanₗ ‖Gₖ(x) − G*ₖ‖² / ‖G*ₖ‖², with the guided Gram Gₖ(x) = (F⊙mₖ)(F⊙mₖ)ᵀ / Σmₖ.
L_content = meanₗ Σₚ W(p)‖F(p) − F*(p)‖² / ‖F*‖².
Departures from Gatys et al.: each layer's loss is relative to its target's energy, so layers
count equally and one set of loss weights suits every feature model; the Gram matrix is
normalised by H·W.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from services.common.errors import InvalidArgument
from services.common.guides import to_layer

FeatureNet = Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]]
# (height, width) of an input -> layer -> the shape of its activation there
ShapeCache = MutableMapping[tuple[int, int], dict[str, tuple[int, ...]]]


@dataclass(frozen=True)
class StyleChannel:
    mask: np.ndarray | None  # H×W in [0, 1] at this scale's canvas; None: everywhere
    grams: Mapping[str, np.ndarray]  # layer -> G*ₖ
    scale: float  # Σᵢ sₖᵢ


@dataclass(frozen=True)
class ScaleTargets:
    width: int
    height: int
    iterations: int
    channels: Sequence[StyleChannel]
    features: Mapping[str, np.ndarray]  # layer -> F* (C×h×w)
    content_weights: Mapping[str, np.ndarray]  # layer -> W (h×w)


@dataclass(frozen=True)
class LossWeights:
    content: float  # α
    style: float  # β
    tv: float  # γ


@dataclass(frozen=True)
class Losses:
    content: float
    style: float
    tv: float

    @property
    def total(self) -> float:
        return self.content + self.style + self.tv


class _Gram(torch.autograd.Function):
    """F Fᵀ / n for a C×N matrix, with a backward of one product instead of autograd's two.

    Autograd sees two uses of F and computes ∂/∂F for each (two C×C by C×N products, then
    their sum); the gradient is (G' + G'ᵀ) F / n, one product. This is a tenth of an
    iteration's time on the CPU.
    """

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, n: float | torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat)
        ctx.n = n
        return (flat @ flat.T) / n

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (flat,) = ctx.saved_tensors
        return ((grad + grad.T) @ flat) / ctx.n, None


def gram(features: torch.Tensor) -> torch.Tensor:
    """G = F Fᵀ / (H W) for a 1×C×H×W feature map."""
    flat = features[0].flatten(1)
    return _Gram.apply(flat, flat.shape[1])


def guided_gram(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Gₖ = (F⊙m)(F⊙m)ᵀ / Σm for a 1×C×H×W feature map and an H×W mask."""
    masked = (features * mask)[0].flatten(1)
    return _Gram.apply(masked, mask.sum())  # a tensor: no device sync per evaluation


def relative_error(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖value − target‖² / ‖target‖², the loss terms' measure: squared, unlike
    export.onnx_export.relative_error, which compares one computation with another."""
    return (value - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between neighbouring pixels, both directions."""
    down = (image[..., 1:, :] - image[..., :-1, :]).pow(2).mean()
    right = (image[..., :, 1:] - image[..., :, :-1]).pow(2).mean()
    return down + right


_TWINS: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


def shape_probe(net: FeatureNet, device: torch.device) -> tuple[FeatureNet, torch.device]:
    """A network that gives `net`'s activation shapes, and the device to feed it on.

    A module's twin on the meta device computes shapes and no values: microseconds instead of
    a forward pass when a session starts. Any other callable is probed as it is.
    """
    if not isinstance(net, torch.nn.Module):
        return net, device
    module: torch.nn.Module = getattr(net, "_orig_mod", net)  # torch.compile's: uncompiled
    twin = _TWINS.get(module)
    if twin is None:
        twin = _TWINS[module] = copy.deepcopy(module).to("meta")
    return twin, torch.device("meta")


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.array(array, dtype=np.float32), device=device)


class Objective:
    """The loss of an image at one scale, split into its three weighted terms."""

    def __init__(
        self,
        net: FeatureNet,
        targets: ScaleTargets,
        weights: LossWeights,
        strides: Mapping[str, int],
        device: torch.device,
        shape_cache: ShapeCache | None = None,
    ) -> None:
        self.net, self.targets, self.weights = net, targets, weights
        style_layers = {name for channel in targets.channels for name in channel.grams}
        self.layers = sorted(style_layers | set(targets.features))
        for name in self.layers:
            if name not in strides:
                raise InvalidArgument(f"unknown layer {name}; the model has {', '.join(strides)}")
        shapes = self._shapes(device, {} if shape_cache is None else shape_cache)
        self.channels = [
            (channel.scale, self._grams(channel, shapes, strides, device))
            for channel in targets.channels
        ]
        self.features = {}
        for name, target in targets.features.items():
            if tuple(target.shape) != shapes[name][1:]:
                raise InvalidArgument(
                    f"features[{name}]: shape {tuple(target.shape)} != {shapes[name][1:]} "
                    f"at {targets.width}×{targets.height}"
                )
            weight = _tensor(targets.content_weights[name], device)
            self.features[name] = (_tensor(target, device)[None], weight)

    def _shapes(self, device: torch.device, cache: ShapeCache) -> dict[str, tuple[int, ...]]:
        """Each layer's activation shape at this canvas, probed once per size (tiles repeat)."""
        size = (self.targets.height, self.targets.width)
        known = cache.get(size, {})
        missing = [name for name in self.layers if name not in known]
        if missing:
            probe, on = shape_probe(self.net, device)
            with torch.no_grad():
                taps = probe(torch.zeros(1, 3, *size, device=on), missing)
            known = {**known, **{n: tuple(f.shape) for n, f in taps.items()}}
            cache[size] = known
        return known

    def _grams(
        self,
        channel: StyleChannel,
        shapes: Mapping[str, tuple[int, ...]],
        strides: Mapping[str, int],
        device: torch.device,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Layer -> (G*, mask at the layer or None); layers the mask leaves empty are skipped."""
        grams: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for name, target in channel.grams.items():
            channels, height, width = shapes[name][1:]
            if tuple(target.shape) != (channels, channels):
                raise InvalidArgument(
                    f"grams[{name}]: shape {tuple(target.shape)} != ({channels}, {channels})"
                )
            mask = None
            if channel.mask is not None:
                small = to_layer(channel.mask, height, width, strides[name])
                if small.sum() <= 1e-6:
                    continue
                mask = _tensor(small, device)
            grams[name] = (_tensor(target, device), mask)
        return grams

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, Losses]:
        pixels = image.expand(-1, 3, -1, -1)  # a luminance image is optimised as grey RGB
        taps = self.net(pixels, self.layers) if self.layers else {}
        zero = image.new_zeros(())
        style = zero
        for scale, grams in self.channels:
            errors = [
                relative_error(gram(taps[n]) if m is None else guided_gram(taps[n], m), g)
                for n, (g, m) in grams.items()
            ]
            style = style + scale * sum(errors, zero) / max(len(errors), 1)
        content = zero
        for name, (target, weight) in self.features.items():
            error = ((taps[name] - target).pow(2) * weight).sum() / target.pow(2).sum().clamp_min(
                1e-12
            )
            content = content + error / len(self.features)
        terms = (
            self.weights.content * content,
            self.weights.style * style,
            self.weights.tv * total_variation(image),
        )
        return terms[0] + terms[1] + terms[2], Losses(*(float(t.detach()) for t in terms))

    def evaluate(self, image: torch.Tensor) -> tuple[torch.Tensor, Losses]:
        """The loss, with its gradient left in `image.grad` (for an optimiser's closure)."""
        loss, losses = self(image)
        loss.backward()
        return loss.detach(), losses

    def measure(self, image: torch.Tensor) -> Losses:
        with torch.no_grad():
            return self(image.detach())[1]
