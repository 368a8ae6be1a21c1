"""The manifest beside a trained feed-forward network: its styles and how it was made.

Read by the features service (which runs the network) and the gateway (which matches sources
to styles by their images' sha256) without importing PyTorch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

FAST_MANIFEST_FILE = "fast.json"
IDENTITY = "identity"  # the style trained to give back its input: strength 0


@dataclass(frozen=True)
class FastStyle:
    name: str
    sha256: str  # of the style image's bytes; "" for the identity style


@dataclass(frozen=True)
class FastManifest:
    name: str  # the model's id, its folder's name
    styles: tuple[FastStyle, ...]
    feature_model: str  # the feature model whose losses trained it
    feature_weights_sha256: str
    layout: dict[str, int]
    multiple: int  # image sides must divide by this
    steps: int  # training steps done
    onnx_file: str = "fast.onnx"  # style_weights B×N
    per_pixel_onnx_file: str = "fast-per-pixel.onnx"  # style_weights B×N×H×W

    @property
    def identity(self) -> int | None:
        names = [style.name for style in self.styles]
        return names.index(IDENTITY) if IDENTITY in names else None

    def style_for(self, sha256: str) -> int | None:
        """The index of the style trained on the image with this sha256, if there is one."""
        for index, style in enumerate(self.styles):
            if style.sha256 and style.sha256 == sha256:
                return index
        return None

    def save(self, folder: Path) -> Path:
        path = folder / FAST_MANIFEST_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FastManifest:
        raw = json.loads(text)
        raw["styles"] = tuple(FastStyle(**style) for style in raw["styles"])
        return cls(**raw)

    @classmethod
    def load(cls, folder: Path) -> FastManifest:
        return cls.from_json((folder / FAST_MANIFEST_FILE).read_text())
