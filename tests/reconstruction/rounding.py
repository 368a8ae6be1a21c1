"""Float32 against float64 through VGG: on the routes the float32 pass took, so that what is
left between them is rounding, which bounds can hold.

Rounding moves a few ReLU inputs that lie within a rounding of 0 across it (1 to 3 of the 10⁶
units up to relu4_2 at 64×80 px), and such a ReLU routes the image's gradient anew: a jump, on
one machine's kernels and not another's, that no bound on rounding can hold. So the float64
reference here sends each ReLU and max pool's input the way the float32 pass did, read from its
taps: a ReLU's mask is where its output is positive, a max pool's choice the argmax of the ReLU
output it takes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from export.models import FeatureNet
from export.onnx_export import relative_error

UNIT_ROUNDOFF = 2.0**-24  # float32's: every result is rounded by up to this, relatively

Loss = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def every_relu_to(net: FeatureNet, deepest: str) -> list[str]:
    """The taps that show every route up to `deepest`: each ReLU before it, and it."""
    names = list(net.layer_names)
    return names[: names.index(deepest) + 1]


def on_the_same_routes(
    reference: FeatureNet, image: torch.Tensor, taps: dict[str, torch.Tensor], loss: Loss
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The float64 taps and image gradient of `loss` through `reference` (VGG in float64),
    routed as the float32 `taps`, which hold every ReLU up to the deepest wanted."""
    pixels = image.double().requires_grad_(True)
    x, names, exact = reference.normalise(pixels), iter(taps), {}
    last: torch.Tensor | None = None  # the float32 pass's latest ReLU output
    for module in cast(nn.Sequential, reference.features):
        if isinstance(module, nn.ReLU):
            name = next(names, None)
            if name is None:
                break
            last = taps[name].detach()
            x = exact[name] = x * (last > 0)
        elif isinstance(module, nn.MaxPool2d):
            assert last is not None
            _, chosen = F.max_pool2d(last, 2, return_indices=True)
            x = x.flatten(2).gather(2, chosen.flatten(2)).view_as(chosen)
        else:
            x = module(x)
    (grad,) = torch.autograd.grad(loss(exact), pixels)
    return {name: tap.detach() for name, tap in exact.items()}, grad


def errors_against_float64(
    model: nn.Module, reference: nn.Module, image: torch.Tensor, layers: Sequence[str], loss: Loss
) -> tuple[list[float], float]:
    """`model`'s float32 taps at `layers` (deepest last) and image gradient of `loss`, each as
    its relative error against float64 `reference` on the routes `model` took."""
    assert isinstance(reference, FeatureNet) and reference.architecture == "vgg19"
    pixels = image.clone().requires_grad_(True)
    taps = model(pixels, every_relu_to(reference, layers[-1]))
    (grad,) = torch.autograd.grad(loss(taps), pixels)
    exact, exact_grad = on_the_same_routes(reference, image, taps, loss)
    return [relative_error(taps[name], exact[name]) for name in layers], relative_error(
        grad, exact_grad
    )
