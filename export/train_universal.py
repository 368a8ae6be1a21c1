"""Training the universal method's decoders: VGG19 activations at one layer back to the photo.

Li et al. (2017) train each decoder only to reconstruct natural images from a frozen encoder's
activations, with a pixel loss and a feature loss at the same layer; no style is involved, so
the decoders serve every style. Levels train one after another on random crops of photos.
Checkpoints keep the configuration and the encoder's weights hash, are written atomically, and
training resumes from one. The folder then gets one ONNX decoder per level and universal.json.

    python -m export.train_universal --levels relu4_1,relu3_1,relu2_1,relu1_1 --steps 400 \\
        --content data/photos --out models/universal
"""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import onnxruntime
import torch
from tqdm import tqdm

from export.models import FeatureNet, load_feature_net
from export.onnx_export import MAX_RELATIVE_ERROR, OPSET, ExportCheckFailed, relative_error
from export.train_fast import content_images, crops
from export.universal import (
    LAYERS,
    UniversalDecoder,
    coarse_to_fine,
    export_onnx,
    level,
    stride,
)
from services.common.manifest import MIN_SIDE_PX, Manifest
from services.common.universalmodel import (
    DECODER_INPUT,
    Decoder,
    UniversalManifest,
)
from services.reconstruction.objective import relative_error as squared_relative_error

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
# Feature sides the export is checked at: odd, even, non-square.
CHECK_SIDES = ((5, 7), (16, 12))


FEATURE_LAYERS = ("own", "up-to")


@dataclass(frozen=True)
class TrainConfig:
    levels: tuple[str, ...] = ("relu5_1", "relu4_1", "relu3_1", "relu2_1", "relu1_1")
    size_px: int = 128  # side of the square photo crops
    batch: int = 4
    steps: int = 400  # per level
    lr: float = 1e-3
    width: float = 0.5  # hidden channels relative to Li et al.'s decoder
    feature_weight: float = 0.1  # the feature term's weight against the pixel term
    # "own": the feature term at the decoder's layer only (Li et al.); "up-to": at every
    # relu*_1 up to it too, meant to keep fine texture a pixel loss blurs (not yet measured).
    feature_layers: str = "own"
    seed: int = 0

    def __post_init__(self) -> None:
        for layer in self.levels:
            if layer not in LAYERS:
                raise ValueError(f"no universal decoder for {layer!r}; choose from {list(LAYERS)}")
        if not self.levels:
            raise ValueError("give at least one level")
        object.__setattr__(self, "levels", coarse_to_fine(self.levels))  # one spelling per set
        deepest = max(stride(layer) for layer in self.levels)
        if self.size_px % deepest or self.size_px < MIN_SIDE_PX:
            raise ValueError(
                f"size_px must be a multiple of {deepest} (the deepest level's stride) and at "
                f"least {MIN_SIDE_PX}, got {self.size_px}"
            )
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be at least 1, got {self.steps}, {self.batch}")
        if not 0 < self.width <= 1:
            raise ValueError(f"width must be within (0, 1], got {self.width}")
        if self.feature_layers not in FEATURE_LAYERS:
            raise ValueError(
                f"feature_layers must be one of {FEATURE_LAYERS}, got {self.feature_layers!r}"
            )
        if not 0 < self.lr < 1 or self.feature_weight < 0:
            raise ValueError(f"need 0 < lr < 1, feature_weight ≥ 0; got {self.lr}, "
                             f"{self.feature_weight}")  # fmt: skip


class ConfigMismatch(ValueError):
    """A checkpoint was made with another configuration or encoder than asked for."""


# A resumed run may train longer, on other crops or with another step size; the decoders'
# shape, the objective, the levels and the seed must match.
_RESUMABLE = frozenset({"steps", "size_px", "batch", "lr"})


class ReconstructionLoss:
    """‖D(Φ(x)) − x‖² per pixel + feature_weight · meanₗ ‖Φₗ(D(Φ(x))) − Φₗ(x)‖² / ‖Φₗ(x)‖².

    l is the decoder's layer ("own") or every relu*_1 up to it ("up-to"): the shallower ones
    cost no extra encoder pass. Li et al.'s feature term is an absolute L2; it is relative here,
    as the reconstruction service's terms are, so its weight does not depend on the encoder's
    input scale.
    """

    def __init__(
        self, encoder: FeatureNet, layer: str, feature_weight: float, feature_layers: str = "own"
    ) -> None:
        self.encoder, self.layer, self.feature_weight = encoder, layer, feature_weight
        self.judged = list(LAYERS[: level(layer)]) if feature_layers == "up-to" else [layer]

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels, [self.layer])[self.layer]

    def __call__(self, decoder: UniversalDecoder, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            wanted = self.encoder(pixels, self.judged)
        made = decoder(wanted[self.layer])
        loss = (made - pixels).pow(2).mean()
        if self.feature_weight:
            # Clamped as the export is: the feature term judges the image the service sees.
            again = self.encoder(made.clamp(0, 1), self.judged)
            error = sum(squared_relative_error(again[n], wanted[n]) for n in self.judged)
            loss = loss + self.feature_weight * error / len(self.judged)
        return loss


def _config_from(raw: dict[str, Any]) -> TrainConfig:
    # Checkpoints from before feature_layers judged the decoder's own layer only.
    return TrainConfig(**{"feature_layers": "own", **raw, "levels": tuple(raw["levels"])})


def _check_resumable(checkpoint: dict[str, Any], config: TrainConfig, manifest: Manifest) -> None:
    if checkpoint["feature_weights_sha256"] != manifest.weights_sha256:
        raise ConfigMismatch(
            f"the checkpoint was trained against encoder weights "
            f"{checkpoint['feature_weights_sha256'][:12]}…, not {manifest.model}'s "
            f"{manifest.weights_sha256[:12]}…; use another folder"
        )
    saved = _config_from(checkpoint["config"])
    differ = [
        f"{f.name} {getattr(saved, f.name)!r} != {getattr(config, f.name)!r}"
        for f in fields(TrainConfig)
        if f.name not in _RESUMABLE and getattr(saved, f.name) != getattr(config, f.name)
    ]
    if differ:
        raise ConfigMismatch(
            f"the checkpoint was made with another configuration ({'; '.join(differ)}); "
            "use another folder or the same settings"
        )


def _save(folder: Path, state: dict[str, Any]) -> None:
    """Atomically: a crash mid-write never leaves a broken checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_FILE
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)


def load_checkpoint(folder: Path) -> dict[str, Any]:
    return dict(torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=False))


def train(
    folder: Path,
    model_dir: Path,
    config: TrainConfig,
    content_folders: Sequence[Path] = (),
    progress: bool = True,
    *,
    checkpoint_every: int = 100,
) -> None:
    """Train every level's decoder to config.steps, resuming from folder's checkpoint if any."""
    encoder, manifest = load_feature_net(model_dir)
    if manifest.architecture != "vgg19":
        raise ValueError(f"the universal decoders mirror VGG19, not {manifest.architecture}")
    photos = content_images(content_folders)
    state: dict[str, Any]
    if (folder / CHECKPOINT_FILE).is_file():
        state = load_checkpoint(folder)
        _check_resumable(state, config, manifest)
        state["config"] = asdict(config)
    else:
        state = {
            "config": asdict(config),
            "feature_model": manifest.model,
            "feature_weights_sha256": manifest.weights_sha256,
            "images": len(photos),
            "decoders": {},  # layer -> {"state_dict", "optimizer", "step", "losses"}
        }
    for layer in coarse_to_fine(config.levels):
        _train_level(folder, state, layer, encoder, photos, config, progress, checkpoint_every)


def _train_level(
    folder: Path,
    state: dict[str, Any],
    layer: str,
    encoder: FeatureNet,
    photos: list[Any],
    config: TrainConfig,
    progress: bool,
    checkpoint_every: int,
) -> None:
    saved = state["decoders"].get(layer, {"step": 0, "losses": []})
    start = saved["step"]
    if start >= config.steps:
        return
    # Seeded by level and step, so a resumed run draws what an unbroken one would have drawn.
    offset = config.seed + 1000 * LAYERS.index(layer) + start
    torch.manual_seed(config.seed + LAYERS.index(layer))
    decoder = UniversalDecoder(layer, config.width)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=config.lr)
    loss_of = ReconstructionLoss(encoder, layer, config.feature_weight, config.feature_layers)
    if "state_dict" in saved:
        decoder.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        for group in optimizer.param_groups:  # a resumed run may change the step size
            group["lr"] = config.lr
    else:
        sample = next(crops(photos, config.size_px, config.batch, random.Random(config.seed)))
        with torch.no_grad():
            decoder.initialise(loss_of.features(sample), sample)
    torch.manual_seed(offset)
    batches = crops(photos, config.size_px, config.batch, random.Random(offset))
    losses: list[float] = list(saved["losses"])
    decoder.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, unit="step",
               desc=layer, disable=not progress)  # fmt: skip
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(decoder, next(batches))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3g}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == config.steps:
            state["decoders"][layer] = {
                "state_dict": decoder.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step + 1,
                "losses": losses,
            }
            _save(folder, state)


def load_decoders(folder: Path) -> tuple[dict[str, UniversalDecoder], dict[str, Any]]:
    """The checkpoint's trained decoders, deepest first, in eval mode; and the checkpoint."""
    checkpoint = load_checkpoint(folder)
    config = _config_from(checkpoint["config"])
    decoders = {}
    for layer in coarse_to_fine(tuple(checkpoint["decoders"])):
        decoder = UniversalDecoder(layer, config.width)
        decoder.load_state_dict(checkpoint["decoders"][layer]["state_dict"])
        decoders[layer] = decoder.eval()
    return decoders, checkpoint


def check_onnx(decoder: UniversalDecoder, path: Path) -> float:
    """The worst relative error against PyTorch over CHECK_SIDES; raises if above the bound."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for height, width in CHECK_SIDES:
        # Non-negative, as ReLU activations are.
        features = torch.rand(1, decoder.channels, height, width, generator=generator)
        with torch.no_grad():
            want = decoder.image(features)
        (got,) = session.run(None, {DECODER_INPUT: features.numpy()})
        error = relative_error(got, want)
        if got.shape != tuple(want.shape) or error > MAX_RELATIVE_ERROR:
            raise ExportCheckFailed(
                f"{path}: at {height}×{width} features ONNX gives {list(got.shape)} with relative "
                f"error {error:.2e} against PyTorch's {list(want.shape)} (bound "
                f"{MAX_RELATIVE_ERROR:.0e})"
            )
        worst = max(worst, error)
    return worst


def export_decoders(
    folder: Path, model_dir: Path, default_levels: Sequence[str] = ()
) -> UniversalManifest:
    """decoder_<layer>.onnx per trained level, each checked against PyTorch, and universal.json;
    `default_levels` (a subset of the trained ones) are what a request naming none gets."""
    decoders, checkpoint = load_decoders(folder)
    if not decoders:
        raise ValueError(f"{folder / CHECKPOINT_FILE} holds no trained decoder")
    untrained = [layer for layer in default_levels if layer not in decoders]
    if untrained:
        raise ValueError(
            f"default levels {untrained} have no trained decoder in {folder} "
            f"(it has {', '.join(decoders)})"
        )
    manifest = Manifest.load(model_dir)
    if checkpoint["feature_weights_sha256"] != manifest.weights_sha256:
        raise ConfigMismatch(f"{folder} was trained against other encoder weights than "
                             f"{model_dir}'s")  # fmt: skip
    config = _config_from(checkpoint["config"])
    entries = []
    for layer, decoder in decoders.items():
        onnx_file = f"decoder_{layer}.onnx"
        export_onnx(decoder, folder / onnx_file, OPSET)
        error = check_onnx(decoder, folder / onnx_file)
        log.info("exported %s: relative error %.1e against PyTorch", onnx_file, error)
        trained = checkpoint["decoders"][layer]
        entries.append(
            Decoder(
                layer=layer,
                onnx_file=onnx_file,
                channels=decoder.channels,
                stride=decoder.stride,
                width=config.width,
                steps=trained["step"],
                loss=trained["losses"][-1],
            )
        )
    universal = UniversalManifest(
        name=folder.resolve().name,
        feature_model=checkpoint["feature_model"],
        feature_weights_sha256=checkpoint["feature_weights_sha256"],
        decoders=tuple(entries),
        images=checkpoint["images"],
        size_px=config.size_px,
        default_levels=coarse_to_fine(tuple(default_levels)) if default_levels else (),
    )
    universal.save(folder)
    return universal


def _levels(text: str) -> tuple[str, ...]:
    layers = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in layers if name not in LAYERS]
    if unknown or not layers:
        raise argparse.ArgumentTypeError(
            f"unknown levels {unknown or [text]}; choose from {','.join(LAYERS)}"
        )
    return coarse_to_fine(layers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.train_universal", description=__doc__.split("\n\n")[0]
    )
    defaults = TrainConfig()
    parser.add_argument("--out", type=Path, default=Path("models/universal"))
    parser.add_argument("--model-dir", type=Path, default=Path("models/vgg19"),
                        help="the VGG19 feature model's export")  # fmt: skip
    parser.add_argument("--levels", type=_levels, default=defaults.levels,
                        help=f"comma-separated, from {','.join(LAYERS)}")  # fmt: skip
    parser.add_argument("--default-levels", type=_levels, default=(),
                        help="what a request naming no levels gets (default: all)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=defaults.steps, help="per level")
    parser.add_argument("--size", type=int, default=defaults.size_px, help="crop side, px")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--width", type=float, default=defaults.width)
    parser.add_argument("--feature-weight", type=float, default=defaults.feature_weight)
    parser.add_argument("--feature-layers", choices=FEATURE_LAYERS, default=defaults.feature_layers,
                        help="the feature term at the decoder's layer, or at every relu*_1 "
                             "up to it")  # fmt: skip
    parser.add_argument("--content", type=Path, action="append", default=[],
                        help="a folder of more photos (repeatable)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if not 0 < args.width <= 1:
        parser.error(f"--width must be within (0, 1], got {args.width}")
    deepest = max(stride(layer) for layer in args.levels)
    if args.size % deepest or args.size < MIN_SIDE_PX:
        parser.error(
            f"--size must be a multiple of {deepest} (the stride of {args.levels[0]}) and at "
            f"least {MIN_SIDE_PX}, got {args.size}"
        )
    for folder in args.content:
        if not folder.is_dir():
            parser.error(f"--content {folder}: no such folder")
    if not (args.model_dir / "manifest.json").is_file():
        parser.error(f"--model-dir {args.model_dir}: no manifest.json (export vgg19 first)")
    try:
        config = TrainConfig(levels=args.levels, size_px=args.size, batch=args.batch,
                             steps=args.steps, lr=args.lr, width=args.width,
                             feature_weight=args.feature_weight,
                             feature_layers=args.feature_layers, seed=args.seed)  # fmt: skip
        train(args.out, args.model_dir, config, args.content, progress=not args.quiet)
    except ValueError as error:  # a bad value, or a checkpoint made otherwise
        parser.error(str(error))
    try:
        universal = export_decoders(args.out, args.model_dir, args.default_levels)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {args.out}: {', '.join(universal.layers)}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
