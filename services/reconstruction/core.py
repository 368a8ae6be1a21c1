"""Optimise an image against blended targets: α·L_content + β·L_style + γ·TV (DESIGN.md).

L_style = Σₖ sₖ · meanₗ ‖Gₖ(x) − G*ₖ‖² / ‖G*ₖ‖², with the guided Gram Gₖ(x) = (F⊙mₖ)(F⊙mₖ)ᵀ / Σmₖ.
L_content = meanₗ Σₚ W(p)‖F(p) − F*(p)‖² / ‖F*‖².
Departures from Gatys et al.: each layer's loss is relative to its target's energy, so layers
count equally and one set of loss weights suits every feature model; the Gram matrix is
normalised by H·W. The minimiser is the paper's. Coarse-to-fine runs the scales in turn, each
starting from the last one's image upsampled; a session update swaps the targets in place and
the image carries on from where it is (warm start).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from services.common.colour import with_chrominance
from services.common.errors import InvalidArgument
from services.common.guides import to_layer

OPTIMIZERS = ("lbfgs", "adam")
FeatureNet = Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class StyleChannel:
    mask: np.ndarray | None  # H×W in [0, 1] at this scale's canvas; None: everywhere
    grams: Mapping[str, np.ndarray]  # layer -> G*ₖ
    scale: float  # Σᵢ sₖᵢ


@dataclass(frozen=True)
class ScaleTargets:
    width: int
    height: int
    iterations: int
    channels: Sequence[StyleChannel]
    features: Mapping[str, np.ndarray]  # layer -> F* (C×h×w)
    content_weights: Mapping[str, np.ndarray]  # layer -> W (h×w)


@dataclass(frozen=True)
class LossWeights:
    content: float  # α
    style: float  # β
    tv: float  # γ


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


@dataclass(frozen=True)
class Update:
    update_id: int
    scales: Sequence[ScaleTargets]
    loss_weights: LossWeights
    at_iteration: int = 0  # 0: as soon as possible


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
    updates: tuple[tuple[int, int], ...]  # (update_id, iteration it took effect at)


Event = Progress | Preview | Result


class Updates:
    """Updates posted from another thread; only the latest ready one matters (coalescing)."""

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
            due = [u for u in self._pending if u.at_iteration <= iteration]
            self._pending = [u for u in self._pending if u.at_iteration > iteration]
        return due[-1] if due else None


@dataclass
class Control:
    """Set from outside the optimisation; read once per iteration."""

    cancel: threading.Event = field(default_factory=threading.Event)
    finish: threading.Event = field(default_factory=threading.Event)
    updates: Updates = field(default_factory=Updates)


def gram(features: torch.Tensor) -> torch.Tensor:
    """G = F Fᵀ / (H W) for a 1×C×H×W feature map."""
    flat = features.flatten(2)
    return (flat @ flat.transpose(1, 2))[0] / flat.shape[2]


def guided_gram(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Gₖ = (F⊙m)(F⊙m)ᵀ / Σm for a 1×C×H×W feature map and an H×W mask."""
    masked = (features * mask).flatten(2)
    return (masked @ masked.transpose(1, 2))[0] / mask.sum()


def relative_error(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (value - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between neighbouring pixels, both directions."""
    down = (image[..., 1:, :] - image[..., :-1, :]).pow(2).mean()
    right = (image[..., :, 1:] - image[..., :, :-1]).pow(2).mean()
    return down + right


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.array(array, dtype=np.float32), device=device)


class Objective:
    """The loss of an image at one scale, split into its three weighted terms."""

    def __init__(
        self,
        net: FeatureNet,
        targets: ScaleTargets,
        weights: LossWeights,
        strides: Mapping[str, int],
        device: torch.device,
    ) -> None:
        self.net, self.targets, self.weights = net, targets, weights
        style_layers = {name for channel in targets.channels for name in channel.grams}
        self.layers = sorted(style_layers | set(targets.features))
        for name in self.layers:
            if name not in strides:
                raise InvalidArgument(f"unknown layer {name}; the model has {', '.join(strides)}")
        shapes = self._shapes(device)
        self.channels = [
            (channel.scale, self._grams(channel, shapes, strides, device))
            for channel in targets.channels
        ]
        self.features = {}
        for name, target in targets.features.items():
            if tuple(target.shape) != shapes[name][1:]:
                raise InvalidArgument(
                    f"features[{name}]: shape {tuple(target.shape)} != {shapes[name][1:]} "
                    f"at {targets.width}×{targets.height}"
                )
            weight = _tensor(targets.content_weights[name], device)
            self.features[name] = (_tensor(target, device)[None], weight)

    def _shapes(self, device: torch.device) -> dict[str, tuple[int, ...]]:
        if not self.layers:
            return {}
        probe = torch.zeros(1, 3, self.targets.height, self.targets.width, device=device)
        with torch.no_grad():
            return {name: tuple(f.shape) for name, f in self.net(probe, self.layers).items()}

    def _grams(
        self,
        channel: StyleChannel,
        shapes: Mapping[str, tuple[int, ...]],
        strides: Mapping[str, int],
        device: torch.device,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Layer -> (G*, mask at the layer or None); layers the mask leaves empty are skipped."""
        grams: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for name, target in channel.grams.items():
            channels, height, width = shapes[name][1:]
            if tuple(target.shape) != (channels, channels):
                raise InvalidArgument(
                    f"grams[{name}]: shape {tuple(target.shape)} != ({channels}, {channels})"
                )
            mask = None
            if channel.mask is not None:
                small = to_layer(channel.mask, height, width, strides[name])
                if small.sum() <= 1e-6:
                    continue
                mask = _tensor(small, device)
            grams[name] = (_tensor(target, device), mask)
        return grams

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, Losses]:
        pixels = image.expand(-1, 3, -1, -1)  # a luminance image is optimised as grey RGB
        taps = self.net(pixels, self.layers) if self.layers else {}
        zero = image.new_zeros(())
        style = zero
        for scale, grams in self.channels:
            errors = [
                relative_error(gram(taps[n]) if m is None else guided_gram(taps[n], m), g)
                for n, (g, m) in grams.items()
            ]
            style = style + scale * sum(errors, zero) / max(len(errors), 1)
        content = zero
        for name, (target, weight) in self.features.items():
            error = ((taps[name] - target).pow(2) * weight).sum() / target.pow(2).sum().clamp_min(
                1e-12
            )
            content = content + error / len(self.features)
        terms = (
            self.weights.content * content,
            self.weights.style * style,
            self.weights.tv * total_variation(image),
        )
        return terms[0] + terms[1] + terms[2], Losses(*(float(t.detach()) for t in terms))


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
        return torch.optim.LBFGS([image], lr=1.0, max_iter=1, history_size=50)
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
    applied: list[tuple[int, int]] = []
    latest: list[Losses] = []
    first: Losses | None = None
    done, started = 0, time.perf_counter()

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss, losses = objective(image)
        loss.backward()
        latest.append(losses)
        return loss

    for index, targets in enumerate(scales):
        if index:
            size = (targets.height, targets.width)
            image = F.interpolate(image.detach(), size=size, mode="bilinear", align_corners=False)
        image = image.detach().requires_grad_(True)
        objective = Objective(net, scales[index], weights, strides, device)
        optimizer = make_optimizer(job, image)
        for _ in range(targets.iterations):
            if control.cancel.is_set() or control.finish.is_set():
                break
            update = control.updates.take(done + 1, control)
            if update is not None:
                check_update(update, job)
                scales, weights = list(update.scales), update.loss_weights
                objective = Objective(net, scales[index], weights, strides, device)
                if job.optimizer == "lbfgs":  # its curvature history belongs to the old targets
                    optimizer = make_optimizer(job, image)
                applied.append((update.update_id, done + 1))
            if control.cancel.is_set():
                break
            optimizer.step(closure)  # type: ignore[arg-type]
            with torch.no_grad():
                image.clamp_(0, 1)
            done += 1
            first = first or latest[0]
            last_update = applied[-1] if applied else (0, 0)
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
        final_losses = objective(image.detach())[1]
    yield Result(
        pixels=to_canvas(image, job, index),
        iterations=done,
        seconds=time.perf_counter() - started,
        first_losses=first or final_losses,
        final_losses=final_losses,
        finished_early=done < total,
        updates=tuple(applied),
    )
