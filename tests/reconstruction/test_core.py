from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from services.common import images
from services.common.errors import InvalidArgument
from services.reconstruction import core
from tests.conftest import sample

CPU = torch.device("cpu")
STRIDES = {f"relu{b}_{c}": 2 ** (b - 1) for b in range(1, 6) for c in range(1, 5)}


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    from export.models import build_feature_net

    return build_feature_net("vgg19")[0]


def pixels_of(name: str, width: int, height: int) -> torch.Tensor:
    return torch.as_tensor(images.to_canvas(sample(name), width, height)).permute(2, 0, 1)[None]


def grams_of(net: torch.nn.Module, name: str, side: int = 64) -> dict[str, np.ndarray]:
    header = images.probe(sample(name), name, 10**8)
    width, height = images.fit_inside(header.width, header.height, side)
    with torch.no_grad():
        taps = net(pixels_of(name, width, height), ["relu1_1", "relu3_1"])
    return {layer: core.gram(f).numpy() for layer, f in taps.items()}


def scale_for(
    net: torch.nn.Module,
    width: int = 64,
    height: int = 64,
    iterations: int = 20,
    style: str = "style/starry_night.jpg",
) -> core.ScaleTargets:
    """Starry Night's style and the astronaut's content, as the blending service sends them."""
    with torch.no_grad():
        mapped = net(pixels_of("content/astronaut.jpg", width, height), ["relu4_2"])["relu4_2"][0]
    return core.ScaleTargets(
        width=width,
        height=height,
        iterations=iterations,
        channels=[core.StyleChannel(None, grams_of(net, style, max(width, height)), 1.0)],
        features={"relu4_2": mapped.numpy()},
        content_weights={"relu4_2": np.ones(mapped.shape[1:], np.float32)},
    )


def job_for(net: torch.nn.Module, iterations: int = 20, **changes: object) -> core.Job:
    settings: dict[str, object] = {
        "scales": [scale_for(net, iterations=iterations)],
        "optimizer": "lbfgs",
        "loss_weights": core.LossWeights(content=1.0, style=10.0, tv=0.0),
        "init": images.to_canvas(sample("content/astronaut.jpg"), 64, 64),
        "seed": 3,
        "preview_every": 5,
        "learning_rate": 0.02,
    }
    settings.update(changes)
    return core.Job(**settings)  # type: ignore[arg-type]


def run(
    net: torch.nn.Module, job: core.Job, control: core.Control | None = None
) -> list[core.Event]:
    return list(core.reconstruct(net, job, control or core.Control(), CPU, STRIDES))


def result_of(events: list[core.Event]) -> core.Result:
    assert isinstance(events[-1], core.Result)
    return events[-1]


def test_relative_error_and_total_variation_follow_their_formulas() -> None:
    value, target = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])
    assert core.relative_error(value, target).item() == pytest.approx(4 / 17)
    image = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    assert core.total_variation(image).item() == pytest.approx(0.5 + 0.5)


def test_loss_terms_are_weighted_and_scaled() -> None:
    net = lambda image, layers: {"a": image}  # noqa: E731 - an identity 'model' isolates the maths
    image = torch.full((1, 3, 4, 4), 0.5)
    targets = core.ScaleTargets(
        width=4,
        height=4,
        iterations=1,
        channels=[core.StyleChannel(None, {"a": np.eye(3, dtype=np.float32)}, 2.0)],
        features={"a": np.zeros((3, 4, 4), np.float32) + 1.0},
        content_weights={"a": np.full((4, 4), 3.0, np.float32)},
    )
    weights = core.LossWeights(content=5.0, style=7.0, tv=11.0)
    _, losses = core.Objective(net, targets, weights, {"a": 1}, CPU)(image)
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
    for event in core.reconstruct(net, job_for(net, iterations=50), control, CPU, STRIDES):
        seen.append(event)
        if isinstance(event, core.Progress) and event.iteration == 4:
            control.cancel.set()
    assert max(e.iteration for e in seen if isinstance(e, core.Progress)) == 4
    assert not any(isinstance(e, core.Result) for e in seen)


def test_finish_stops_early_with_a_result(net: torch.nn.Module) -> None:
    control = core.Control()
    events = []
    for event in core.reconstruct(net, job_for(net, iterations=50), control, CPU, STRIDES):
        events.append(event)
        if isinstance(event, core.Progress) and event.iteration == 3:
            control.finish.set()
    result = events[-1]
    assert isinstance(result, core.Result)
    assert result.finished_early and result.iterations == 3


def test_targets_that_do_not_fit_the_canvas_are_refused(net: torch.nn.Module) -> None:
    wrong = dataclasses.replace(scale_for(net), width=32, height=32)
    mismatch = r"features\[relu4_2\]: shape \(512, 8, 8\) != \(512, 4, 4\)"
    with pytest.raises(InvalidArgument, match=mismatch):
        run(net, job_for(net, scales=[wrong], init=None))
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


def test_a_guided_gram_with_a_full_mask_is_the_plain_gram() -> None:
    features = torch.rand(1, 4, 6, 5)
    torch.testing.assert_close(core.guided_gram(features, torch.ones(6, 5)), core.gram(features))
    half = torch.zeros(6, 5)
    half[:3] = 1
    torch.testing.assert_close(core.guided_gram(features, half), core.gram(features[:, :, :3]))


def test_the_grams_gradient_is_autograds_for_any_upstream_gradient() -> None:
    features = torch.rand(1, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5, dtype=torch.float64)
    upstream = torch.rand(4, 4, dtype=torch.float64)  # not symmetric: the general case
    flat = features[0].flatten(1)
    for ours, plain in (
        (core.gram(features), flat @ flat.T / 15),
        (core.guided_gram(features, mask), (flat * mask.flatten()) @ (flat * mask.flatten()).T
         / mask.sum()),
    ):  # fmt: skip
        torch.testing.assert_close(ours, plain)
        (expected,) = torch.autograd.grad(plain, features, upstream)
        (given,) = torch.autograd.grad(ours, features, upstream)
        torch.testing.assert_close(given, expected)
    assert torch.autograd.gradcheck(core.gram, (features,))


@pytest.mark.parametrize("model", ["vgg19", "efficientnet-lite0"])
def test_shapes_come_from_a_meta_twin_without_computing(model: str) -> None:
    from export.models import build_feature_net
    from services.reconstruction.objective import shape_probe

    net, _ = build_feature_net(model)
    probe, device = shape_probe(net, CPU)
    assert device.type == "meta" and shape_probe(net, CPU)[0] is probe  # made once per network
    layers = list(net.layer_names)[::3]
    with torch.no_grad():
        for height, width in ((45, 77), (64, 64)):
            real = net(torch.zeros(1, 3, height, width), layers)
            twin = probe(torch.zeros(1, 3, height, width, device=device), layers)
            assert {n: f.shape for n, f in twin.items()} == {n: f.shape for n, f in real.items()}


def test_coarse_to_fine_runs_each_scale_and_previews_at_the_canvas_size(
    net: torch.nn.Module,
) -> None:
    scales = [scale_for(net, 32, 32, 4), scale_for(net, 64, 64, 4)]
    init = images.to_canvas(sample("content/astronaut.jpg"), 32, 32)
    events = run(net, job_for(net, scales=scales, init=init, preview_every=2))
    progress = [e for e in events if isinstance(e, core.Progress)]
    assert [(p.iteration, p.scale, p.width) for p in progress] == [
        (i + 1, i // 4, 32 * (1 + i // 4)) for i in range(8)
    ]
    previews = [e for e in events if isinstance(e, core.Preview)]
    assert [p.iteration for p in previews] == [2, 4, 6]
    assert all(p.pixels.shape == (64, 64, 3) for p in previews)
    assert result_of(events).pixels.shape == (64, 64, 3)


def test_an_update_warm_starts_and_takes_effect_where_asked(net: torch.nn.Module) -> None:
    scream = scale_for(net, style="style/the_scream.jpg", iterations=12)
    update = core.Update(7, [scream], core.LossWeights(1.0, 10.0, 0.0), at_iteration=6)
    control = core.Control()
    control.updates.post(update)
    images_seen: dict[int, np.ndarray] = {}
    events = []
    for event in core.reconstruct(net, job_for(net, 12, preview_every=1), control, CPU, STRIDES):
        events.append(event)
        if isinstance(event, core.Preview):
            images_seen[event.iteration] = event.pixels
    progress = [e for e in events if isinstance(e, core.Progress)]
    assert [p.iteration for p in progress] == list(range(1, 13))  # no restart
    assert [(p.update_id, p.update_iteration) for p in progress[4:6]] == [(0, 0), (7, 6)]
    assert (progress[-1].update_id, progress[-1].update_iteration) == (7, 6)
    # Warm start: the first step on the new targets starts from the image as it stood.
    assert np.abs(images_seen[6].astype(int) - images_seen[5].astype(int)).mean() < 12


def test_a_held_update_waits_for_its_targets(net: torch.nn.Module) -> None:
    control = core.Control()
    control.updates.hold(3, at_iteration=2)
    late = core.Update(
        3, [scale_for(net, iterations=4)], core.LossWeights(1, 10, 0), at_iteration=2
    )
    threading.Timer(1.0, control.updates.post, args=(late,)).start()
    progress = [e for e in run(net, job_for(net, 4), control) if isinstance(e, core.Progress)]
    assert (progress[1].update_id, progress[1].update_iteration) == (3, 2)


def test_luminance_only_keeps_the_colour_images_chrominance(net: torch.nn.Module) -> None:
    from services.common import colour

    photo = images.to_canvas(sample("content/astronaut.jpg"), 64, 64)

    def chrominance_change(keep: list[np.ndarray] | None) -> float:
        result = result_of(run(net, job_for(net, 8, colour=keep))).pixels.astype(np.float32) / 255
        return float(np.abs(colour.to_yiq(result)[..., 1:] - colour.to_yiq(photo)[..., 1:]).mean())

    assert chrominance_change([photo]) < 0.005  # 8-bit rounding only
    assert chrominance_change(None) > 0.05  # Starry Night's blues and yellows
