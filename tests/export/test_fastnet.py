"""The feed-forward N-style network: CIN maths, mixing, ONNX, adding a style, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.fastnet import ConditionalInstanceNorm, FastStyleNet, export_onnx, one_hot
from export.models import load_feature_net
from export.onnx_export import MAX_RELATIVE_ERROR, relative_error
from export.train_fast import Style, TrainingConfig, add_style, load, train
from tests.conftest import SAMPLES

STYLES = [
    Style("starry", SAMPLES / "style" / "starry_night.jpg"),
    Style("scream", SAMPLES / "style" / "the_scream.jpg"),
]


def randomised(net: FastStyleNet, seed: int = 0) -> FastStyleNet:
    """Distinct (γ, β) per style, as training would leave them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.requires_grad:  # an identity style's frozen zeros stay
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return net.eval()


def test_cin_follows_its_formula() -> None:
    norm = ConditionalInstanceNorm(4, styles=2)
    with torch.no_grad():
        norm.gammas[0].copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        norm.betas[1].copy_(torch.tensor([0.5, -0.5, 1.0, 0.0]))
    x = torch.randn(2, 4, 5, 6)
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), unbiased=False, keepdim=True)
    normalised = (x - mean) / torch.sqrt(var + 1e-5)
    gamma = weights @ torch.stack(list(norm.gammas))
    beta = weights @ torch.stack(list(norm.betas))
    expected = normalised * gamma[:, :, None, None] + beta[:, :, None, None]
    torch.testing.assert_close(norm(x, weights), expected)


def test_one_hot_weights_give_that_style_exactly_and_a_mix_is_the_mix_of_gamma_beta() -> None:
    net = randomised(FastStyleNet(2))
    image = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        alone = FastStyleNet(1)
        alone.load_state_dict({k: v for k, v in net.state_dict().items() if not k.endswith(".1")})
        torch.testing.assert_close(
            net(image, one_hot(0, 2)), alone.eval()(image, one_hot(0, 1)), rtol=0, atol=0
        )
        # A 30/70 mix is the network whose single style is the 30/70 mix of (γ, β).
        mixed = FastStyleNet(1)
        state = {k: v for k, v in net.state_dict().items() if not k.endswith((".0", ".1"))}
        for key, value in net.state_dict().items():
            if key.endswith(".0"):
                state[key] = 0.3 * value + 0.7 * net.state_dict()[key[:-2] + ".1"]
        mixed.load_state_dict(state)
        weights = torch.tensor([[0.3, 0.7]])
        torch.testing.assert_close(net(image, weights), mixed.eval()(image, one_hot(0, 1)))


def test_onnx_export_agrees_with_pytorch(tmp_path: Path) -> None:
    net = randomised(FastStyleNet(3))
    path = export_onnx(net, tmp_path / "fast.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for height, width in ((64, 64), (96, 128)):
        image = torch.rand(2, 3, height, width)
        weights = torch.tensor([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
        (got,) = session.run(None, {"image": image.numpy(), "style_weights": weights.numpy()})
        with torch.no_grad():
            expected = net(image, weights).numpy()
        assert got.shape == (2, 3, height, width)
        assert relative_error(got, expected) < MAX_RELATIVE_ERROR


@pytest.fixture(scope="module")
def features(vgg19_dir: Path) -> tuple[torch.nn.Module, object]:
    return load_feature_net(vgg19_dir)


def test_a_tiny_training_run_lowers_the_loss_and_resumes(features, tmp_path: Path) -> None:
    net, manifest = features
    config = TrainingConfig(size_px=32, batch=2, steps=24, learning_rate=5e-3)
    out = tmp_path / "fast.pt"
    torch.manual_seed(0)  # the network's initial weights: the same run whatever ran before
    losses = train(FastStyleNet(2), STYLES, net, manifest, config, out, checkpoint_every=12)
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    loaded, styles, checkpoint = load(out)
    assert [s.name for s in styles] == ["starry", "scream"] and checkpoint["step"] == 24
    assert checkpoint["feature_model"] == "vgg19"
    more = train(loaded, styles, net, manifest, TrainingConfig(size_px=32, batch=2, steps=28), out,
                 start_step=24, optimizer_state=checkpoint["optimizer"])  # fmt: skip
    assert len(more) == 4 and load(out)[2]["step"] == 28


def test_adding_a_style_trains_only_its_gamma_beta(features, tmp_path: Path) -> None:
    net, manifest = features
    fast = randomised(FastStyleNet(2))
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        before = [fast(image, one_hot(s, 2)) for s in range(2)]
    styles = list(STYLES)
    fresh = add_style(
        fast, styles, Style("matisse", SAMPLES / "style" / "woman-with-hat-matisse.jpg")
    )
    assert sum(p.numel() for p in fresh) < 0.05 * sum(p.numel() for p in fast.parameters())
    config = TrainingConfig(size_px=32, batch=2, steps=3)
    train(
        fast,
        styles,
        net,
        manifest,
        config,
        tmp_path / "grown.pt",
        trainable=fresh,
        train_styles=[2],
    )
    fast.eval()
    with torch.no_grad():
        for style in range(2):
            torch.testing.assert_close(
                fast(image, one_hot(style, 3)), before[style], rtol=0, atol=0
            )
        assert not torch.equal(fast(image, one_hot(2, 3)), fast(image, one_hot(0, 3)))


def test_a_uniform_per_pixel_mix_equals_the_global_mix_and_a_split_map_leans_each_way() -> None:
    net = randomised(FastStyleNet(2))
    image = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        mix = torch.tensor([[0.3, 0.7]])
        uniform = mix[:, :, None, None].expand(1, 2, 48, 64).contiguous()
        torch.testing.assert_close(net(image, uniform), net(image, mix), rtol=0, atol=1e-4)
        left = torch.zeros(1, 2, 48, 64)
        left[:, 0, :, :32], left[:, 1, :, 32:] = 1.0, 1.0
        split = net(image, left)
        first, second = net(image, one_hot(0, 2)), net(image, one_hot(1, 2))

    def gap(a: torch.Tensor, b: torch.Tensor, side: slice) -> float:
        return float((a[..., side] - b[..., side]).abs().mean())

    assert gap(split, first, slice(0, 24)) < gap(split, second, slice(0, 24))
    assert gap(split, second, slice(40, 64)) < gap(split, first, slice(40, 64))


def test_per_pixel_onnx_export_agrees_with_pytorch(tmp_path: Path) -> None:
    net = randomised(FastStyleNet(3))
    path = export_onnx(net, tmp_path / "fast-per-pixel.onnx", per_pixel=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = torch.rand(1, 3, 40, 56)
    weights = torch.softmax(torch.randn(1, 3, 40, 56), dim=1)
    (got,) = session.run(None, {"image": image.numpy(), "style_weights": weights.numpy()})
    with torch.no_grad():
        expected = net(image, weights).numpy()
    assert relative_error(got, expected) < MAX_RELATIVE_ERROR


def test_the_identity_style_gives_back_its_input_and_strength_moves_away_from_it() -> None:
    net = randomised(FastStyleNet(3, identity=True))
    image = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(net(image, one_hot(0, 3)), image, rtol=0, atol=0)
        gaps = [
            float((net(image, torch.tensor([[1 - s, s, 0.0]])) - image).abs().mean())
            for s in (0.25, 0.5, 1.0)
        ]
    assert 0 < gaps[0] < gaps[1] < gaps[2]
