"""The manifest an export writes beside a feature model: what it is and how to feed it.

Every service that touches a feature model reads this file; none of them imports PyTorch
for it, so the features service and the gateway stay free of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_FILE = "manifest.json"
# The smallest side every tap of every model is defined for: below it the deepest layers have no
# pixels left. The export's dynamic height and width start here; services refuse smaller images.
MIN_SIDE_PX = 32


@dataclass(frozen=True)
class Normalisation:
    """How pixels in [0, 1], RGB, become the network's input: ((x * scale)[order] - mean) / std."""

    channel_order: str  # "RGB" or "BGR"
    scale: float  # 255 for Caffe-style weights, 1 for torchvision's
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class LayerInfo:
    """One tap of the feature model: an ONNX output of the same name."""

    name: str  # e.g. "relu4_2", "block3_expand"
    channels: int
    stride: int  # input pixels per feature-map pixel along each side


def layer_strides(layers: Iterable[LayerInfo]) -> dict[str, int]:
    """Input pixels per feature-map pixel, by layer name."""
    return {layer.name: layer.stride for layer in layers}


@dataclass(frozen=True)
class LossDefaults:
    """Default loss weights: α (content), β (style), γ (total variation)."""

    content: float
    style: float
    tv: float


@dataclass(frozen=True)
class Manifest:
    model: str  # the model id, e.g. "vgg19"
    architecture: str  # e.g. "vgg19", "efficientnet-lite0"
    weights_source: str  # where the weights came from, in words
    weights_sha256: str  # content hash of the state dict (see export.weights)
    licence: str
    normalisation: Normalisation
    layers: tuple[LayerInfo, ...]
    default_style_layers: tuple[str, ...]
    default_content_layers: tuple[str, ...]
    loss_defaults: LossDefaults
    opset: int
    onnx_file: str = "model.onnx"
    weights_file: str = "weights.pt"
    input_name: str = "image"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    @property
    def strides(self) -> dict[str, int]:
        """Layer name → stride, the table the blending and reconstruction cores take."""
        return layer_strides(self.layers)

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def save(self, folder: Path) -> Path:
        path = folder / MANIFEST_FILE
        path.write_text(self.to_json())
        return path

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        return cls(
            **{
                **raw,
                "normalisation": Normalisation(
                    channel_order=raw["normalisation"]["channel_order"],
                    scale=raw["normalisation"]["scale"],
                    mean=tuple(raw["normalisation"]["mean"]),
                    std=tuple(raw["normalisation"]["std"]),
                ),
                "layers": tuple(LayerInfo(**layer) for layer in raw["layers"]),
                "default_style_layers": tuple(raw["default_style_layers"]),
                "default_content_layers": tuple(raw["default_content_layers"]),
                "loss_defaults": LossDefaults(**raw["loss_defaults"]),
            }
        )

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        return cls.from_json((folder / MANIFEST_FILE).read_text())
