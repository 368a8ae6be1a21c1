"""The network's number format and compilation: losses stay float32, the GPU-only modes refuse
a CPU in words."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pydantic
import pytest
import torch

from export.onnx_export import relative_error
from services.common.config import ReconstructionConfig
from services.reconstruction import core
from services.reconstruction.precision import Autocast, compiled, in_precision
from tests.reconstruction.rounding import UNIT_ROUNDOFF, errors_against_float64

CPU = torch.device("cpu")
LAYERS = ["relu1_1", "relu3_1", "relu4_2"]


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    from export.models import build_feature_net

    return build_feature_net("vgg19")[0]


def image() -> torch.Tensor:
    return torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(1))


def test_float32_is_the_network_itself(net: torch.nn.Module) -> None:
    assert in_precision(net, CPU, "float32") is net
    assert compiled(net, CPU, "off") is net


def test_bfloat16_runs_the_network_in_bf16_and_hands_back_float32(net: torch.nn.Module) -> None:
    low = in_precision(net, CPU, "bfloat16")
    assert isinstance(low, Autocast)
    pixels = image().requires_grad_(True)
    taps = low(pixels, LAYERS)
    with torch.no_grad():
        exact = net(pixels, LAYERS)
    for name in LAYERS:
        assert taps[name].dtype == torch.float32
        error = relative_error(taps[name], exact[name])
        assert 1e-4 < error < 0.05  # rounded (so it did run in bf16), yet close
    gram = core.gram(taps["relu3_1"])
    assert gram.dtype == torch.float32  # the Gram matrix is summed in float32
    gram.sum().backward()
    assert pixels.grad is not None and pixels.grad.dtype == torch.float32


def test_bfloat16_losses_stay_near_float32s(net: torch.nn.Module) -> None:
    pixels = image()
    with torch.no_grad():
        other = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(2))
        taps = net(other, LAYERS)  # a style target that is not the image itself
    targets = core.ScaleTargets(
        48, 40, 1, [core.StyleChannel(None, {n: core.gram(taps[n]).numpy() for n in LAYERS}, 1.0)],
        {}, {},
    )  # fmt: skip
    weights = core.LossWeights(1.0, 1.0, 0.0)
    strides = {"relu1_1": 1, "relu3_1": 4, "relu4_2": 8}
    exact = core.Objective(net, targets, weights, strides, CPU).measure(pixels)
    low = core.Objective(in_precision(net, CPU, "bfloat16"), targets, weights, strides, CPU)
    assert exact.style > 0.01
    assert low.measure(pixels).style == pytest.approx(exact.style, rel=0.05)


def test_gpu_only_modes_refuse_a_cpu_in_words(net: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"float16 needs a CUDA device.*use bfloat16 or float32"):
        in_precision(net, CPU, "float16")
    with pytest.raises(ValueError, match="reduce-overhead replays CUDA graphs"):
        compiled(net, CPU, "reduce-overhead")


def test_config_names_the_allowed_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STYLEBLEND_PRECISION", "float8")
    with pytest.raises(pydantic.ValidationError, match="precision"):
        ReconstructionConfig()
    monkeypatch.setenv("STYLEBLEND_PRECISION", "bfloat16")
    monkeypatch.setenv("STYLEBLEND_COMPILE", "default")
    config = ReconstructionConfig()
    assert (config.precision, config.compile) == ("bfloat16", "default")


@pytest.mark.slow
def test_the_compiled_network_agrees_with_eager_at_two_sizes(net: torch.nn.Module) -> None:
    fast = compiled(net, CPU, "default")
    reference = copy.deepcopy(net).double()
    for height, width in ((40, 48), (56, 64)):
        pixels = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height))
        eager, ours = (
            errors_against_float64(model, reference, pixels, ["relu4_2"], deepest)
            for model in (net, fast)
        )
        # Inductor orders the sums differently. A sum of n terms rounds by about √n u in any
        # order and by n u at worst, so another order stays within √n times the eager one's
        # error against float64; n = 9 × 512 at VGG's widest convolutions. On the routes each
        # took (tests/reconstruction/rounding.py).
        for given, expected in zip((*ours[0], ours[1]), (*eager[0], eager[1]), strict=True):
            assert given < math.sqrt(9 * 512) * max(expected, UNIT_ROUNDOFF)


def deepest(taps: dict[str, torch.Tensor]) -> torch.Tensor:
    return taps["relu4_2"].sum()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float16_and_cuda_graphs_on_a_gpu(net: torch.nn.Module) -> None:
    gpu = torch.device("cuda")
    exact = net.to(gpu)
    fast = compiled(in_precision(exact, gpu, "float16"), gpu, "reduce-overhead")
    pixels = torch.rand(1, 3, 256, 256, device=gpu)
    with torch.no_grad():
        for _ in range(3):  # the first calls record the graph; later ones replay it
            taps = fast(pixels, LAYERS)
        reference = exact(pixels, LAYERS)
    for name in LAYERS:
        error = relative_error(taps[name], reference[name])
        assert taps[name].dtype == torch.float32 and error < 0.01


def test_the_service_builds_its_network_as_configured(vgg19_dir: Path) -> None:
    from services.graph import build_reconstruction

    config = ReconstructionConfig(
        model="vgg19", model_dir=vgg19_dir.parent, device="cpu", precision="bfloat16"
    )
    service = build_reconstruction(config).servicer
    assert isinstance(service.net, Autocast)  # type: ignore[attr-defined]
    assert service.net.dtype == torch.bfloat16  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        build_reconstruction(config.model_copy(update={"precision": "float16"}))
