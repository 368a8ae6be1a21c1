"""Training the feed-forward N-style network with the iterative path's perceptual losses.

Each step stylises a batch of content crops, each with one style (one-hot weights), and
scores the outputs with the same feature model, Gram matrices and relative losses as the
reconstruction service. Style 0 is the identity, which gives back its input by construction
(export/fastnet.py), so that a mix with it is a strength control. Checkpoints keep the style
names, the style images' sha256 and the feature model's id and weights hash; training
resumes from one, and `add_style` trains only a new style's (γ, β). The model folder gets the
ONNX exports the features service runs and their manifest.

    python -m export.train_fast --style starry=clients/samples/style/starry_night.jpg \\
        --style scream=clients/samples/style/the_scream.jpg --steps 2000 -o models/fast/demo
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from export.fastnet import MULTIPLE, FastStyleNet, Layout, export_onnx
from export.models import FeatureNet, load_feature_net
from services.common import images
from services.common.fastmodel import IDENTITY, FastManifest, FastStyle
from services.common.manifest import MIN_SIDE_PX, Manifest
from services.reconstruction.core import gram, relative_error, total_variation

SAMPLES = Path(__file__).resolve().parents[1] / "clients" / "samples"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class TrainingConfig:
    size_px: int = 256  # side of the square content crops
    batch: int = 4
    steps: int = 2000
    learning_rate: float = 1e-3
    content_weight: float = 1.0  # α
    style_weight: float = 5.0  # β
    tv_weight: float = 1e-2  # γ
    seed: int = 0


@dataclass(frozen=True)
class Style:
    name: str
    path: Path | None  # None for the identity style

    @property
    def sha256(self) -> str:
        return images.sha256(self.path.read_bytes()) if self.path else ""


IDENTITY_STYLE = Style(IDENTITY, None)
CHECKPOINT_FILE = "checkpoint.pt"


def content_images(folders: Sequence[Path] = ()) -> list[Image.Image]:
    """The bundled photos, and every image in the folders the user names."""
    paths = sorted((SAMPLES / "content").glob("*.jpg"))
    for folder in folders:
        paths += sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError("no content images to train on")
    return [Image.open(path).convert("RGB") for path in paths]


def crops(
    images: Sequence[Image.Image], size: int, batch: int, rng: random.Random
) -> Iterator[torch.Tensor]:
    """Endless batches of random square crops (at a random scale) and mirror flips."""
    while True:
        tiles = []
        for _ in range(batch):
            image = rng.choice(images)
            side = rng.randint(min(size, *image.size), min(image.size))
            left, top = rng.randint(0, image.width - side), rng.randint(0, image.height - side)
            tile = image.crop((left, top, left + side, top + side)).resize(
                (size, size), Image.Resampling.BICUBIC
            )
            if rng.random() < 0.5:
                tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            tiles.append(
                torch.from_numpy(np.asarray(tile, dtype=np.float32) / 255).permute(2, 0, 1)
            )
        yield torch.stack(tiles)


class PerceptualLoss:
    """α·content + β·style + γ·TV per batch item, each item against its own style's Grams.

    The identity style is never drawn: it gives back its input by construction.
    """

    def __init__(
        self,
        features: FeatureNet,
        manifest: Manifest,
        styles: Sequence[Style],
        config: TrainingConfig,
    ) -> None:
        self.features, self.config = features, config
        self.style_layers = list(manifest.default_style_layers)
        self.content_layers = list(manifest.default_content_layers)
        self.targets = [self._grams(style.path) if style.path else None for style in styles]

    def _grams(self, path: Path) -> dict[str, torch.Tensor]:
        image = Image.open(path).convert("RGB")
        image.thumbnail((self.config.size_px, self.config.size_px), Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        pixels = pixels.to(next(self.features.parameters()).device)
        with torch.no_grad():
            return {n: gram(f) for n, f in self.features(pixels, self.style_layers).items()}

    def __call__(
        self, output: torch.Tensor, content: torch.Tensor, styles: Sequence[int]
    ) -> torch.Tensor:
        layers = self.style_layers + self.content_layers
        made = self.features(output, layers)
        with torch.no_grad():
            wanted = self.features(content, self.content_layers)
        total = output.new_zeros(())
        for item, style in enumerate(styles):
            targets = self.targets[style]
            assert targets is not None, "the identity style has nothing to train"
            style_loss = sum(
                relative_error(gram(made[n][item : item + 1]), targets[n])
                for n in self.style_layers
            ) / len(self.style_layers)
            content_loss = sum(
                relative_error(made[n][item], wanted[n][item]) for n in self.content_layers
            ) / len(self.content_layers)
            total = (
                total
                + self.config.content_weight * content_loss
                + self.config.style_weight * style_loss
            )
        return total / len(styles) + self.config.tv_weight * total_variation(output)


def save(
    folder: Path,
    net: FastStyleNet,
    styles: Sequence[Style],
    manifest: Manifest,
    config: TrainingConfig,
    step: int,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Atomically: a crash mid-write never leaves a broken checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_FILE
    partial = path.with_suffix(".partial")
    torch.save(
        {
            "state_dict": net.state_dict(),
            "layout": net.layout.as_dict(),
            "styles": [
                {"name": s.name, "path": str(s.path) if s.path else None, "sha256": s.sha256}
                for s in styles
            ],
            "feature_model": manifest.model,
            "feature_weights_sha256": manifest.weights_sha256,
            "config": asdict(config),
            "step": step,
            "optimizer": optimizer.state_dict(),
        },
        partial,
    )
    partial.replace(path)


def load(folder: Path) -> tuple[FastStyleNet, list[Style], dict[str, Any]]:
    checkpoint = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    styles = [
        Style(s["name"], Path(s["path"]) if s["path"] else None) for s in checkpoint["styles"]
    ]
    identity = bool(styles) and styles[0].name == IDENTITY
    net = FastStyleNet(len(styles), Layout(**checkpoint["layout"]), identity=identity)
    net.load_state_dict(checkpoint["state_dict"])
    return net, styles, checkpoint


def export_model(folder: Path) -> FastManifest:
    """The two ONNX exports of a checkpoint (one mix, a mix per pixel) and their manifest."""
    net, _, checkpoint = load(folder)
    manifest = FastManifest(
        name=folder.name,
        styles=tuple(FastStyle(s["name"], s["sha256"]) for s in checkpoint["styles"]),
        feature_model=checkpoint["feature_model"],
        feature_weights_sha256=checkpoint["feature_weights_sha256"],
        layout=checkpoint["layout"],
        multiple=MULTIPLE,
        steps=checkpoint["step"],
    )
    export_onnx(net, folder / manifest.onnx_file)
    export_onnx(net, folder / manifest.per_pixel_onnx_file, per_pixel=True)
    manifest.save(folder)
    return manifest


def train(
    net: FastStyleNet,
    styles: Sequence[Style],
    features: FeatureNet,
    manifest: Manifest,
    config: TrainingConfig,
    out: Path,
    *,
    trainable: Sequence[torch.nn.Parameter] | None = None,
    train_styles: Sequence[int] | None = None,
    start_step: int = 0,
    optimizer_state: dict[str, Any] | None = None,
    content_folders: Sequence[Path] = (),
    checkpoint_every: int = 200,
    device: str = "cpu",
) -> list[float]:
    """Train (all parameters, or only `trainable`) and return the loss of every step."""
    if config.size_px % MULTIPLE:
        raise ValueError(f"size_px must be a multiple of {MULTIPLE}, got {config.size_px}")
    rng = random.Random(config.seed + start_step)
    torch.manual_seed(config.seed + start_step)
    net.to(device)
    features.to(device)
    loss_of = PerceptualLoss(features, manifest, styles, config)
    parameters = list(trainable) if trainable is not None else list(net.parameters())
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    # The identity gives back its input by construction: nothing to learn for it.
    trained = [i for i, style in enumerate(styles) if style.path is not None]
    choices = list(train_styles) if train_styles is not None else trained
    batches = crops(content_images(content_folders), config.size_px, config.batch, rng)
    losses = []
    net.train()
    progress = tqdm(
        range(start_step, config.steps), initial=start_step, total=config.steps, unit="step"
    )
    for step in progress:
        content = next(batches).to(device)
        picked = [rng.choice(choices) for _ in range(config.batch)]
        weights = torch.zeros(config.batch, len(styles), device=device)
        weights[range(config.batch), picked] = 1.0
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(net(content, weights), content, picked)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        progress.set_postfix(loss=f"{losses[-1]:.3g}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == config.steps:
            save(out, net, styles, manifest, config, step + 1, optimizer)
    net.cpu()
    return losses


def add_style(net: FastStyleNet, styles: list[Style], new: Style) -> list[torch.nn.Parameter]:
    """Grow the network by one style; everything but its (γ, β) is frozen."""
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    fresh = net.add_style(like=len(styles) - 1)  # a trained style starts nearer
    styles.append(new)
    for parameter in fresh:
        parameter.requires_grad_(True)
    return fresh


def _style(text: str) -> Style:
    name, _, path = text.partition("=")
    if not name or not path or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{text}: give NAME=IMAGE with an existing image")
    if name == IDENTITY:
        raise argparse.ArgumentTypeError(f"{text}: '{IDENTITY}' is the built-in identity style")
    return Style(name, Path(path))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.train_fast", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--style", dest="styles", action="append", type=_style, default=[], metavar="NAME=IMAGE"
    )
    parser.add_argument(
        "--add-style", type=_style, metavar="NAME=IMAGE", help="add one style to the network"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the checkpoint in the output folder"
    )
    parser.add_argument(
        "--content", type=Path, action="append", default=[], help="more content images"
    )
    parser.add_argument(
        "--model-dir", type=Path, default=Path("models"), help="the feature model's export"
    )
    parser.add_argument("--model", default="vgg19")
    parser.add_argument("--steps", type=int, default=TrainingConfig.steps)
    parser.add_argument("--learning-rate", type=float, default=TrainingConfig.learning_rate)
    parser.add_argument("--size", type=int, default=TrainingConfig.size_px)
    parser.add_argument("--batch", type=int, default=TrainingConfig.batch)
    parser.add_argument("--device", default="cpu", help="where to train: cpu, cuda, cuda:1")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="the model folder, e.g. models/fast/demo"
    )
    args = parser.parse_args(argv)
    if args.size % MULTIPLE or args.size < MIN_SIDE_PX:
        parser.error(
            f"--size must be a multiple of {MULTIPLE} and at least {MIN_SIDE_PX}, got {args.size}"
        )
    names = [style.name for style in args.styles]
    if len(set(names)) != len(names):
        parser.error(f"style names must differ, got {names}")
    features, manifest = load_feature_net(args.model_dir / args.model)
    if not 0 < args.learning_rate < 1:
        parser.error(f"--learning-rate must be within (0, 1), got {args.learning_rate}")
    config = TrainingConfig(
        size_px=args.size, batch=args.batch, steps=args.steps, learning_rate=args.learning_rate
    )
    if args.resume or args.add_style:
        if not (args.output / CHECKPOINT_FILE).is_file():
            parser.error(f"no {CHECKPOINT_FILE} in {args.output} to resume or add a style to")
        net, styles, checkpoint = load(args.output)
        if checkpoint["feature_weights_sha256"] != manifest.weights_sha256:
            parser.error(f"{args.output} was trained with other feature weights than {args.model}")
        if args.add_style:
            if args.add_style.name in [style.name for style in styles]:
                parser.error(f"{args.output} already has a style named {args.add_style.name}")
            fresh = add_style(net, styles, args.add_style)
            train(net, styles, features, manifest, config, args.output, trainable=fresh,
                  train_styles=[len(styles) - 1], content_folders=args.content,
                  device=args.device)  # fmt: skip
        else:
            train(net, styles, features, manifest, config, args.output,
                  start_step=checkpoint["step"], optimizer_state=checkpoint["optimizer"],
                  content_folders=args.content, device=args.device)  # fmt: skip
    else:
        if not args.styles:
            parser.error("give at least one --style NAME=IMAGE (or --resume)")
        styles = [IDENTITY_STYLE, *args.styles]
        train(FastStyleNet(len(styles), identity=True), styles, features, manifest, config,
              args.output,
              content_folders=args.content, device=args.device)  # fmt: skip
    export_model(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
