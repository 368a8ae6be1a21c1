"""The manifest beside the universal decoders: which encoder layers they invert, how made.

The universal method (WCT, Li et al. 2017) needs no per-style training: each decoder is trained
only to turn a feature model's activations at one layer back into the image. Read by the
features service (which runs encoder and decoders on ONNX Runtime) without importing PyTorch.

Each decoder's ONNX file takes `features` (1×C×h×w float32, the encoder's activations at its
layer, h and w dynamic) and gives `image` (1×3×(h·stride)×(w·stride) float32 RGB pixels in
[0, 1], before any normalisation: the features service normalises as its manifest says).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

UNIVERSAL_MANIFEST_FILE = "universal.json"
DECODER_INPUT, DECODER_OUTPUT = "features", "image"


@dataclass(frozen=True)
class Decoder:
    layer: str  # the feature model's layer it inverts, e.g. "relu4_1"
    onnx_file: str  # relative to the manifest's folder
    channels: int  # C of its input
    stride: int  # image pixels per feature pixel along each side
    width: float  # its channels relative to the VGG mirror's (1.0: Li et al.'s decoder)
    steps: int  # training steps done
    loss: float  # the last training loss (pixel + feature reconstruction)


@dataclass(frozen=True)
class UniversalManifest:
    name: str  # the model's id, its folder's name
    feature_model: str  # the encoder, e.g. "vgg19"
    feature_weights_sha256: str  # the encoder's weights the decoders were trained against
    decoders: tuple[Decoder, ...]  # coarse to fine: the order the method applies them
    images: int  # training photos
    size_px: int  # side of the training crops
    # The levels a request that names none gets, coarse to fine; empty: every decoder. Chosen
    # by measurement (README, Universal blends): not every trained level is worth its time.
    default_levels: tuple[str, ...] = ()

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(decoder.layer for decoder in self.decoders)

    @property
    def levels_by_default(self) -> tuple[str, ...]:
        return self.default_levels or self.layers

    def decoder(self, layer: str) -> Decoder:
        for decoder in self.decoders:
            if decoder.layer == layer:
                return decoder
        raise KeyError(f"no universal decoder for {layer}; there are {list(self.layers)}")

    def save(self, folder: Path) -> Path:
        path = folder / UNIVERSAL_MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)
        return path

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> UniversalManifest:
        raw = json.loads(text)
        raw["decoders"] = tuple(Decoder(**decoder) for decoder in raw["decoders"])
        raw["default_levels"] = tuple(raw.get("default_levels", ()))
        return cls(**raw)

    @classmethod
    def load(cls, folder: Path) -> UniversalManifest:
        return cls.from_json((folder / UNIVERSAL_MANIFEST_FILE).read_text())
