from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from services.common import images
from services.common.errors import InvalidArgument
from services.reconstruction import core
from tests.conftest import sample


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    from export.models import build_feature_net

    return build_feature_net("vgg19")[0]


def job_for(net: torch.nn.Module, **changes: object) -> core.Job:
    """Starry Night's style and the astronaut's content at 64 px, as the blending service would."""
    style = torch.as_tensor(images.to_canvas(sample("style/starry_night.jpg"), 64, 40))
    content = images.to_canvas(sample("content/astronaut.jpg"), 64, 64)
    with torch.no_grad():
        taps = net(style.permute(2, 0, 1)[None], ["relu1_1", "relu3_1"])
        mapped = net(torch.as_tensor(content).permute(2, 0, 1)[None], ["relu4_2"])
    settings: dict[str, object] = {
        "grams": {name: core.gram(f).numpy() for name, f in taps.items()},
        "features": {"relu4_2": mapped["relu4_2"][0].numpy()},
        "style_scale": 1.0,
        "content_scale": 1.0,
        "width": 64,
        "height": 64,
        "iterations": 20,
        "optimizer": "lbfgs",
        "content_weight": 1.0,
        "style_weight": 10.0,
        "tv_weight": 0.0,
        "init": content,
        "seed": 3,
        "preview_every": 5,
        "learning_rate": 0.02,
    }
    settings.update(changes)
    return core.Job(**settings)  # type: ignore[arg-type]


def run(
    net: torch.nn.Module, job: core.Job, control: core.Control | None = None
) -> list[core.Event]:
    return list(core.reconstruct(net, job, control or core.Control(), torch.device("cpu")))


def test_relative_error_and_total_variation_follow_their_formulas() -> None:
    value, target = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])
    assert core.relative_error(value, target).item() == pytest.approx(4 / 17)
    image = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    assert core.total_variation(image).item() == pytest.approx(0.5 + 0.5)


def test_loss_terms_are_weighted_and_scaled() -> None:
    net = lambda image, layers: {"a": image}  # noqa: E731 - an identity 'model' isolates the maths
    image = torch.full((1, 3, 4, 4), 0.5)
    job = core.Job(
        grams={"a": np.eye(3, dtype=np.float32)},
        features={"a": np.zeros((3, 4, 4), np.float32) + 1.0},
        style_scale=2.0,
        content_scale=3.0,
        width=4,
        height=4,
        iterations=1,
        optimizer="adam",
        content_weight=5.0,
        style_weight=7.0,
        tv_weight=11.0,
        init=None,
        seed=0,
        preview_every=0,
        learning_rate=0.1,
    )
    _, losses = core.Objective(net, job, torch.device("cpu"))(image)
    style = ((torch.full((3, 3), 0.25) - torch.eye(3)).pow(2).sum() / 3).item()
    assert losses.style == pytest.approx(7.0 * 2.0 * style)
    assert losses.content == pytest.approx(5.0 * 3.0 * (0.25 * 48) / 48)
    assert losses.tv == pytest.approx(0.0)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_the_style_loss_falls(net: torch.nn.Module, optimizer: str) -> None:
    events = run(net, job_for(net, optimizer=optimizer, iterations=15))
    progress = [e for e in events if isinstance(e, core.Progress)]
    assert [p.iteration for p in progress] == list(range(1, 16))
    assert [e.iteration for e in events if isinstance(e, core.Preview)] == [5, 10]
    result = events[-1]
    assert isinstance(result, core.Result)
    assert result.pixels.shape == (64, 64, 3) and result.pixels.dtype == np.uint8
    assert result.final_losses.style < 0.5 * result.first_losses.style


def test_the_same_seed_gives_the_same_image(net: torch.nn.Module) -> None:
    first = run(net, job_for(net, init=None, iterations=3))[-1]
    second = run(net, job_for(net, init=None, iterations=3))[-1]
    other = run(net, job_for(net, init=None, iterations=3, seed=4))[-1]
    assert isinstance(first, core.Result) and isinstance(second, core.Result)
    assert isinstance(other, core.Result)
    np.testing.assert_array_equal(first.pixels, second.pixels)
    assert not np.array_equal(first.pixels, other.pixels)


def test_cancel_stops_within_one_iteration_without_a_result(net: torch.nn.Module) -> None:
    control = core.Control()
    seen = []
    for event in core.reconstruct(net, job_for(net, iterations=50), control, torch.device("cpu")):
        seen.append(event)
        if isinstance(event, core.Progress) and event.iteration == 4:
            control.cancel.set()
    assert max(e.iteration for e in seen if isinstance(e, core.Progress)) == 4
    assert not any(isinstance(e, core.Result) for e in seen)


def test_finish_stops_early_with_a_result(net: torch.nn.Module) -> None:
    control = core.Control()
    events = []
    for event in core.reconstruct(net, job_for(net, iterations=50), control, torch.device("cpu")):
        events.append(event)
        if isinstance(event, core.Progress) and event.iteration == 3:
            control.finish.set()
    result = events[-1]
    assert isinstance(result, core.Result)
    assert result.finished_early and result.iterations == 3


def test_targets_that_do_not_fit_the_canvas_are_refused(net: torch.nn.Module) -> None:
    with pytest.raises(
        InvalidArgument, match=r"features\[relu4_2\]: shape \(512, 8, 8\) != \(512, 4, 4\)"
    ):
        run(net, job_for(net, width=32, height=32, init=None))
    with pytest.raises(InvalidArgument, match="learning_rate must be a finite number > 0"):
        run(net, job_for(net, optimizer="adam", learning_rate=0.0))
    with pytest.raises(InvalidArgument, match="optimizer: 'sgd' is not one of lbfgs, adam"):
        run(net, job_for(net, optimizer="sgd"))


def test_cancel_from_another_thread(net: torch.nn.Module) -> None:
    control = core.Control()
    timer = threading.Timer(0.5, control.cancel.set)
    timer.start()
    events = run(net, job_for(net, iterations=10_000, preview_every=0), control)
    assert not any(isinstance(e, core.Result) for e in events)
