"""Winograd's 3×3 convolutions: the same values and image gradients as the direct ones, the
state dict unchanged, the plain convolution wherever NNPACK does not apply, and its buffer
counted in the memory estimate."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from services.reconstruction.memory import Footprint
from services.reconstruction.winograd import (
    WinogradConv2d,
    convolution_for,
    nnpack_available,
    with_winograd,
    workspace_of,
)

pytestmark = pytest.mark.skipif(not nnpack_available(), reason="this PyTorch has no NNPACK")

CPU = torch.device("cpu")
LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_2"]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def frozen_conv(channels_in: int, channels_out: int, bias: bool = True) -> nn.Conv2d:
    conv = nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator(3)) * 0.1)
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(channels_out, generator=generator(4)))
    return conv.requires_grad_(False)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bias", [True, False])
def test_values_and_the_image_gradient_are_the_direct_convolutions(bias: bool) -> None:
    conv = frozen_conv(5, 7, bias)
    winograd = WinogradConv2d(conv)
    x = torch.randn(1, 5, 37, 53, generator=generator(1))  # not a multiple of the 6 px tile
    upstream = torch.randn(1, 7, 37, 53, generator=generator(2))  # no symmetry to lean on
    grads = []
    for layer in (conv, winograd):
        image = x.clone().requires_grad_(True)
        out = layer(image)
        (grad,) = torch.autograd.grad(out, image, upstream)
        grads.append((out.detach(), grad))
    (direct, direct_grad), (fast, fast_grad) = grads
    assert relative(fast, direct) < 1e-4
    assert relative(fast_grad, direct_grad) < 1e-4
    assert not torch.equal(fast, direct)  # another algorithm, so it did run: rounding differs


@pytest.fixture(scope="module")
def net() -> nn.Module:
    from export.models import build_feature_net

    return build_feature_net("vgg19")[0]


def test_vgg19_runs_its_sixteen_convolutions_by_winograd_with_the_same_taps(
    net: nn.Module,
) -> None:
    fast = copy.deepcopy(net)
    assert with_winograd(fast) == 16
    ours, theirs = fast.state_dict(), net.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    grads = []
    for model in (net, fast):
        image = torch.rand(1, 3, 64, 80, generator=generator(5)).requires_grad_(True)
        taps = model(image, LAYERS)
        loss = sum((tap * tap).mean() for tap in taps.values())
        (grad,) = torch.autograd.grad(loss, image)
        grads.append(({n: t.detach() for n, t in taps.items()}, grad))
    (taps, grad), (fast_taps, fast_grad) = grads
    for name in LAYERS:
        assert relative(fast_taps[name], taps[name]) < 1e-4
    assert relative(fast_grad, grad) < 1e-3  # fourteen layers of rounding, back and forth


def test_elsewhere_it_is_the_plain_convolution() -> None:
    conv = frozen_conv(4, 6)
    winograd = WinogradConv2d(conv)
    x = torch.randn(1, 4, 20, 24, generator=generator(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(winograd(x), conv(x))  # autocast's bf16 convolution, not NNPACK
    as_double = copy.deepcopy(winograd).double()
    assert torch.equal(as_double(x.double()), copy.deepcopy(conv).double()(x.double()))
    assert winograd.to("meta")(x.to("meta")).shape == (1, 6, 20, 24)  # shape probes
    learning = WinogradConv2d(frozen_conv(4, 6)).requires_grad_(True)
    learning(x).sum().backward()  # weights that learn get their gradient, from autograd
    assert learning.weight.grad is not None and learning.weight.grad.abs().sum() > 0


def test_only_frozen_3x3_stride_1_convolutions_are_swapped() -> None:
    net = nn.Sequential(
        frozen_conv(3, 8),
        nn.Conv2d(8, 8, 3, stride=2, padding=1).requires_grad_(False),
        nn.Conv2d(8, 8, 1).requires_grad_(False),
        nn.Conv2d(8, 8, 3, padding=1, groups=8).requires_grad_(False),
        nn.Conv2d(8, 8, 3, padding=1),  # learning
    )
    assert with_winograd(net) == 1
    assert [type(m).__name__ for m in net] == ["WinogradConv2d", *["Conv2d"] * 4]
    with pytest.raises(ValueError, match="not a 3×3, stride 1, padding 1"):
        WinogradConv2d(nn.Conv2d(8, 8, 3, stride=2, padding=1))


def test_sessions_on_threads_get_their_own_answers(net: nn.Module) -> None:
    """PyTorch keeps NNPACK's buffer per thread; two sessions at once must not share one."""
    fast = copy.deepcopy(net)
    with_winograd(fast)
    images = [torch.rand(1, 3, 48 + 16 * i, 64, generator=generator(i)) for i in range(2)]
    with torch.no_grad():
        alone = [fast(image, ["relu2_1"])["relu2_1"] for image in images]
    together: list[torch.Tensor | None] = [None, None]

    def run(i: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                together[i] = fast(images[i], ["relu2_1"])["relu2_1"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(2):
        result = together[i]
        assert result is not None and torch.equal(result, alone[i])


def test_the_footprint_counts_nnpacks_buffer(net: nn.Module) -> None:
    fast = copy.deepcopy(net)
    with_winograd(fast)
    plain, winograd = (Footprint.measure(model, LAYERS, CPU) for model in (net, fast))
    assert plain.workspace_per_pixel == 0
    # conv1_2 and its gradient: (64 + 64) channels of 8×8 float32 tiles per 6×6 pixels
    assert winograd.workspace_per_pixel == pytest.approx((64 + 64) * 256 / 36, rel=0.07)
    assert winograd.workspace_per_pixel >= (64 + 64) * 256 / 36
    _, asked = workspace_of(lambda: fast(torch.rand(1, 3, 60, 66), ["relu1_1"]))
    assert asked == 10 * 11 * (3 + 64) * 256  # conv1_1 only: the pass stops at relu1_1


def test_the_choice_of_convolution_is_checked_in_words() -> None:
    cuda = torch.device("cuda")
    assert convolution_for("auto", CPU, "float32", "off") == "winograd"
    assert convolution_for("auto", CPU, "bfloat16", "off") == "direct"
    assert convolution_for("auto", CPU, "float32", "default") == "direct"
    assert convolution_for("auto", cuda, "float32", "off") == "direct"
    assert convolution_for("direct", CPU, "float32", "off") == "direct"
    with pytest.raises(ValueError, match=r"float32 on a CPU and without torch\.compile"):
        convolution_for("winograd", CPU, "bfloat16", "off")
    with pytest.raises(ValueError, match="device cuda"):
        convolution_for("winograd", cuda, "float32", "off")
