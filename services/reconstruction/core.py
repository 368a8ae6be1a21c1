"""Optimise an image against blended targets: α·Σc·L_content + β·Σs·L_style + γ·TV.

Departures from Gatys et al.: each layer's loss is relative to its target's energy
(‖G − G*‖² / ‖G*‖²), so layers count equally and one set of loss weights suits every feature
model; the Gram matrix is normalised by H·W (DESIGN.md). The objective's minimiser is unchanged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from services.common.errors import InvalidArgument

OPTIMIZERS = ("lbfgs", "adam")


@dataclass(frozen=True)
class Job:
    grams: Mapping[str, np.ndarray]  # layer -> G* (C×C); empty: no style term
    features: Mapping[str, np.ndarray]  # layer -> F* (C×h×w) at the canvas; empty: no content term
    style_scale: float  # Σ sᵢ
    content_scale: float  # Σ cᵢ
    width: int
    height: int
    iterations: int
    optimizer: str  # one of OPTIMIZERS
    content_weight: float  # α
    style_weight: float  # β
    tv_weight: float  # γ
    init: np.ndarray | None  # H×W×3 in [0, 1]; None: noise
    seed: int
    preview_every: int  # 0: no previews
    learning_rate: float  # Adam's step in pixel units


@dataclass(frozen=True)
class Losses:
    content: float
    style: float
    tv: float

    @property
    def total(self) -> float:
        return self.content + self.style + self.tv


@dataclass(frozen=True)
class Progress:
    iteration: int
    iterations_total: int
    losses: Losses
    iterations_per_second: float


@dataclass(frozen=True)
class Preview:
    iteration: int
    pixels: np.ndarray  # H×W×3 uint8


@dataclass(frozen=True)
class Result:
    pixels: np.ndarray  # H×W×3 uint8
    iterations: int
    seconds: float
    first_losses: Losses
    final_losses: Losses
    finished_early: bool


Event = Progress | Preview | Result


@dataclass
class Control:
    """Set from outside the optimisation; read once per iteration."""

    cancel: threading.Event = field(default_factory=threading.Event)
    finish: threading.Event = field(default_factory=threading.Event)


def gram(features: torch.Tensor) -> torch.Tensor:
    """G = F Fᵀ / (H W) for a 1×C×H×W feature map."""
    flat = features.flatten(2)
    return (flat @ flat.transpose(1, 2))[0] / flat.shape[2]


def relative_error(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (value - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between neighbouring pixels, both directions."""
    down = (image[..., 1:, :] - image[..., :-1, :]).pow(2).mean()
    right = (image[..., :, 1:] - image[..., :, :-1]).pow(2).mean()
    return down + right


FeatureNet = Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]]


class Objective:
    """The loss of an image, split into its three weighted terms."""

    def __init__(self, net: FeatureNet, job: Job, device: torch.device) -> None:
        self.net = net
        self.job = job
        as_tensor = lambda a: torch.as_tensor(np.array(a, dtype=np.float32), device=device)  # noqa: E731
        self.grams = (
            {name: as_tensor(g) for name, g in job.grams.items()} if job.style_scale else {}
        )
        self.features = (
            {name: as_tensor(f)[None] for name, f in job.features.items()}
            if job.content_scale
            else {}
        )
        self.layers = sorted(set(self.grams) | set(self.features))

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, Losses]:
        job = self.job
        taps = self.net(image, self.layers) if self.layers else {}
        zero = image.new_zeros(())
        style = zero
        if self.grams:
            style = sum(
                (relative_error(gram(taps[n]), g) for n, g in self.grams.items()), zero
            ) / len(self.grams)
        content = zero
        if self.features:
            content = sum(
                (relative_error(taps[n], f) for n, f in self.features.items()), zero
            ) / len(self.features)
        terms = (
            job.content_weight * job.content_scale * content,
            job.style_weight * job.style_scale * style,
            job.tv_weight * total_variation(image),
        )
        losses = Losses(*(float(term.detach()) for term in terms))
        return terms[0] + terms[1] + terms[2], losses

    def check_shapes(self, image: torch.Tensor) -> None:
        """Targets must match what the model gives at this canvas, or the losses are meaningless."""
        with torch.no_grad():
            taps = self.net(image, self.layers) if self.layers else {}
        for name, g in self.grams.items():
            channels = taps[name].shape[1]
            if tuple(g.shape) != (channels, channels):
                raise InvalidArgument(
                    f"grams[{name}]: shape {tuple(g.shape)} != ({channels}, {channels})"
                )
        for name, f in self.features.items():
            if f.shape != taps[name].shape:
                raise InvalidArgument(
                    f"features[{name}]: shape {tuple(f.shape[1:])} != "
                    f"{tuple(taps[name].shape[1:])} at {self.job.width}×{self.job.height}"
                )


def start_image(job: Job, device: torch.device) -> torch.Tensor:
    if job.init is not None:
        if job.init.shape != (job.height, job.width, 3):
            raise InvalidArgument(f"init: shape {job.init.shape} != ({job.height}, {job.width}, 3)")
        pixels = torch.as_tensor(np.array(job.init, dtype=np.float32)).permute(2, 0, 1)[None]
    else:
        generator = torch.Generator().manual_seed(job.seed)
        pixels = torch.rand(1, 3, job.height, job.width, generator=generator)
    return pixels.to(device).contiguous()


def to_pixels(image: torch.Tensor) -> np.ndarray:
    array = image.detach()[0].clamp(0, 1).permute(1, 2, 0).mul(255).add(0.5).byte().cpu().numpy()
    return np.ascontiguousarray(array)


def make_optimizer(job: Job, image: torch.Tensor) -> torch.optim.Optimizer:
    if job.optimizer == "lbfgs":
        # One closure evaluation per step, so an iteration is one forward and backward pass.
        return torch.optim.LBFGS([image], lr=1.0, max_iter=1, history_size=50)
    if job.optimizer == "adam":
        return torch.optim.Adam([image], lr=job.learning_rate)
    raise InvalidArgument(f"optimizer: {job.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")


def check_job(job: Job) -> None:
    if job.iterations < 1:
        raise InvalidArgument(f"iterations must be >= 1, got {job.iterations}")
    if min(job.width, job.height) < 1:
        raise InvalidArgument(f"canvas {job.width}×{job.height} is empty")
    for name in ("content_weight", "style_weight", "tv_weight", "style_scale", "content_scale"):
        value = getattr(job, name)
        if not np.isfinite(value) or value < 0:
            raise InvalidArgument(f"{name} must be a finite number >= 0, got {value}")
    if job.optimizer == "adam" and not (np.isfinite(job.learning_rate) and job.learning_rate > 0):
        raise InvalidArgument(f"learning_rate must be a finite number > 0, got {job.learning_rate}")


def reconstruct(
    net: FeatureNet, job: Job, control: Control, device: torch.device
) -> Iterator[Event]:
    """Run the optimisation, yielding progress every iteration, previews, and the result last.

    Stops within one iteration of `control.cancel` (no result) or `control.finish` (result).
    """
    check_job(job)
    # Pixel gradients decay into denormal floats, which slow a CPU down four-fold; flush them.
    torch.set_flush_denormal(True)
    torch.manual_seed(job.seed)
    objective = Objective(net, job, device)
    image = start_image(job, device)
    objective.check_shapes(image)
    image.requires_grad_(True)
    optimizer = make_optimizer(job, image)
    latest: list[Losses] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss, losses = objective(image)
        loss.backward()
        latest.append(losses)
        return loss

    started = time.perf_counter()
    first: Losses | None = None
    done = 0
    while done < job.iterations:
        if control.cancel.is_set():
            return
        if control.finish.is_set():
            break
        optimizer.step(closure)  # type: ignore[arg-type]
        with torch.no_grad():
            image.clamp_(0, 1)
        done += 1
        first = first or latest[0]
        rate = done / (time.perf_counter() - started)
        yield Progress(done, job.iterations, latest[-1], rate)
        latest.clear()
        if job.preview_every and done % job.preview_every == 0 and done < job.iterations:
            yield Preview(done, to_pixels(image))
    if control.cancel.is_set():
        return
    with torch.no_grad():
        final_losses = objective(image.detach())[1]
    yield Result(
        pixels=to_pixels(image),
        iterations=done,
        seconds=time.perf_counter() - started,
        first_losses=first or final_losses,
        final_losses=final_losses,
        finished_early=done < job.iterations,
    )
