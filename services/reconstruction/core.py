"""Optimise an image against blended targets (the loss is in objective.py, DESIGN.md).

The minimiser is the paper's. Coarse-to-fine runs the scales in turn, each
starting from the last one's image upsampled; a session update swaps the targets in place and
the image carries on from where it is (warm start).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from services.common.colour import with_chrominance
from services.common.errors import InvalidArgument
from services.common.updates import coalesced
from services.reconstruction.objective import (
    FeatureNet,
    Losses,
    LossWeights,
    Objective,
    ScaleTargets,
    ShapeCache,
    StyleChannel,
    _tensor,
    gram,
    guided_gram,
    relative_error,
    total_variation,
)
from services.reconstruction.tiles import TiledObjective, Tiling

__all__ = [
    "LBFGS_HISTORY", "OPTIMIZERS", "Control", "Event", "FeatureNet", "Job", "LossWeights",
    "Losses", "Objective", "Preview", "Progress", "Result", "ScaleTargets", "StyleChannel",
    "Tiling", "Update",
    "gram", "guided_gram", "reconstruct", "relative_error", "total_variation",
]  # fmt: skip

OPTIMIZERS = ("lbfgs", "adam")
LBFGS_HISTORY = 50  # (s, y) pairs L-BFGS keeps of its curvature


@dataclass(frozen=True)
class Job:
    scales: Sequence[ScaleTargets]  # coarsest first
    optimizer: str  # one of OPTIMIZERS
    loss_weights: LossWeights
    init: np.ndarray | None  # H×W×3 in [0, 1] at the first scale; None: noise
    seed: int
    preview_every: int  # 0: no previews
    learning_rate: float  # Adam's step in pixel units
    colour: Sequence[np.ndarray] | None = None  # per scale: optimise luminance, keep these colours
    tiling: Tiling | None = None  # set when the canvas is too big for memory in one piece


@dataclass(frozen=True)
class Update:
    update_id: int
    scales: Sequence[ScaleTargets]
    loss_weights: LossWeights
    at_iteration: int = 0  # 0: as soon as possible


@dataclass(frozen=True)
class Progress:
    iteration: int
    iterations_total: int
    scale: int
    scales_total: int
    width: int
    height: int
    losses: Losses
    iterations_per_second: float
    update_id: int  # the last update in effect; 0: none
    update_iteration: int  # the iteration it took effect at


@dataclass(frozen=True)
class Preview:
    iteration: int
    pixels: np.ndarray  # H×W×3 uint8 at the final canvas


@dataclass(frozen=True)
class Result:
    pixels: np.ndarray  # H×W×3 uint8 at the final canvas
    iterations: int
    seconds: float
    first_losses: Losses
    final_losses: Losses
    finished_early: bool


Event = Progress | Preview | Result


class Updates:
    """Updates posted from another thread; of those due, the latest is taken (coalesced)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._pending: list[Update] = []
        self._holds: dict[int, int] = {}  # update_id -> iteration it must take effect at

    def post(self, update: Update) -> None:
        with self._arrived:
            self._pending.append(update)
            self._holds.pop(update.update_id, None)
            self._arrived.notify_all()

    def hold(self, update_id: int, at_iteration: int) -> None:
        """An update for `at_iteration` is coming: wait for it there rather than run past it.

        `at_iteration` 0 releases the hold (the update will not come).
        """
        with self._arrived:
            if at_iteration:
                self._holds[update_id] = at_iteration
            else:
                self._holds.pop(update_id, None)
            self._arrived.notify_all()

    def take(self, iteration: int, control: Control) -> Update | None:
        """The latest update due at `iteration` (waiting for one that is held for it), if any."""
        with self._arrived:
            while any(at <= iteration for at in self._holds.values()):
                if control.cancel.is_set() or control.finish.is_set():
                    return None
                self._arrived.wait(timeout=0.05)
            due, self._pending = coalesced(self._pending, lambda u: u.at_iteration <= iteration)
        return due[-1] if due else None


@dataclass
class Control:
    """Set from outside the optimisation; read once per iteration."""

    cancel: threading.Event = field(default_factory=threading.Event)
    finish: threading.Event = field(default_factory=threading.Event)
    updates: Updates = field(default_factory=Updates)


def make_objective(
    net: FeatureNet,
    job: Job,
    targets: ScaleTargets,
    weights: LossWeights,
    strides: Mapping[str, int],
    device: torch.device,
    shapes: ShapeCache,
) -> Objective | TiledObjective:
    """The whole canvas at once, or tile by tile when the job is tiled and the scale is big."""
    tiling = job.tiling
    if tiling is None or max(targets.width, targets.height) <= tiling.tile:
        return Objective(net, targets, weights, strides, device, shapes)
    return TiledObjective(net, targets, weights, strides, device, tiling, job.seed, shapes)


def start_image(job: Job, device: torch.device) -> torch.Tensor:
    first = job.scales[0]
    if job.init is not None:
        if job.init.shape != (first.height, first.width, 3):
            raise InvalidArgument(
                f"init: shape {job.init.shape} != ({first.height}, {first.width}, 3)"
            )
        pixels = _tensor(job.init, device).permute(2, 0, 1)[None]
    else:
        generator = torch.Generator().manual_seed(job.seed)
        pixels = torch.rand(1, 3, first.height, first.width, generator=generator).to(device)
    if job.colour is not None:  # luminance only: Y of the start image
        weights = torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)
        pixels = (pixels * weights).sum(dim=1, keepdim=True)
    return pixels.contiguous()


def make_optimizer(job: Job, image: torch.Tensor) -> torch.optim.Optimizer:
    if job.optimizer == "lbfgs":
        # One closure evaluation per step, so an iteration is one forward and backward pass.
        return torch.optim.LBFGS([image], lr=1.0, max_iter=1, history_size=LBFGS_HISTORY)
    return torch.optim.Adam([image], lr=job.learning_rate)


def check_job(job: Job) -> None:
    if job.optimizer not in OPTIMIZERS:
        raise InvalidArgument(f"optimizer: {job.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if not job.scales:
        raise InvalidArgument("scales: at least one scale is needed")
    for index, scale in enumerate(job.scales):
        if scale.iterations < 1:
            raise InvalidArgument(
                f"scales[{index}].iterations must be >= 1, got {scale.iterations}"
            )
        if min(scale.width, scale.height) < 1:
            raise InvalidArgument(f"scales[{index}]: canvas {scale.width}×{scale.height} is empty")
    check_loss_weights(job.loss_weights)
    if job.optimizer == "adam" and not (np.isfinite(job.learning_rate) and job.learning_rate > 0):
        raise InvalidArgument(f"learning_rate must be a finite number > 0, got {job.learning_rate}")
    if job.colour is not None and len(job.colour) != len(job.scales):
        raise InvalidArgument(f"colour: {len(job.colour)} images for {len(job.scales)} scales")


def check_loss_weights(weights: LossWeights) -> None:
    for name in ("content", "style", "tv"):
        value = getattr(weights, name)
        if not np.isfinite(value) or value < 0:
            raise InvalidArgument(f"{name}_loss_weight must be a finite number >= 0, got {value}")


def check_update(update: Update, job: Job) -> None:
    """An update must keep the run's scales: same sizes, same iterations."""
    check_loss_weights(update.loss_weights)
    old = [(s.width, s.height, s.iterations) for s in job.scales]
    new = [(s.width, s.height, s.iterations) for s in update.scales]
    if old != new:
        raise InvalidArgument(f"update {update.update_id}: scales {new} != the run's {old}")


def to_canvas(image: torch.Tensor, job: Job, scale: int) -> np.ndarray:
    """H×W×3 uint8 at the final canvas; a luminance image gets its colours back."""
    final = job.scales[-1]
    pixels = image.detach().clamp(0, 1).expand(-1, 3, -1, -1)
    array = pixels[0].permute(1, 2, 0).cpu().numpy()
    if job.colour is not None:
        array = with_chrominance(array, job.colour[scale])
        pixels = torch.as_tensor(array).permute(2, 0, 1)[None]
    if pixels.shape[-2:] != (final.height, final.width):
        pixels = F.interpolate(
            pixels, size=(final.height, final.width), mode="bilinear", align_corners=False
        )
    array = pixels[0].clamp(0, 1).permute(1, 2, 0).mul(255).add(0.5).byte().cpu().numpy()
    return np.ascontiguousarray(array)


def reconstruct(
    net: FeatureNet,
    job: Job,
    control: Control,
    device: torch.device,
    strides: Mapping[str, int],
) -> Iterator[Event]:
    """Run the optimisation, yielding progress every iteration, previews, and the result last.

    Stops within one iteration of `control.cancel` (no result) or `control.finish` (result).
    """
    check_job(job)
    # Pixel gradients decay into denormal floats, which slow a CPU down four-fold; flush them.
    torch.set_flush_denormal(True)
    torch.manual_seed(job.seed)
    scales, weights = list(job.scales), job.loss_weights
    total = sum(scale.iterations for scale in scales)
    image = start_image(job, device)
    last_update = (0, 0)  # (update_id, the iteration it took effect at): progress says it
    latest: list[Losses] = []
    first: Losses | None = None
    done, started = 0, time.perf_counter()
    shapes: ShapeCache = {}

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss, losses = objective.evaluate(image)
        latest.append(losses)
        return loss

    for index, targets in enumerate(scales):
        if index:
            size = (targets.height, targets.width)
            image = F.interpolate(image.detach(), size=size, mode="bilinear", align_corners=False)
        image = image.detach().requires_grad_(True)
        objective = make_objective(net, job, scales[index], weights, strides, device, shapes)
        optimizer = make_optimizer(job, image)
        for _ in range(targets.iterations):
            if control.cancel.is_set() or control.finish.is_set():
                break
            update = control.updates.take(done + 1, control)
            if update is not None:
                check_update(update, job)
                scales, weights = list(update.scales), update.loss_weights
                objective = make_objective(
                    net, job, scales[index], weights, strides, device, shapes
                )
                if job.optimizer == "lbfgs":  # its curvature history belongs to the old targets
                    optimizer = make_optimizer(job, image)
                last_update = (update.update_id, done + 1)
            if control.cancel.is_set():
                break
            optimizer.step(closure)  # type: ignore[arg-type]
            with torch.no_grad():
                image.clamp_(0, 1)
            done += 1
            first = first or latest[0]
            yield Progress(
                done, total, index, len(scales), targets.width, targets.height, latest[-1],
                done / (time.perf_counter() - started), *last_update,
            )  # fmt: skip
            latest.clear()
            if job.preview_every and done % job.preview_every == 0 and done < total:
                yield Preview(done, to_canvas(image, job, index))
        if control.cancel.is_set():
            return
        if control.finish.is_set():
            break
    with torch.no_grad():
        final_losses = objective.measure(image)
    yield Result(
        pixels=to_canvas(image, job, index),
        iterations=done,
        seconds=time.perf_counter() - started,
        first_losses=first or final_losses,
        final_losses=final_losses,
        finished_early=done < total,
    )
