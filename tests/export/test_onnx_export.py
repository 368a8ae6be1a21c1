from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch

from export import onnx_export
from export.__main__ import main
from export.models import LOSS_DEFAULTS, MODELS, load_feature_net
from export.onnx_export import (
    MAX_RELATIVE_ERROR,
    ensure_model,
    export_model,
    onnx_session,
    relative_error,
    stale_reason,
)
from export.weights import read_state_dict, state_dict_sha256
from services.common.manifest import Manifest
from tests.export.images import load_image

ALL_IDS = ("vgg19", "vgg19-torchvision", "efficientnet-lite0")


@pytest.mark.parametrize("model_id", ALL_IDS)
def test_onnx_runtime_agrees_with_pytorch_on_every_tap(
    model_id: str, exported: Callable[[str], Path]
) -> None:
    folder = exported(model_id)
    net, manifest = load_feature_net(folder)
    image = load_image("style/starry_night.jpg", (150, 109))  # odd, non-square: W 150, H 109
    with torch.no_grad():
        want = net(image, manifest.layer_names)
    got = onnx_session(folder / manifest.onnx_file).run(None, {"image": image.numpy()})
    assert len(got) == len(manifest.layers)
    for layer, array in zip(manifest.layers, got, strict=True):
        assert array.shape == tuple(want[layer.name].shape), layer.name
        error = relative_error(array, want[layer.name].numpy())
        assert error < MAX_RELATIVE_ERROR, f"{model_id} {layer.name}: {error:.2e}"


@pytest.mark.parametrize("model_id", ALL_IDS)
def test_manifest_describes_the_export(model_id: str, exported: Callable[[str], Path]) -> None:
    folder = exported(model_id)
    manifest = Manifest.load(folder)
    spec = MODELS[model_id]
    assert (manifest.model, manifest.architecture) == (model_id, spec.architecture)
    assert manifest.normalisation == spec.normalisation
    assert manifest.loss_defaults == LOSS_DEFAULTS[model_id]
    assert set(manifest.default_style_layers) <= set(manifest.layer_names)
    assert set(manifest.default_content_layers) <= set(manifest.layer_names)
    state = read_state_dict(folder / manifest.weights_file)
    assert state_dict_sha256(state) == manifest.weights_sha256
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())

    graph = onnx.load(str(folder / manifest.onnx_file)).graph
    assert [i.name for i in graph.input] == [manifest.input_name]
    image_dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in image_dims] == ["batch", 3, "height", "width"]
    assert [o.name for o in graph.output] == list(manifest.layer_names)
    for output, layer in zip(graph.output, manifest.layers, strict=True):
        dims = output.type.tensor_type.shape.dim
        assert dims[1].dim_value == layer.channels, layer.name
        assert dims[2].dim_param and dims[3].dim_param, f"{layer.name} has a fixed size"


def test_ensure_model_keeps_a_current_export(
    exported: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = exported("efficientnet-lite0")
    assert stale_reason("efficientnet-lite0", folder) is None

    def refuse(*_: object) -> Path:
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_export, "export_model", refuse)
    assert ensure_model("efficientnet-lite0", folder.parent) == folder


def test_stale_exports_say_why(exported: Callable[[str], Path], tmp_path: Path) -> None:
    folder = shutil.copytree(exported("efficientnet-lite0"), tmp_path / "efficientnet-lite0")
    raw = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**raw, "opset": 17}))
    assert stale_reason("efficientnet-lite0", folder) == "the manifest's opset is out of date"

    (folder / "manifest.json").write_text(json.dumps(raw))
    state = torch.load(folder / "weights.pt", weights_only=True)
    state["_bn0.bias"] += 1
    torch.save(state, folder / "weights.pt")
    assert "does not match the manifest's hash" in str(stale_reason("efficientnet-lite0", folder))

    (folder / "model.onnx").unlink()
    assert stale_reason("efficientnet-lite0", folder) == "model.onnx is missing"
    assert stale_reason("efficientnet-lite0", tmp_path / "nowhere") == "no manifest.json"


def test_a_given_weights_file_must_match_the_export(
    exported: Callable[[str], Path], tmp_path: Path
) -> None:
    folder = exported("vgg19-torchvision")
    other = tmp_path / "other.pth"
    state = read_state_dict(folder / "weights.pt")
    assert stale_reason("vgg19-torchvision", folder, folder / "weights.pt") is None
    state["features.0.bias"] += 1
    torch.save(state, other)
    assert "holds other weights" in str(stale_reason("vgg19-torchvision", folder, other))


def test_a_failed_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*_: object) -> None:
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_export, "write_onnx", crash)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_model("efficientnet-lite0", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown model 'resnet50'; choose one of"):
        export_model("resnet50", tmp_path)


def test_cli_reports_the_folder(
    exported: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = exported("efficientnet-lite0")
    assert main(["--model", "efficientnet-lite0", "--out", str(folder.parent)]) == 0
    assert capsys.readouterr().out.strip() == f"efficientnet-lite0: {folder}"


def test_cli_explains_missing_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert main(["--model", "vgg19-torchvision", "--out", str(tmp_path / "models")]) == 2
    assert "--weights FILE" in capsys.readouterr().err
