"""The universal decoders: their shape, a tiny real training run, its export, resuming, the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.models import load_feature_net
from export.train_universal import (
    CHECKPOINT_FILE,
    ConfigMismatch,
    ReconstructionLoss,
    TrainConfig,
    content_images,
    export_decoders,
    load_checkpoint,
    main,
    train,
)
from export.universal import LAYERS, UniversalDecoder
from services.common.universalmodel import DECODER_INPUT, UniversalManifest

TINY = TrainConfig(
    levels=("relu1_1", "relu2_1"), size_px=32, batch=2, steps=30, lr=5e-3, width=0.25, seed=0
)


@pytest.mark.parametrize("layer", LAYERS)
def test_each_decoder_maps_its_layer_back_to_pixels(layer: str) -> None:
    decoder = UniversalDecoder(layer, width=0.125)
    features = torch.rand(1, decoder.channels, 3, 5)
    with torch.no_grad():
        image = decoder.image(features)
    assert image.shape == (1, 3, 3 * decoder.stride, 5 * decoder.stride)
    assert float(image.min()) >= 0 and float(image.max()) <= 1


@pytest.fixture(scope="module")
def trained(vgg19_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("universal") / "tiny"
    train(folder, vgg19_dir, TINY, progress=False, checkpoint_every=10)
    return folder


def test_training_lowers_each_levels_loss(trained: Path) -> None:
    checkpoint = load_checkpoint(trained)
    assert sorted(checkpoint["decoders"]) == ["relu1_1", "relu2_1"]
    for layer, saved in checkpoint["decoders"].items():
        losses = saved["losses"]
        assert saved["step"] == len(losses) == TINY.steps
        # The decoder starts as a flat image of the photos' mean colour: its pixel term is
        # their variance and its feature term near 1 (a flat image has none of the edges these
        # layers answer to). Learning the crops' edges must at least halve that in 30 steps.
        assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), layer


def test_export_gives_onnx_decoders_deepest_first(trained: Path, vgg19_dir: Path) -> None:
    manifest = export_decoders(trained, vgg19_dir)
    assert manifest.layers == ("relu2_1", "relu1_1")
    assert [(d.channels, d.stride, d.steps, d.width) for d in manifest.decoders] == [
        (128, 2, TINY.steps, TINY.width),
        (64, 1, TINY.steps, TINY.width),
    ]
    assert manifest.feature_model == "vgg19" and manifest.size_px == TINY.size_px
    assert manifest.images == len(content_images())
    assert UniversalManifest.load(trained) == manifest
    encoder, _ = load_feature_net(vgg19_dir)
    photo = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    for decoder in manifest.decoders:
        with torch.no_grad():
            features = encoder(photo, [decoder.layer])[decoder.layer]
        session = ort.InferenceSession(
            str(trained / decoder.onnx_file), providers=["CPUExecutionProvider"]
        )
        (image,) = session.run(None, {DECODER_INPUT: features.numpy()})
        assert image.shape == (1, 3, 48, 40) and image.dtype == np.float32
        assert image.min() >= 0 and image.max() <= 1


def test_resuming_continues_from_the_saved_step(trained: Path, vgg19_dir: Path,
                                                tmp_path: Path) -> None:  # fmt: skip
    folder = tmp_path / "resumed"
    shutil.copytree(trained, folder)
    before = load_checkpoint(folder)["decoders"]
    train(folder, vgg19_dir, TrainConfig(**{**TINY.__dict__, "steps": 36}), progress=False)
    after = load_checkpoint(folder)["decoders"]
    for layer in TINY.levels:
        assert after[layer]["step"] == 36
        # The first 30 losses are the saved run's: it went on from step 30, not from 0.
        assert after[layer]["losses"][:30] == before[layer]["losses"]
        assert len(after[layer]["losses"]) == 36


def test_a_checkpoint_made_otherwise_is_refused(trained: Path, vgg19_dir: Path) -> None:
    wider = TrainConfig(**{**TINY.__dict__, "width": 0.5})
    with pytest.raises(ConfigMismatch, match=r"width 0\.25 != 0\.5"):
        train(trained, vgg19_dir, wider, progress=False)
    assert (trained / CHECKPOINT_FILE).is_file()


def test_the_feature_term_judges_every_layer_up_to_the_decoders(vgg19_dir: Path) -> None:
    encoder, _ = load_feature_net(vgg19_dir)
    decoder = UniversalDecoder("relu2_1", width=0.25)
    photo = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    with torch.no_grad():
        wanted = encoder(photo, ["relu1_1", "relu2_1"])
        made = decoder(wanted["relu2_1"])
        again = encoder(made.clamp(0, 1), ["relu1_1", "relu2_1"])
        pixel = float((made - photo).pow(2).mean())
        error = {n: float((again[n] - wanted[n]).pow(2).sum() / wanted[n].pow(2).sum())
                 for n in wanted}  # fmt: skip
        own = float(ReconstructionLoss(encoder, "relu2_1", 0.1, "own")(decoder, photo))
        up_to = float(ReconstructionLoss(encoder, "relu2_1", 0.1, "up-to")(decoder, photo))
    assert error["relu1_1"] != pytest.approx(error["relu2_1"], rel=0.05)  # the two can differ
    assert own == pytest.approx(pixel + 0.1 * error["relu2_1"], rel=1e-4)
    assert up_to == pytest.approx(pixel + 0.1 * (error["relu1_1"] + error["relu2_1"]) / 2, rel=1e-4)


def test_a_checkpoint_from_before_feature_layers_resumes_as_own(
    trained: Path, vgg19_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "older"
    shutil.copytree(trained, folder)
    state = load_checkpoint(folder)
    del state["config"]["feature_layers"]
    torch.save(state, folder / CHECKPOINT_FILE)
    with pytest.raises(ConfigMismatch, match=r"feature_layers 'own' != 'up-to'"):
        train(folder, vgg19_dir, TrainConfig(**{**TINY.__dict__, "feature_layers": "up-to"}),
              progress=False)  # fmt: skip
    assert load_checkpoint(folder)["decoders"]["relu1_1"]["step"] == TINY.steps


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--levels", "relu9_1"], "unknown levels ['relu9_1']"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--levels", "relu4_1", "--size", "100"], "--size must be a multiple of 8"),
        (["--levels", "relu1_1", "--size", "16"], "at least 32, got 16"),
        (["--width", "1.5"], "--width must be within (0, 1], got 1.5"),
        (["--content", "/no/such/folder"], "no such folder"),
        (["--feature-layers", "all"], "invalid choice: 'all'"),
    ],
)
def test_bad_command_lines_exit_with_a_clear_message(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--out", str(tmp_path / "never"), *argv])
    assert exited.value.code == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
