"""The iterative path through the service graph, against a bare PyTorch loop, on this CPU.

    python -m bench.graph --out out/bench [--sizes 128 256 512] [--repeats N]

The four services run in this process on loopback ports, as `tests/conftest.py` starts them;
the client is a gRPC stub to the gateway. Every run blends the astronaut (content 1) with
Starry Night (style 1), L-BFGS, a fixed seed, one scale (no coarse-to-fine, so every iteration
is at the named size) and a preview every iteration. For each size the report has:

1. time per iteration through the graph (client-side gaps between Progress events of a
   Blend), the same job run by `services.reconstruction.core.reconstruct` in this process with
   no gRPC (the bare loop), and their ratio: the graph's overhead;
2. time to the first preview of a Session whose sources the features service has never seen
   (warm services, cold cache), and of the identical request again (cached sources);
3. slider-to-preview latency: a SessionUpdate changing Starry Night's style weight, sent at a
   random point of an iteration, until the first Progress carrying its update_id and until
   the Preview after that;
4. feature extraction: the features service's ONNX Runtime session (CPU provider) against the
   same network in PyTorch eager, NCHW and channels_last;
5. protobuf bytes per iteration and per update, public and internal (the gateway's upstream
   calls are metered), and peak RSS of this process.

Timings are medians after a warm-up, with min and max; the benchmark asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import itertools
import json
import os
import platform
import queue
import random
import resource
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import torch
from styleblend.internal.v1 import blending_pb2, features_pb2, reconstruction_pb2
from styleblend.v1 import styleblend_pb2 as pb
from styleblend.v1 import styleblend_pb2_grpc

from bench.numbers import cpu_model, spread
from export.models import load_feature_net
from services.common import images
from services.common.config import (
    FeaturesConfig,
    GatewayConfig,
    ReconstructionConfig,
)
from services.features.core import FeatureExtractor
from services.features.servicer import FeaturesServicer
from services.gateway.core import Gateway
from services.gateway.servicer import style_blend_servicer
from services.gateway.upstream import ReconstructCall, Upstreams
from services.graph import model_folder, start_local_graph
from services.reconstruction import core
from services.reconstruction.servicer import ReconstructionServicer
from services.reconstruction.winograd import with_winograd

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "clients" / "samples"
CONTENT = "content/astronaut.jpg"
STYLE = "style/starry_night.jpg"
SEED = 7
MiB = 1024 * 1024
CPU = "CPUExecutionProvider"
# Iterations of one timed run: enough gaps at small sizes, few at 512 px (about 2 s each here).
DEFAULT_ITERATIONS = {128: 12, 256: 8, 512: 4}


def default_iterations(size: int) -> int:
    if size in DEFAULT_ITERATIONS:
        return DEFAULT_ITERATIONS[size]
    return 12 if size <= 128 else 8 if size <= 256 else 4


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...] = (128, 256, 512)
    repeats: int = 3  # timed runs per measurement (feature extraction: at least 5)
    iterations: dict[int, int] = field(default_factory=dict)  # size -> per run; else defaults
    updates: int = 5  # slider moves per size
    preview_every: int = 1
    threads: int = 0  # torch and ONNX Runtime threads; 0: leave the libraries' defaults
    model_dir: Path = ROOT / "models"
    model: str = "vgg19"

    def iterations_at(self, size: int) -> int:
        return max(3, self.iterations.get(size, default_iterations(size)))


# --- numbers -------------------------------------------------------------------------------
def write_report(out: Path, name: str, data: object, markdown: str) -> None:
    """`name`.json (the data) and `name`.md (the table) under `out`."""
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)


def timed_ms(run: Callable[[], object], repeats: int) -> dict[str, float]:
    run()  # warm-up: ONNX Runtime plans its memory, PyTorch its kernels, on a shape's first run
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return spread(times)


def interleaved_ms(
    runs: dict[str, Callable[[], object]], repeats: int
) -> dict[str, dict[str, float]]:
    """`timed_ms` of each run, taken in rounds of one run each, the order turning every round:
    this machine's speed drifts over minutes, and a drift then falls on every run alike."""
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: spread(samples) for name, samples in times.items()}


def steady_gaps_ms(stamps: list[float]) -> list[float]:
    """Gaps between consecutive iterations, the first one left out as a warm-up."""
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
    return gaps[1:] if len(gaps) > 1 else gaps


# --- memory --------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Set this process's peak RSS back to its current RSS (Linux); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mib() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / MiB


# --- the graph, with its upstream calls metered ------------------------------------------
class Meter:
    """Protobuf bytes of the gateway's upstream calls, by kind, and the last job it started."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.sizes: dict[str, list[int]] = {}
        self.last_job: reconstruction_pb2.ReconstructJob | None = None

    def add(self, kind: str, size: int) -> None:
        with self._lock:
            self.bytes[kind] = self.bytes.get(kind, 0) + size
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.sizes.setdefault(kind, []).append(size)

    def totals(self) -> dict[str, int]:
        with self._lock:
            return dict(self.bytes)


class MeteredCall:
    def __init__(self, call: ReconstructCall, meter: Meter) -> None:
        self._call, self._meter = call, meter

    def __iter__(self) -> Iterator[reconstruction_pb2.ReconstructResponse]:
        for response in self._call:
            kind = response.event.WhichOneof("event") or "empty"
            self._meter.add(f"reconstruct.response.{kind}", response.ByteSize())
            yield response

    def cancel(self) -> None:
        self._call.cancel()


class MeteredUpstreams(Upstreams):
    """The gateway's real upstream channels; every message's ByteSize() is counted."""

    def __init__(self, config: GatewayConfig, meter: Meter) -> None:
        super().__init__(config)
        self.meter = meter

    def extract(self, request: features_pb2.ExtractRequest) -> features_pb2.ExtractResponse:
        response = super().extract(request)
        self.meter.add("extract.request", request.ByteSize())
        self.meter.add("extract.response", response.ByteSize())
        return response

    def blend_targets(
        self, request: blending_pb2.BlendTargetsRequest
    ) -> blending_pb2.BlendTargetsResponse:
        response = super().blend_targets(request)
        self.meter.add("blend_targets.request", request.ByteSize())
        self.meter.add("blend_targets.response", response.ByteSize())
        return response

    def reconstruct(  # type: ignore[override]
        self, requests: Iterator[reconstruction_pb2.ReconstructRequest]
    ) -> MeteredCall:
        def counted() -> Iterator[reconstruction_pb2.ReconstructRequest]:
            for request in requests:
                kind = request.WhichOneof("message") or "empty"
                if kind == "start":
                    self.meter.last_job = request.start
                self.meter.add(f"reconstruct.request.{kind}", request.ByteSize())
                yield request

        return MeteredCall(super().reconstruct(counted()), self.meter)


class Graph:
    """The four services on loopback in this process, as tests/conftest.py starts them."""

    def __init__(self, settings: Settings, fast_dir: Path) -> None:
        models, threads = settings.model_dir, settings.threads
        recon_config = ReconstructionConfig(
            model=settings.model, model_dir=models, device="cpu", threads=threads
        )
        self.meter = Meter()
        self.local = start_local_graph(
            FeaturesConfig(
                model=settings.model,
                model_dir=models,
                fast_model_dir=fast_dir,
                providers=(CPU,),
                intra_op_threads=threads,
            ),
            recon_config,
            GatewayConfig(
                gateway_port=0, max_side_px=max(1024, *settings.sizes), max_iterations=100_000
            ),
            gateway_servicer=lambda config: style_blend_servicer(
                Gateway(config, MeteredUpstreams(config, self.meter))
            ),
        )
        features = self.local.servicers["features"].servicer
        recon = self.local.servicers["reconstruction"].servicer
        assert isinstance(features, FeaturesServicer)
        assert isinstance(recon, ReconstructionServicer)
        self.extractor: FeatureExtractor = features.extractor
        self.net: core.FeatureNet = recon.net
        self.model_folder = model_folder(recon_config)
        self.strides: dict[str, int] = recon.strides
        self.targets = recon.blending  # where the reconstruction fetches its targets
        self.channel = grpc.insecure_channel(
            self.local.address("gateway"),
            options=[("grpc.max_receive_message_length", 64 * MiB)],
        )
        self.stub = styleblend_pb2_grpc.StyleBlendStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.local.stop()


def quiesce(timeout_s: float = 120.0) -> None:
    """Wait until no reconstruction thread of this process is still running (after a cancel)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(t.name == "reconstruction" and t.is_alive() for t in threading.enumerate()):
            return
        time.sleep(0.01)


# --- requests and calls --------------------------------------------------------------------
def with_nonce(jpeg: bytes, nonce: str) -> bytes:
    """The same JPEG (same pixels) with a comment segment, so a different sha256: uncached."""
    payload = f"styleblend bench {nonce}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def blend_request(
    size: int, iterations: int, preview_every: int, content: bytes, style: bytes
) -> pb.BlendRequest:
    return pb.BlendRequest(
        sources=[
            pb.Source(data=content, content_weight=1.0, style_weight=0.0),
            pb.Source(data=style, content_weight=0.0, style_weight=1.0),
        ],
        max_side_px=size,
        iterations=iterations,
        optimizer=pb.OPTIMIZER_LBFGS,
        seed=SEED,
        preview_every=preview_every,
        scales=1,
    )


@dataclass
class Trace:
    """What a client saw: (arrival time, event, SessionResponse/BlendResponse ByteSize)."""

    started: float
    events: list[tuple[float, pb.BlendEvent, int]] = field(default_factory=list)

    def of(self, kind: str) -> list[tuple[float, pb.BlendEvent, int]]:
        return [item for item in self.events if item[1].WhichOneof("event") == kind]

    def progress_stamps(self) -> list[float]:
        return [t for t, _, _ in self.of("progress")]


def run_blend(stub: styleblend_pb2_grpc.StyleBlendStub, request: pb.BlendRequest) -> Trace:
    trace = Trace(time.perf_counter())
    for response in stub.Blend(request, timeout=3600):
        trace.events.append((time.perf_counter(), response.event, response.ByteSize()))
    return trace


class Session:
    """A Session call: messages sent at any time, events stamped on arrival by a reader."""

    def __init__(self, stub: styleblend_pb2_grpc.StyleBlendStub, start: pb.BlendRequest) -> None:
        self._outgoing: queue.Queue[pb.SessionRequest | None] = queue.Queue()
        self._outgoing.put(pb.SessionRequest(start=start))
        self.incoming: queue.Queue[tuple[float, pb.BlendEvent, int] | None] = queue.Queue()
        self.started = time.perf_counter()
        self.call = stub.Session(self._requests(), timeout=3600)
        self._reader = threading.Thread(target=self._read, daemon=True, name="bench-reader")
        self._reader.start()

    def _requests(self) -> Iterator[pb.SessionRequest]:
        while (message := self._outgoing.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for response in self.call:
                self.incoming.put((time.perf_counter(), response.event, response.ByteSize()))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                raise
        finally:
            self.incoming.put(None)

    def send(self, message: pb.SessionRequest) -> None:
        self._outgoing.put(message)

    def next(self, timeout_s: float = 600.0) -> tuple[float, pb.BlendEvent, int]:
        item = self.incoming.get(timeout=timeout_s)
        if item is None:
            raise RuntimeError("the session ended early")
        return item

    def until(self, kind: str) -> tuple[float, pb.BlendEvent, int]:
        while True:
            item = self.next()
            if item[1].WhichOneof("event") == kind:
                return item

    def close(self) -> None:
        self._outgoing.put(None)
        self.call.cancel()
        self._reader.join(timeout=60)
        quiesce()


# --- the five measurements -----------------------------------------------------------------
def iteration_times(
    graph: Graph, settings: Settings, size: int, content: bytes, style: bytes
) -> dict[str, Any]:
    """Graph vs bare loop on the same job, interleaved run by run; peak RSS of each."""
    iterations = settings.iterations_at(size)
    request = blend_request(size, iterations, settings.preview_every, content, style)
    graph_gaps: list[float] = []
    bare_gaps: list[float] = []
    reported: list[float] = []
    graph_peak: list[float] = []
    bare_peak: list[float] = []
    progress_bytes: list[int] = []
    preview_bytes: list[int] = []
    graph_loss = bare_loss = float("nan")
    canvas = (size, size)
    for _ in range(settings.repeats):
        reset_peak_rss()
        trace = run_blend(graph.stub, request)
        graph_peak.append(peak_rss_mib())
        graph_gaps += steady_gaps_ms(trace.progress_stamps())
        progress = [event.progress for _, event, _ in trace.of("progress")]
        reported.append(progress[-1].iterations_per_second)
        canvas = (progress[-1].width_px, progress[-1].height_px)
        progress_bytes += [size for _, _, size in trace.of("progress")]
        preview_bytes += [size for _, _, size in trace.of("preview")]
        graph_loss = trace.of("result")[-1][1].result.stats.final_losses.total
        quiesce()
        assert graph.meter.last_job is not None
        job = to_core_job(graph, graph.meter.last_job)
        reset_peak_rss()
        stamps, bare_loss = bare_loop(graph.net, job, graph.strides)
        bare_peak.append(peak_rss_mib())
        bare_gaps += steady_gaps_ms(stamps)
    graph_ms, bare_ms = spread(graph_gaps), spread(bare_gaps)
    return {
        "canvas": list(canvas),
        "iterations_per_run": iterations,
        "graph_ms": graph_ms,
        "bare_ms": bare_ms,
        "ratio": graph_ms["median"] / bare_ms["median"],
        "service_iterations_per_second": spread(reported),
        "final_loss": {"graph": graph_loss, "bare": bare_loss},
        "progress_bytes": spread([float(b) for b in progress_bytes]),
        "preview_bytes": spread([float(b) for b in preview_bytes]),
        "peak_rss_mib": {"graph_blend": max(graph_peak), "bare_loop": max(bare_peak)},
    }


def to_core_job(graph: Graph, message: reconstruction_pb2.ReconstructJob) -> core.Job:
    """The job as the reconstruction service sees it: its targets fetched from blending."""
    from services.reconstruction.servicer import to_job

    return to_job(message, graph.targets)


def bare_loop(
    net: core.FeatureNet, job: core.Job, strides: dict[str, int]
) -> tuple[list[float], float]:
    """The reconstruction core on the graph's own job, in this thread: no gRPC, no threads."""
    stamps: list[float] = []
    loss = float("nan")
    for event in core.reconstruct(net, job, core.Control(), torch.device("cpu"), strides):
        if isinstance(event, core.Progress):
            stamps.append(time.perf_counter())
        elif isinstance(event, core.Result):
            loss = event.final_losses.total
    return stamps, loss


def first_previews(
    graph: Graph, settings: Settings, size: int, content: bytes, style: bytes
) -> dict[str, Any]:
    """A Session's first preview: sources never seen (cold), then the same request (cached)."""
    cold: dict[str, list[float]] = {"preview": [], "progress": []}
    cached: dict[str, list[float]] = {"preview": [], "progress": []}
    start_bytes: list[float] = []
    job_bytes: list[float] = []
    for repeat in range(settings.repeats):
        nonce = f"{size}-{repeat}-{time.time_ns()}"
        request = blend_request(
            size, 2, 1, with_nonce(content, nonce), with_nonce(style, nonce)
        )  # preview after iteration 1; the run is cancelled after it
        start_bytes.append(float(pb.SessionRequest(start=request).ByteSize()))
        for into in (cold, cached):
            session = Session(graph.stub, request)
            progress_at = session.until("progress")[0]
            preview_at = session.until("preview")[0]
            session.close()
            into["progress"].append((progress_at - session.started) * 1000)
            into["preview"].append((preview_at - session.started) * 1000)
            if graph.meter.last_job is not None:
                job_bytes.append(float(graph.meter.last_job.ByteSize()))
    return {
        "cold_ms": spread(cold["preview"]),
        "cached_ms": spread(cached["preview"]),
        "cold_first_progress_ms": spread(cold["progress"]),
        "cached_first_progress_ms": spread(cached["progress"]),
        "start_request_bytes": spread(start_bytes),
        "reconstruct_job_bytes": spread(job_bytes),
    }


def slider(
    graph: Graph,
    settings: Settings,
    size: int,
    content: bytes,
    style: bytes,
    iteration_ms: float,
) -> dict[str, Any]:
    """Style-weight moves in a running Session, each at a random point of an iteration."""
    request = blend_request(size, 100_000, settings.preview_every, content, style)
    rng = random.Random(SEED + size)
    to_progress: list[float] = []
    to_preview: list[float] = []
    waited: list[float] = []
    update_bytes: list[float] = []
    internal: dict[str, list[float]] = {}
    reset_peak_rss()
    session = Session(graph.stub, request)
    try:
        session.until("preview")
        for update_id in range(1, settings.updates + 1):
            weight = 0.5 if update_id % 2 else 1.0
            update = pb.SessionUpdate(
                update_id=update_id, sources=[pb.SourceUpdate(index=1, style_weight=weight)]
            )
            message = pb.SessionRequest(update=update)
            update_bytes.append(float(message.ByteSize()))
            time.sleep(rng.uniform(0, iteration_ms / 1000))
            while not session.incoming.empty():  # the latest iteration seen before sending
                session.next()
            before = graph.meter.totals()
            sent = time.perf_counter()
            session.send(message)
            while True:
                stamp, event, _ = session.until("progress")
                if event.progress.update_id == update_id:
                    to_progress.append((stamp - sent) * 1000)
                    break
            stamp, event, _ = session.until("preview")
            to_preview.append((stamp - sent) * 1000)
            waited.append((stamp - sent) * 1000 / iteration_ms)
            after = graph.meter.totals()
            for kind, total in after.items():
                if not kind.startswith("reconstruct.response"):
                    internal.setdefault(kind, []).append(float(total - before.get(kind, 0)))
    finally:
        session.close()
    peak = peak_rss_mib()
    return {
        "updates": settings.updates,
        "to_progress_ms": spread(to_progress),
        "to_preview_ms": spread(to_preview),
        "to_preview_iterations": spread(waited),
        "session_update_bytes": spread(update_bytes),
        "internal_bytes_per_update": {kind: spread(sizes) for kind, sizes in internal.items()},
        "peak_rss_mib": peak,
    }


def extraction(
    graph: Graph, settings: Settings, width: int, height: int, content: bytes
) -> dict[str, Any]:
    """One forward to the style and content layers: ONNX Runtime vs PyTorch eager."""
    manifest = graph.extractor.manifest
    layers = list(dict.fromkeys(manifest.default_style_layers + manifest.default_content_layers))
    pixels = images.to_canvas(content, width, height)
    batch = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])
    session = graph.extractor.session_for(layers)
    repeats = max(settings.repeats, 5)

    def onnx() -> list[np.ndarray]:
        return list(session.run(layers, {manifest.input_name: batch}))

    net = load_feature_net(graph.model_folder)[0]  # as exported: NCHW, direct convolutions
    nchw = torch.from_numpy(batch)
    channels_last_net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    channels_last = nchw.contiguous(memory_format=torch.channels_last)
    winograd_net = copy.deepcopy(net)
    with_winograd(winograd_net)

    def eager(model: core.FeatureNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return model(x, layers)

    rows = {
        "onnxruntime_cpu_ms": timed_ms(onnx, repeats),
        "torch_nchw_ms": timed_ms(lambda: eager(net, nchw), repeats),
        "torch_channels_last_ms": timed_ms(
            lambda: eager(channels_last_net, channels_last), repeats
        ),
        "torch_winograd_ms": timed_ms(lambda: eager(winograd_net, nchw), repeats),
    }
    reference = dict(zip(layers, onnx(), strict=True))
    agreement = 0.0
    for model, x in ((net, nchw), (channels_last_net, channels_last), (winograd_net, nchw)):
        for name, value in eager(model, x).items():
            ours = value.contiguous().numpy()
            scale = float(np.abs(reference[name]).max()) or 1.0
            agreement = max(agreement, float(np.abs(ours - reference[name]).max()) / scale)
    return {
        **rows,
        "layers": layers,
        "torch_nchw_over_onnxruntime": rows["torch_nchw_ms"]["median"]
        / rows["onnxruntime_cpu_ms"]["median"],
        "torch_channels_last_over_onnxruntime": rows["torch_channels_last_ms"]["median"]
        / rows["onnxruntime_cpu_ms"]["median"],
        "torch_winograd_over_onnxruntime": rows["torch_winograd_ms"]["median"]
        / rows["onnxruntime_cpu_ms"]["median"],
        "max_relative_difference": agreement,
    }


def measure_size(graph: Graph, settings: Settings, size: int) -> dict[str, Any]:
    content, style = (SAMPLES / CONTENT).read_bytes(), (SAMPLES / STYLE).read_bytes()
    rss_before = rss_mib()
    reset = reset_peak_rss()
    # Warm-up: the services see this size once, and the sources land in the features cache.
    run_blend(graph.stub, blend_request(size, 3, settings.preview_every, content, style))
    quiesce()
    iterations = iteration_times(graph, settings, size, content, style)
    previews = first_previews(graph, settings, size, content, style)
    moves = slider(graph, settings, size, content, style, iterations["graph_ms"]["median"])
    width, height = iterations["canvas"]
    features = extraction(graph, settings, width, height, content)
    per_iteration = iterations["progress_bytes"]["median"]
    if iterations["preview_bytes"]["n"]:
        per_iteration += iterations["preview_bytes"]["median"] / settings.preview_every
    return {
        "iteration": iterations,
        "first_preview": previews,
        "slider": moves,
        "features": features,
        "bytes": {
            "per_iteration": per_iteration,
            "progress": iterations["progress_bytes"]["median"],
            "preview": iterations["preview_bytes"]["median"],
            "session_update": moves["session_update_bytes"]["median"],
            "reconstruct_update": moves["internal_bytes_per_update"].get(
                "reconstruct.request.update", spread([])
            )["median"],
            "internal_per_update": sum(
                s["median"] for s in moves["internal_bytes_per_update"].values()
            ),
            "session_start": previews["start_request_bytes"]["median"],
            "reconstruct_job": previews["reconstruct_job_bytes"]["median"],
        },
        "memory": {
            "rss_before_mib": rss_before,
            "peak_rss_mib": peak_rss_mib(),
            "peak_reset_per_phase": reset,
            "peak_graph_blend_mib": iterations["peak_rss_mib"]["graph_blend"],
            "peak_bare_loop_mib": iterations["peak_rss_mib"]["bare_loop"],
            "peak_session_mib": moves["peak_rss_mib"],
            "process_peak_rss_mib": peak_rss_mib(),
        },
    }


# --- the report ----------------------------------------------------------------------------
def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "grpcio": grpc.__version__,
        "protobuf": importlib.metadata.version("protobuf"),
        "numpy": np.__version__,
    }


def run(settings: Settings, out: Path) -> dict[str, Any]:
    """Measure every size and write out/graph.json and out/graph.md; returns the report."""
    from export.onnx_export import ensure_model

    ensure_model(settings.model, settings.model_dir)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as fast_dir:  # no feed-forward networks: not measured
        graph = Graph(settings, Path(fast_dir))
        try:
            sizes = {str(size): measure_size(graph, settings, size) for size in settings.sizes}
            providers = {
                "available": ort.get_available_providers(),
                "features_service": graph.extractor.providers,
                "reconstruction_device": "cpu",
            }
        finally:
            graph.stop()
    report = {
        "machine": machine(),
        "versions": versions(),
        "providers": providers,
        "commit": commit(),
        "threads": {
            "torch": torch.get_num_threads(),
            "onnxruntime_intra_op": settings.threads or "default",
        },
        "settings": {
            "model": settings.model,
            "sizes": list(settings.sizes),
            "repeats": settings.repeats,
            "iterations_per_run": {str(s): settings.iterations_at(s) for s in settings.sizes},
            "updates": settings.updates,
            "preview_every": settings.preview_every,
            "optimizer": "lbfgs",
            "scales": 1,
            "seed": SEED,
            "sources": {"content": CONTENT, "style": STYLE},
        },
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "seconds": time.perf_counter() - started,
        "sizes": sizes,
    }
    write_report(out, "graph", report, markdown(report))
    return report


def _ms(row: dict[str, float], digits: int = 0) -> str:
    return f"{row['median']:.{digits}f} ({row['min']:.{digits}f}–{row['max']:.{digits}f})"


def markdown(report: dict[str, Any]) -> str:
    m, v, s = report["machine"], report["versions"], report["settings"]
    load = report["load_average"]
    lines = [
        "# The service graph on the CPU (`python -m bench.graph`)",
        "",
        f"{m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"torch {v['torch']} on {report['threads']['torch']} threads, "
        f"ONNX Runtime {v['onnxruntime']} ({', '.join(report['providers']['features_service'])}),"
        f" grpcio {v['grpcio']}, commit {report['commit']}. No GPU figures: none was used.",
        "",
        f"{s['model']}, astronaut (content 1) + Starry Night (style 1), L-BFGS, seed {s['seed']}, "
        f"one scale, a preview every {s['preview_every']} iteration(s); {s['repeats']} repeats, "
        "medians with (min–max) in ms unless marked. Load average "
        f"{load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end "
        f"({m['cores']} cores); the run took {report['seconds']:.0f} s.",
        "",
        "## Time per iteration",
        "",
        "| size | graph (Blend) | bare loop (core.reconstruct) | graph / bare | "
        "service it/s | final loss graph / bare |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = report["sizes"]
    for size, row in rows.items():
        it = row["iteration"]
        lines.append(
            f"| {size} px | {_ms(it['graph_ms'])} | {_ms(it['bare_ms'])} | {it['ratio']:.3f} | "
            f"{it['service_iterations_per_second']['median']:.2f} | "
            f"{it['final_loss']['graph']:.4g} / {it['final_loss']['bare']:.4g} |"
        )
    lines += [
        "",
        "## First preview and slider",
        "",
        "| size | first preview, cold sources | first preview, cached | "
        "update → its first progress | update → next preview | in iterations |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for size, row in rows.items():
        fp, sl = row["first_preview"], row["slider"]
        lines.append(
            f"| {size} px | {_ms(fp['cold_ms'])} | {_ms(fp['cached_ms'])} | "
            f"{_ms(sl['to_progress_ms'])} | {_ms(sl['to_preview_ms'])} | "
            f"{_ms(sl['to_preview_iterations'], 1)} |"
        )
    lines += [
        "",
        "## Feature extraction (style and content layers, one forward)",
        "",
        "| size | ONNX Runtime CPU | PyTorch NCHW | PyTorch channels_last | PyTorch Winograd | "
        "NCHW / ORT | channels_last / ORT | Winograd / ORT | max rel. difference |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, row in rows.items():
        f = row["features"]
        lines.append(
            f"| {size} px | {_ms(f['onnxruntime_cpu_ms'])} | {_ms(f['torch_nchw_ms'])} | "
            f"{_ms(f['torch_channels_last_ms'])} | {_ms(f['torch_winograd_ms'])} | "
            f"{f['torch_nchw_over_onnxruntime']:.2f} | "
            f"{f['torch_channels_last_over_onnxruntime']:.2f} | "
            f"{f['torch_winograd_over_onnxruntime']:.2f} | "
            f"{f['max_relative_difference']:.1e} |"
        )
    lines += [
        "",
        "## Bytes (protobuf ByteSize) and memory",
        "",
        "| size | progress | preview | per iteration | SessionUpdate | ReconstructUpdate | "
        "internal per update | ReconstructJob | peak RSS: graph / bare / session (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, row in rows.items():
        b, mem = row["bytes"], row["memory"]
        lines.append(
            f"| {size} px | {b['progress']:.0f} B | {_kib(b['preview'])} | "
            f"{_kib(b['per_iteration'])} | {b['session_update']:.0f} B | "
            f"{_kib(b['reconstruct_update'])} | {_kib(b['internal_per_update'])} | "
            f"{_kib(b['reconstruct_job'])} | {mem['peak_graph_blend_mib']:.0f} / "
            f"{mem['peak_bare_loop_mib']:.0f} / {mem['peak_session_mib']:.0f} |"
        )
    reset = all(row["memory"]["peak_reset_per_phase"] for row in rows.values())
    lines += [
        "",
        "Peak RSS is this whole process (the four services, the client and the bare loop share "
        + (
            "it), reset before each phase."
            if reset
            else "it); the peak could not be reset, so it is the process's peak so far."
        ),
        "",
    ]
    return "\n".join(lines)


def _kib(value: float) -> str:
    if value != value:  # NaN: nothing measured
        return "–"
    return f"{value / 1024:.1f} KiB" if value < MiB else f"{value / MiB:.2f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--iterations", type=int, default=0, help="iterations per timed run (default by size)"
    )
    parser.add_argument("--updates", type=int, default=5, help="slider moves per size")
    parser.add_argument("--preview-every", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch and ONNX Runtime threads"
    )
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="vgg19")
    args = parser.parse_args()
    settings = Settings(
        sizes=tuple(args.sizes),
        repeats=args.repeats,
        iterations={size: args.iterations for size in args.sizes} if args.iterations else {},
        updates=args.updates,
        preview_every=args.preview_every,
        threads=args.threads,
        model_dir=args.model_dir,
        model=args.model,
    )
    run(settings, args.out)
    print((args.out / "graph.md").read_text())
    print(f"report: {args.out / 'graph.md'}, {args.out / 'graph.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
