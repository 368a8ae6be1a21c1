"""Winograd's 3×3 convolutions: the same values and image gradients as the direct ones, the
state dict unchanged, the plain convolution wherever NNPACK does not apply, and its buffer
counted in the memory estimate."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from export.onnx_export import relative_error
from services.reconstruction.memory import Footprint
from services.reconstruction.winograd import (
    CHANNEL_BLOCK,
    WinogradConv2d,
    convolution_for,
    input_channel_block,
    nnpack_available,
    with_winograd,
    workspace_of,
)
from tests.reconstruction.rounding import UNIT_ROUNDOFF, errors_against_float64

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


# Lavin and Gray's F(6, 3) on the points 0, ±1, ±2, ±1/2, ∞, which NNPACK's F(6×6, 3×3) applies
# along each axis: outputs Aᵀ[(G g) ⊙ (Bᵀ d)] for 3 taps g and 8 inputs d.
B_T = torch.tensor([
    [1, 0, -21 / 4, 0, 21 / 4, 0, -1, 0],
    [0, 1, 1, -17 / 4, -17 / 4, 1, 1, 0],
    [0, -1, 1, 17 / 4, -17 / 4, -1, 1, 0],
    [0, 1 / 2, 1 / 4, -5 / 2, -5 / 4, 2, 1, 0],
    [0, -1 / 2, 1 / 4, 5 / 2, -5 / 4, -2, 1, 0],
    [0, 2, 4, -5 / 2, -5, 1 / 2, 1, 0],
    [0, -2, 4, 5 / 2, -5, -1 / 2, 1, 0],
    [0, -1, 0, 21 / 4, 0, -21 / 4, 0, 1],
], dtype=torch.float64)  # fmt: skip
G = torch.tensor([
    [1, 0, 0], [-2 / 9, -2 / 9, -2 / 9], [-2 / 9, 2 / 9, -2 / 9], [1 / 90, 1 / 45, 2 / 45],
    [1 / 90, -1 / 45, 2 / 45], [32 / 45, 16 / 45, 8 / 45], [32 / 45, -16 / 45, 8 / 45], [0, 0, 1],
], dtype=torch.float64)  # fmt: skip
POINTS = torch.tensor([0, 1, -1, 2, -2, 1 / 2, -1 / 2], dtype=torch.float64)
INFINITY = torch.eye(6, dtype=torch.float64)[:, 5:]  # the point ∞ adds to the last output only
A_T = torch.cat([torch.stack([POINTS**i for i in range(6)]), INFINITY], dim=1)

# How many times the direct convolution's worst-case rounding error Winograd's can be. Along
# one axis an output's error is at most about u Σₖ |Aᵀᵢₖ| (|G||g|)ₖ (|Bᵀ||d|)ₖ ≤ u α ‖g‖₁ ‖d‖∞,
# where the direct sum's is u ‖g‖₁ ‖d‖∞, with α = maxᵢ Σₖ |Aᵀᵢₖ| maxⱼ |Gₖⱼ| Σₗ |Bᵀₖₗ| ≈ 40
# (u: float32's unit roundoff); a 6×6 tile takes the transforms along both axes: α².
ALPHA = float((A_T.abs() @ (G.abs().amax(1) * B_T.abs().sum(1))).amax())
WINOGRAD_AMPLIFICATION = ALPHA**2


def test_the_amplification_is_that_of_the_transform_that_convolves() -> None:
    taps = torch.randn(3, 3, generator=generator(7), dtype=torch.float64)
    inputs = torch.randn(8, 8, generator=generator(8), dtype=torch.float64)
    tile = A_T @ ((G @ taps @ G.T) * (B_T @ inputs @ B_T.T)) @ A_T.T
    direct = F.conv2d(inputs[None, None], taps[None, None])[0, 0]  # a correlation, as in CNNs
    torch.testing.assert_close(tile, direct, rtol=0, atol=1e-12)
    assert abs(ALPHA - 721 / 18) < 1e-12  # ≈ 40


def within_winograds_rounding(winograd: float, direct: float) -> bool:
    """Whether Winograd's error against float64 is within its amplification of the direct
    convolution's at the same depth, the yardstick of float32 rounding on this machine's kernels
    (never below u: every float32 result is rounded once at least)."""
    return winograd < WINOGRAD_AMPLIFICATION * max(direct, UNIT_ROUNDOFF)


@pytest.mark.parametrize("bias", [True, False])
def test_values_and_the_image_gradient_are_the_direct_convolutions(bias: bool) -> None:
    conv = frozen_conv(5, 7, bias)
    winograd = WinogradConv2d(conv)
    x = torch.randn(1, 5, 49, 53, generator=generator(1))  # not a multiple of the 6 px tile
    upstream = torch.randn(1, 7, 49, 53, generator=generator(2))  # no symmetry to lean on
    grads = []
    for layer in (conv, winograd, copy.deepcopy(conv).double()):
        image = x.clone().to(layer.weight.dtype).requires_grad_(True)
        out = layer(image)
        (grad,) = torch.autograd.grad(out, image, upstream.to(out.dtype))
        grads.append((out.detach(), grad))
    (direct, direct_grad), (fast, fast_grad), (exact, exact_grad) = grads
    assert within_winograds_rounding(relative_error(fast, exact), relative_error(direct, exact))
    assert within_winograds_rounding(
        relative_error(fast_grad, exact_grad), relative_error(direct_grad, exact_grad)
    )
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
    reference = copy.deepcopy(net).double()
    image = torch.rand(1, 3, 64, 80, generator=generator(5))
    direct, winograd = (
        errors_against_float64(model, reference, image, LAYERS, squares) for model in (net, fast)
    )
    for fast_tap, direct_tap in zip(winograd[0], direct[0], strict=True):
        assert within_winograds_rounding(fast_tap, direct_tap)
    assert within_winograds_rounding(winograd[1], direct[1])  # on the routes each took


def squares(taps: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((taps[name] * taps[name]).mean() for name in LAYERS)  # type: ignore[return-value]


def test_elsewhere_it_is_the_plain_convolution() -> None:
    conv = frozen_conv(4, 6)
    winograd = WinogradConv2d(conv)
    small = torch.randn(1, 4, 47, 48, generator=generator(7))
    assert torch.equal(winograd(small), conv(small))  # under MIN_PIXELS: NNPACK does not pay
    x = torch.randn(1, 4, 48, 52, generator=generator(6))
    assert not torch.equal(winograd(x), conv(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(winograd(x), conv(x))  # autocast's bf16 convolution, not NNPACK
    as_double = copy.deepcopy(winograd).double()
    assert torch.equal(as_double(x.double()), copy.deepcopy(conv).double()(x.double()))
    assert winograd.to("meta")(x.to("meta")).shape == (1, 6, 48, 52)  # shape probes
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
    # The filters' transform does not grow with the image, but a layer takes Winograd only from
    # MIN_PIXELS: conv4_2's 512 × 512 (for a block of input channels that fits this CPU's L1
    # cache) from a 384² canvas, at stride 8; conv1_2's 64 × 64 from 48².
    block = min(CHANNEL_BLOCK or 512, 512)
    assert plain.filters == ()
    assert winograd.filters_bytes(384 * 384) == 512 * block * 256
    assert winograd.filters_bytes(384 * 384 - 1) == 256 * min(block, 256) * 256  # conv3_x
    assert winograd.filters_bytes(48 * 48) == 64 * 64 * 256
    assert winograd.filters_bytes(48 * 48 - 1) == 0
    _, asked = workspace_of(lambda: fast(torch.rand(1, 3, 60, 66), ["relu1_1"]))
    assert asked.tiles == 10 * 11 * (3 + 64) * 256  # conv1_1 only: the pass stops at relu1_1
    assert asked.filters == [(60 * 66, 64 * 3 * 256)]
    _, asked = workspace_of(lambda: fast(torch.rand(1, 3, 47, 48), ["relu1_1"]))
    assert asked.tiles == 0  # under MIN_PIXELS: the direct convolution


def l1_cache(root: Path, size: str, shared: str, kind: str = "Data") -> Path:
    for index, (level, what) in enumerate([("1", kind), ("1", "Instruction"), ("2", "Unified")]):
        folder = root / f"index{index}"
        folder.mkdir(parents=True)
        for name, text in [("level", level), ("type", what), ("size", size),
                           ("shared_cpu_list", shared)]:  # fmt: skip
            (folder / name).write_text(text + "\n")
    return root


def test_the_channel_block_is_nnpacks_for_the_l1_cache(tmp_path: Path) -> None:
    # 48 KiB for one thread: 1536 tuples of 8 floats, over 3 + 4 rows of the GEMM, even: 218.
    assert input_channel_block(l1_cache(tmp_path / "a", "48K", "0")) == 218
    assert input_channel_block(l1_cache(tmp_path / "b", "32K", "0-1")) == 72  # two threads
    assert input_channel_block(l1_cache(tmp_path / "c", "32K", "0,4", "Unified")) == 72
    assert input_channel_block(tmp_path / "none") is None
    conv = WinogradConv2d(frozen_conv(256, 512))
    # Blocked, the forward convolution (256 in, 512 out) needs more than the gradient's.
    assert conv.workspace(12, 12, block=218) == (4 * (218 + 512) * 256, 512 * 218 * 256)
    assert conv.workspace(12, 12, block=None) == (4 * (256 + 512) * 256, 512 * 256 * 256)
    assert conv.workspace(12, 12, block=64) == (4 * (64 + 512) * 256, 512 * 64 * 256)


THREADS_BUFFER = """
import threading, torch
torch.set_num_threads(1)
x, w = torch.rand(1, 512, 48, 48), torch.rand(512, 512, 3, 3)
pages = lambda: int(open("/proc/self/statm").read().split()[1])
torch.backends.nnpack.is_available()  # NNPACK starts here
grew = []
def run():
    before = pages()
    torch._nnpack_spatial_convolution(x, w, None, [1, 1])
    grew.append((pages() - before) * 4096)
thread = threading.Thread(target=run)
thread.start()
thread.join()
print(grew[0])
"""


def test_a_threads_buffer_is_the_tiles_and_the_filters() -> None:
    """Measured from outside, in a fresh process: what one 512-channel convolution of a 48×48
    input leaves resident in its thread is the estimate's buffer, 70% of it the filters'
    transform, within 2 MiB of the thread's own (its stack, the output's 4.5 MiB being counted
    by autograd's part of the estimate, not this one)."""
    grew = int(subprocess.run([sys.executable, "-c", THREADS_BUFFER], capture_output=True,
                              text=True, check=True).stdout)  # fmt: skip
    tiles, filters = WinogradConv2d(frozen_conv(512, 512, bias=False)).workspace(48, 48)
    output = 512 * 48 * 48 * 4
    assert grew <= tiles + filters + output + 2 * 2**20, (grew, tiles, filters)
    assert grew >= tiles + 0.5 * filters, (grew, tiles, filters)  # the filters' part grew too


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
