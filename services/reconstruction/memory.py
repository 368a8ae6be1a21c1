"""How much memory a reconstruction needs, known before it runs, and who holds how much.

What autograd keeps for the backward pass grows with the pixels of what is evaluated at once
(the canvas, or one tile's crop); the image, its gradient and the optimiser's state grow with
the canvas; the weights are a constant. The first two are measured on the real network at two
small sizes (autograd's saved tensors, counted by storage), so the estimate holds for any
feature model without a table per architecture.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.config import TILE_MARGIN_PX, TILE_PX
from services.common.errors import ResourceExhausted
from services.reconstruction.core import LBFGS_HISTORY, Job
from services.reconstruction.objective import FeatureNet, gram, guided_gram
from services.reconstruction.tiles import Tiling
from services.reconstruction.winograd import MIN_PIXELS, workspace_of

MiB = 1024 * 1024
DEFAULT_TILING = Tiling(tile=TILE_PX, margin=TILE_MARGIN_PX)


@dataclass(frozen=True)
class Footprint:
    """Autograd's bytes for one evaluation: `fixed` + `per_pixel` · pixels; `peak_per_pixel` is
    the largest single activation, whose gradient the backward pass holds on top;
    `workspace_per_pixel` and `filters` the largest buffer a Winograd convolution works in: its
    transformed tiles, and its transformed filters, whose size does not grow with the image but
    which a layer needs only from the canvas at which it takes Winograd (27 MiB for VGG's
    512-channel layers with a 48 KiB L1 cache): (canvas pixels from which, bytes) pairs."""

    fixed: float
    per_pixel: float
    peak_per_pixel: float
    workspace_per_pixel: float = 0.0
    filters: tuple[tuple[float, int], ...] = ()

    def filters_bytes(self, pixels: float) -> int:
        """The largest transformed filters a pass over `pixels` needs."""
        return max((size for start, size in self.filters if pixels >= start), default=0)

    @classmethod
    def measure(
        cls,
        net: FeatureNet,
        layers: Sequence[str],
        device: torch.device,
        grams: Sequence[str] = (),
        guided: bool = False,
    ) -> Footprint:
        """`grams`: the style layers, whose Gram matrices may save tensors of their own (a
        guided Gram, as tiles and regions use, keeps a masked copy of each layer)."""
        small = cls._saved(net, layers, device, 64, grams, guided)
        large, asked = workspace_of(lambda: cls._saved(net, layers, device, 128, grams, guided))
        per_pixel = (large[0] - small[0]) / (128 * 128 - 64 * 64)
        # A layer seeing `pixels` of the 128² canvas takes Winograd from MIN_PIXELS on.
        filters = {(MIN_PIXELS * 128 * 128 / pixels, size) for pixels, size in asked.filters}
        return cls(
            small[0] - per_pixel * 64 * 64, per_pixel, large[1] / (128 * 128),
            asked.tiles / (128 * 128),  # tiles round up at 128 px: a little over, never under
            tuple(sorted(filters)),
        )  # fmt: skip

    @staticmethod
    def _saved(
        net: FeatureNet,
        layers: Sequence[str],
        device: torch.device,
        side: int,
        grams: Sequence[str],
        guided: bool,
    ) -> tuple[int, int]:
        """(bytes of the distinct storages autograd saves, the largest of them), leaving out
        the net's own weights, which a direct convolution saves but which are there anyway."""
        storages: dict[int, int] = {}
        activations: dict[int, int] = {}  # the batch's tensors (1×C×H×W), not the weights
        weights = (
            {t.untyped_storage().data_ptr() for t in (*net.parameters(), *net.buffers())}
            if isinstance(net, torch.nn.Module)
            else set()
        )

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() in weights:
                return tensor
            storages[storage.data_ptr()] = storage.nbytes()
            if tensor.dim() == 4 and tensor.shape[0] == 1:
                activations[storage.data_ptr()] = storage.nbytes()
            return tensor

        image = torch.zeros(1, 3, side, side, device=device, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            taps = net(image, list(layers))
            kept = [  # alive until counted: a freed storage's address is reused
                guided_gram(taps[name], torch.ones(taps[name].shape[-2:], device=device))
                if guided
                else gram(taps[name])
                for name in grams
            ]
        del kept
        return sum(storages.values()), max(activations.values(), default=0)


def estimate_bytes(
    footprint: Footprint,
    width: int,
    height: int,
    *,
    optimizer: str,
    channels: int = 3,
    tiling: Tiling | None = None,
    target_bytes: int = 0,
) -> int:
    """Peak bytes of a reconstruction at width×height (tiled or whole) beyond the model itself."""
    canvas = width * height
    evaluated = canvas
    if tiling is not None and max(width, height) > tiling.tile:
        side = tiling.tile + 2 * tiling.margin
        evaluated = min(width, side) * min(height, side)
    per_pixel = footprint.per_pixel + footprint.peak_per_pixel + footprint.workspace_per_pixel
    autograd = footprint.fixed + footprint.filters_bytes(evaluated) + per_pixel * evaluated
    image = 4 * channels * canvas  # one float32 image
    states = 2 * LBFGS_HISTORY + 3 if optimizer == "lbfgs" else 2  # (s, y) pairs, or Adam's m, v
    return int(autograd + image * (2 + states) + target_bytes)


class Budget:
    """Memory promised to running reconstructions; one that would not fit is refused."""

    def __init__(self, total_bytes: int) -> None:
        self.total = total_bytes
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return self._held

    def reserve(self, nbytes: int, what: str) -> Reservation:
        with self._lock:
            free = self.total - self._held
            if nbytes > free:
                raise ResourceExhausted(
                    f"{what} needs about {nbytes / MiB:,.0f} MiB; this reconstruction service "
                    f"has {free / MiB:,.0f} MiB free of {self.total / MiB:,.0f} MiB "
                    "(STYLEBLEND_MEMORY_BUDGET_MIB); try a smaller size or again later"
                )
            self._held += nbytes
        return Reservation(self, nbytes)

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes


@dataclass
class Reservation:
    budget: Budget
    nbytes: int

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *_: object) -> None:
        self.budget.release(self.nbytes)


def device_bytes(device: torch.device) -> int:
    """The memory a device has: a GPU's own, or the RAM this process may use (a container's
    cgroup limit when it has one)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = Path("/sys/fs/cgroup/memory.max")
    if limit.exists() and limit.read_text().strip().isdigit():
        ram = min(ram, int(limit.read_text()))
    return int(ram)


def device_budget(device: torch.device, mib: int = 0) -> Budget:
    """`mib` MiB, or (0) three quarters of what the device has."""
    return Budget(mib * MiB or device_bytes(device) * 3 // 4)


class Planner:
    """Decides, before a run, whether it fits whole, fits in tiles, or does not fit at all."""

    def __init__(
        self,
        net: FeatureNet,
        device: torch.device,
        budget: Budget,
        tiling: Tiling = DEFAULT_TILING,
    ) -> None:
        self.net, self.device, self.budget, self.tiling = net, device, budget, tiling
        self._footprints: dict[tuple[tuple[str, ...], tuple[str, ...], bool], Footprint] = {}
        self._lock = threading.Lock()

    def footprint(self, layers: Sequence[str], grams: Sequence[str], guided: bool) -> Footprint:
        key = (tuple(sorted(layers)), tuple(sorted(grams)), guided)
        with self._lock:
            if key not in self._footprints:
                self._footprints[key] = Footprint.measure(
                    self.net, key[0], self.device, key[1], guided
                )
            return self._footprints[key]

    def plan(self, job: Job) -> tuple[Job, Reservation]:
        """The job (tiled if it must be) and its memory, held until the reservation closes."""
        final = job.scales[-1]
        grams = sorted({n for c in final.channels for n in c.grams})
        layers = sorted({*grams, *final.features})
        masked = any(c.mask is not None for c in final.channels)
        channels = 1 if job.colour is not None else 3
        targets = sum(f.nbytes for f in final.features.values())
        size = f"a {final.width}×{final.height} reconstruction"

        def need(tiling: Tiling | None) -> int:
            footprint = self.footprint(layers, grams, guided=masked or tiling is not None)
            return estimate_bytes(
                footprint, final.width, final.height, optimizer=job.optimizer,
                channels=channels, tiling=tiling, target_bytes=targets,
            )  # fmt: skip

        whole = need(None)
        if whole <= self.budget.total - self.budget.held:
            return job, self.budget.reserve(whole, size)
        if max(final.width, final.height) <= self.tiling.tile:
            return job, self.budget.reserve(whole, size)  # no tiling would help; it says so
        tiled = dataclasses.replace(job, tiling=self.tiling)
        what = f"{size} in {self.tiling.tile} px tiles"
        return tiled, self.budget.reserve(need(self.tiling), what)
