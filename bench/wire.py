"""The bytes the graph's processes send each other, counted on the wire (issue 13).

    python -m bench.wire --out out/bench [--sizes 256 512] [--root PATH] [--name wire]

The four services run as real processes (`python -m services NAME`, configured by STYLEBLEND_*
variables as tests/reliability/processes.py starts them) from the checkout at `--root` (default:
this one), so the same script measures the code before and after a change. Every connection a
process makes to another goes through a byte-counting TCP proxy of its own: one per (caller,
service) pair, and one between this client and the gateway. The proxies parse nothing, so they
count what the sockets carried, gRPC's frames, headers and window updates included. The
gateway's three are its upstream bytes (what issue 13 is about); the ones the other services
use are the service-to-service bytes (blending fetching from features, reconstruction from
blending, once the services pass references instead of tensors).

Per size, after one run of the scenario to warm the services and the feature cache: the
astronaut (content 1), Starry Night (style 0.7) and The Scream (style 0.3), L-BFGS, one scale,
a fixed number of iterations and of previews.

(a) a Session with no updates, to its result: bytes on every link, and the bytes of the
    images the client received (previews and the result, whose PNG gains the recipe at the
    gateway), which any design has to carry;
(b) the same Session with three slider moves (Starry Night's style weight), each sent as soon
    as a fixed iteration's Progress arrives, so the run keeps its length and previews:
    (b − a) / 3 is the bytes of one slider move on each link;
(c) from (b): each move until the first Progress carrying its update_id, and until the preview
    after that; medians of the three.

Last, the processes' resident memory (VmRSS) idle, and its peak while several Sessions run at
once (sampled from /proc every 50 ms; the gateway's VmHWM too, reset first). Writes
`name`.json and `name`.md under --out; the benchmark asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from styleblend.v1 import styleblend_pb2 as pb
from styleblend.v1 import styleblend_pb2_grpc
from tqdm import tqdm

from bench.numbers import cpu_model, spread
from bench.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "clients" / "samples"  # the inputs are this checkout's, whatever --root is
CONTENT = "content/astronaut.jpg"
STYLES = (("style/starry_night.jpg", 0.7), ("style/the_scream.jpg", 0.3))
MOVES = (0.4, 0.9, 0.6)  # Starry Night's style weight after each slider move
SEED = 7
MiB = 1024 * 1024
SERVICES = ("features", "blending", "reconstruction", "gateway")
INTERNAL = SERVICES[:3]
CLIENT = "client"
START_TIMEOUT_S = 180.0  # PyTorch and the model load slowly on a busy 2-core machine
CHUNK = 256 * 1024


# --- the proxies ---------------------------------------------------------------------------
@dataclass
class Flow:
    """One connection through a proxy: the bytes forwarded each way."""

    sent: int = 0  # caller → service
    received: int = 0  # service → caller
    open: bool = True


class Proxy:
    """Listens on a loopback port and forwards each connection to `target`, counting bytes."""

    def __init__(self, name: str, target: tuple[str, int], lock: threading.Lock) -> None:
        self.name = name
        self.target = target
        self.port = 0
        self._lock = lock
        self._flows: list[Flow] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def flows(self) -> list[Flow]:
        """A copy of every connection so far, open or closed, in the order they came."""
        with self._lock:
            return [Flow(f.sent, f.received, f.open) for f in self._flows]

    def totals(self) -> tuple[int, int]:
        """(sent, received) over every connection so far."""
        with self._lock:
            return sum(f.sent for f in self._flows), sum(f.received for f in self._flows)

    async def listen(self) -> None:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        flow = Flow()
        with self._lock:
            self._flows.append(flow)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:  # nothing listens there (yet): the caller sees a closed connection
                writer.close()
                return
            ends = (writer, up_writer)
            try:
                await asyncio.gather(
                    self._pipe(reader, up_writer, ends, flow, sent=True),
                    self._pipe(up_reader, writer, ends, flow, sent=False),
                )
            finally:
                for end in ends:
                    end.close()
        finally:
            with self._lock:
                flow.open = False
            if task is not None:
                self._tasks.discard(task)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ends: tuple[asyncio.StreamWriter, ...],
        flow: Flow,
        sent: bool,
    ) -> None:
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()  # counted once handed to the kernel, not when read
                with self._lock:
                    if sent:
                        flow.sent += len(data)
                    else:
                        flow.received += len(data)
            if writer.can_write_eof():
                writer.write_eof()  # a half-close passes through: the other way may go on
        except (ConnectionError, OSError):
            for end in ends:  # one side broke: end the other way too, or it waits forever
                end.transport.abort()


class Proxies:
    """Byte-counting TCP forwarders, all on one asyncio loop in a thread of their own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="wire-proxies"
        )
        self._thread.start()
        self.by_name: dict[str, Proxy] = {}

    def add(self, name: str, target: str) -> Proxy:
        host, port = target.rsplit(":", 1)
        proxy = Proxy(name, (host, int(port)), self._lock)
        asyncio.run_coroutine_threadsafe(proxy.listen(), self._loop).result(timeout=10)
        self.by_name[name] = proxy
        return proxy

    def totals(self) -> dict[str, tuple[int, int]]:
        return {name: proxy.totals() for name, proxy in self.by_name.items()}

    def close(self) -> None:
        """Stop listening, end every connection still open, and end the loop's thread."""
        if self._loop.is_closed():
            return

        async def close_all() -> None:
            await asyncio.gather(*(proxy.close() for proxy in self.by_name.values()))

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> Proxies:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# --- the graph as processes ----------------------------------------------------------------
def link(caller: str, service: str) -> str:
    return f"{caller}→{service}"


def proc_status_kib(pid: int, *keys: str) -> dict[str, int]:
    """Fields of /proc/PID/status in KiB (VmRSS, VmHWM), as the kernel counts them."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in keys:
            found[name] = int(value.split()[0])
    return found


def health_serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def stubs_path(root: Path) -> Path:
    """The generated stubs the processes import: the checkout's own `gen/` (its protos may not
    be this checkout's), else this checkout's."""
    return root / "gen" if (root / "gen" / "styleblend").is_dir() else ROOT / "gen"


@dataclass
class Graph:
    """The four services of the checkout at `root`, each caller's upstreams behind a proxy.

    Every process gets every internal service's address (STYLEBLEND_*_ADDRESS), each pointing
    at the proxy for that (caller, service) pair: a process that calls nobody ignores them
    (the settings classes have extra="ignore"), one that does is counted on its own link."""

    root: Path
    model_dir: Path
    log_dir: Path
    proxies: Proxies
    settings: dict[str, str] = field(default_factory=dict)  # STYLEBLEND_* for every process
    gateway_settings: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=lambda: {n: free_port() for n in SERVICES})
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def __post_init__(self) -> None:
        for caller in SERVICES:
            for service in INTERNAL:
                if service != caller:
                    self.proxies.add(link(caller, service), f"127.0.0.1:{self.ports[service]}")
        self.proxies.add(link(CLIENT, "gateway"), f"127.0.0.1:{self.ports['gateway']}")
        self._channel: grpc.Channel | None = None

    def env(self, name: str) -> dict[str, str]:
        gen = stubs_path(self.root)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(self.root), str(gen)]),
            # glibc's per-thread arenas keep freed pages, so RSS would count more than is held
            # (README, Reliability); the graph's processes run with two, as the tests' do.
            "MALLOC_ARENA_MAX": "2",
            "STYLEBLEND_HOST": "127.0.0.1",
            "STYLEBLEND_HTTP_PORT": "0",
            "STYLEBLEND_INTERNAL_TOKEN": self.token,
            "STYLEBLEND_MODEL": "vgg19",
            "STYLEBLEND_MODEL_DIR": str(self.model_dir.resolve()),
            "STYLEBLEND_DEVICE": "cpu",
            "STYLEBLEND_PROVIDERS": "CPUExecutionProvider",
            "STYLEBLEND_LOG_FORMAT": "text",
            "STYLEBLEND_GRACE_S": "1",  # nothing is in flight at the end: no need to wait 5 s
        }
        for service in SERVICES:
            env[f"STYLEBLEND_{service.upper()}_PORT"] = str(self.ports[service])
        for service in INTERNAL:
            if service != name:
                address = self.proxies.by_name[link(name, service)].address
                env[f"STYLEBLEND_{service.upper()}_ADDRESS"] = address
        env.update(self.settings)
        if name == "gateway":
            env.update(self.gateway_settings)
        return env

    def start(self) -> float:
        """Start every process; the seconds until all four answer their health checks."""
        started = time.monotonic()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in SERVICES:
            with open(self.log_dir / f"{name}.log", "ab") as log:
                self.processes[name] = subprocess.Popen(
                    [sys.executable, "-m", "services", name],
                    cwd=self.root,
                    env=self.env(name),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        for name in SERVICES:  # health straight at the port: the checks are not counted
            while not health_serving(self.ports[name]):
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"{name} exited; log:\n{self.log_tail(name)}")
                if time.monotonic() - started > START_TIMEOUT_S:
                    raise TimeoutError(f"{name} not healthy; log:\n{self.log_tail(name)}")
                time.sleep(0.2)
        return time.monotonic() - started

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_tail(self, name: str, lines: int = 30) -> str:
        text = (self.log_dir / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stub(self) -> styleblend_pb2_grpc.StyleBlendStub:
        """The public API, through the client's own proxy."""
        if self._channel is None:
            address = self.proxies.by_name[link(CLIENT, "gateway")].address
            options = [("grpc.max_receive_message_length", 64 * MiB)]
            self._channel = grpc.insecure_channel(address, options=options)
        return styleblend_pb2_grpc.StyleBlendStub(self._channel)

    def rss_kib(self) -> dict[str, int]:
        for name, process in self.processes.items():
            if process.poll() is not None:  # a zombie has no VmRSS: say which one and why
                raise RuntimeError(
                    f"{name} exited with {process.returncode}; log:\n{self.log_tail(name)}"
                )
        return {
            name: proc_status_kib(process.pid, "VmRSS")["VmRSS"]
            for name, process in self.processes.items()
        }


def settle(proxies: Proxies, quiet_s: float = 0.5, timeout_s: float = 15.0) -> None:
    """Wait until no proxy has moved a byte for `quiet_s`: a stream's last frames (trailers,
    the reconstruction's end) can trail the client's last event."""
    last, since, started = proxies.totals(), time.monotonic(), time.monotonic()
    while time.monotonic() - started < timeout_s:
        time.sleep(0.1)
        now = proxies.totals()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


# --- sessions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    at: float  # time.perf_counter() on arrival
    kind: str
    iteration: int
    update_id: int  # Progress's: the last update in effect
    image_bytes: int  # Preview's or Result's encoded image
    recipe_bytes: int = 0  # Result's recipe_json, which the gateway also writes into its PNG


def event_of(response: pb.SessionResponse) -> Event:
    event = response.event
    kind = event.WhichOneof("event") or "empty"
    iteration = update_id = image = recipe = 0
    if kind == "progress":
        iteration, update_id = event.progress.iteration, event.progress.update_id
    elif kind == "preview":
        iteration, image = event.preview.iteration, len(event.preview.image)
    elif kind == "result":
        iteration, image = event.result.stats.iterations, len(event.result.image)
        recipe = len(event.result.recipe_json.encode())
    return Event(time.perf_counter(), kind, iteration, update_id, image, recipe)


class Session:
    """A Session call whose messages can be queued from any thread; iterate it for events."""

    def __init__(self, stub: styleblend_pb2_grpc.StyleBlendStub, start: pb.BlendRequest) -> None:
        self._outgoing: queue.Queue[pb.SessionRequest | None] = queue.Queue()
        self._outgoing.put(pb.SessionRequest(start=start))
        self.call = stub.Session(iter(self._outgoing.get, None), timeout=3600)

    def send(self, message: pb.SessionRequest) -> None:
        self._outgoing.put(message)

    def __iter__(self) -> Iterator[Event]:
        try:
            for response in self.call:
                yield event_of(response)
        finally:
            self._outgoing.put(None)


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...] = (256, 512)
    iterations: int = 24
    preview_every: int = 6
    sessions: int = 8  # running at once, for the memory
    sessions_size: int = 256
    sessions_iterations: int = 3  # each of them gets at least this far before all finish

    def move_after(self) -> dict[int, int]:
        """Iteration → update_id: each move half a preview period before a preview, so the
        preview after it can show it, and all three well inside the run."""
        every, half = self.preview_every, self.preview_every // 2
        return {k * every - half: k for k in range(1, len(MOVES) + 1)}


def start_request(settings: Settings, size: int, iterations: int) -> pb.BlendRequest:
    sources = [pb.Source(data=(SAMPLES / CONTENT).read_bytes(), style_weight=0, content_weight=1)]
    for name, weight in STYLES:
        data = (SAMPLES / name).read_bytes()
        sources.append(pb.Source(data=data, style_weight=weight, content_weight=0))
    return pb.BlendRequest(
        sources=sources,
        max_side_px=size,
        iterations=iterations,
        optimizer=pb.OPTIMIZER_LBFGS,
        seed=SEED,
        preview_every=settings.preview_every,
        scales=1,  # every iteration at the named size: the runs compare like for like
    )


def move(update_id: int) -> pb.SessionRequest:
    weight = MOVES[update_id - 1]
    update = pb.SessionUpdate(
        update_id=update_id, sources=[pb.SourceUpdate(index=1, style_weight=weight)]
    )
    return pb.SessionRequest(update=update)


@dataclass
class Run:
    events: list[Event]
    sent: dict[int, tuple[float, int]]  # update_id → (time sent, iteration it followed)
    seconds: float

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    @property
    def image_bytes(self) -> int:
        return sum(e.image_bytes for e in self.events)

    @property
    def recipe_bytes(self) -> int:
        return sum(e.recipe_bytes for e in self.events)


def run_session(
    stub: styleblend_pb2_grpc.StyleBlendStub, start: pb.BlendRequest, moves: dict[int, int]
) -> Run:
    """One Session to its result; update `moves[i]` goes out once Progress `i` has arrived."""
    session = Session(stub, start)
    events: list[Event] = []
    sent: dict[int, tuple[float, int]] = {}
    started = time.perf_counter()
    for event in session:
        events.append(event)
        if event.kind == "progress" and event.iteration in moves:
            update_id = moves[event.iteration]
            sent[update_id] = (time.perf_counter(), event.iteration)
            session.send(move(update_id))
    return Run(events, sent, time.perf_counter() - started)


def latency(run: Run) -> dict[str, Any]:
    """Each move until the first Progress that carries it, and until the preview after that."""
    rows = []
    for update_id, (sent_at, after) in sorted(run.sent.items()):
        later = [e for e in run.events if e.at >= sent_at]
        carried = next(
            (e for e in later if e.kind == "progress" and e.update_id == update_id), None
        )
        preview = None
        if carried is not None:
            preview = next(
                (e for e in later if e.kind in ("preview", "result") and e.at >= carried.at), None
            )
        rows.append(
            {
                "update_id": update_id,
                "sent_after_iteration": after,
                "first_carried_at_iteration": carried.iteration if carried else None,
                "preview_iteration": preview.iteration if preview else None,
                "to_progress_ms": (carried.at - sent_at) * 1000 if carried else None,
                "to_preview_ms": (preview.at - sent_at) * 1000 if preview else None,
            }
        )
    return {
        "moves": rows,
        "to_progress_ms": spread([r["to_progress_ms"] for r in rows if r["to_progress_ms"]]),
        "to_preview_ms": spread([r["to_preview_ms"] for r in rows if r["to_preview_ms"]]),
    }


# --- bytes ---------------------------------------------------------------------------------
def wire_delta(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, dict[str, int]]:
    """Bytes on each link between two snapshots: sent (caller → service) and received."""
    delta = {}
    for name, (sent, received) in after.items():
        was_sent, was_received = before.get(name, (0, 0))
        delta[name] = {"sent": sent - was_sent, "received": received - was_received}
    return delta


def caller_of(name: str) -> str:
    return name.split("→")[0]


def grouped(links: dict[str, dict[str, int]]) -> dict[str, int]:
    """The totals the report compares: the gateway's upstream links, the other services' links
    to each other, and the client's own link to the gateway (each both ways)."""
    totals = {"gateway_upstream": 0, "service_to_service": 0, "client": 0}
    for name, row in links.items():
        caller = caller_of(name)
        group = (
            "gateway_upstream"
            if caller == "gateway"
            else "client"
            if caller == CLIENT
            else "service_to_service"
        )
        totals[group] += row["sent"] + row["received"]
    return totals


def measured_session(graph: Graph, start: pb.BlendRequest, moves: dict[int, int]) -> dict[str, Any]:
    """One run of the scenario, with the bytes it put on every link."""
    settle(graph.proxies)
    before = graph.proxies.totals()
    run = run_session(graph.stub(), start, moves)
    settle(graph.proxies)
    links = wire_delta(before, graph.proxies.totals())
    totals = grouped(links)
    return {
        "run": run,
        "links": links,
        **totals,
        "image_bytes": run.image_bytes,
        "recipe_bytes": run.recipe_bytes,
        # What is not the pictures. The gateway writes the recipe into the result's PNG, so
        # upstream the result was smaller by the recipe and a fixed chunk header: the recipe
        # is added back, the header cancels between two runs.
        "beyond_images": {
            "gateway_upstream": totals["gateway_upstream"] - run.image_bytes + run.recipe_bytes,
            "service_to_service": totals["service_to_service"],
            "client": totals["client"] - run.image_bytes,
        },
        "previews": len(run.of("preview")),
        "iterations": len(run.of("progress")),
        "results": len(run.of("result")),
        "seconds": run.seconds,
    }


def measure_size(
    graph: Graph, settings: Settings, size: int, step: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    start = start_request(settings, size, settings.iterations)
    moves = settings.move_after()
    step(f"{size} px: warm-up")
    run_session(graph.stub(), start, {})  # the shapes, and the sources in the feature cache
    step(f"{size} px: (a) no updates")
    plain = measured_session(graph, start, {})
    step(f"{size} px: (b) {len(MOVES)} updates")
    moved = measured_session(graph, start, moves)
    same = all(plain[key] == moved[key] for key in ("iterations", "previews", "results"))
    groups = ("gateway_upstream", "service_to_service", "client")
    per_update = {group: (moved[group] - plain[group]) / len(MOVES) for group in groups}
    # The moves change the pictures, and so their JPEGs' sizes (by kilobytes at 512 px, either
    # way): beside (b − a) / 3, the same difference without the images.
    per_update_beyond = {
        group: (moved["beyond_images"][group] - plain["beyond_images"][group]) / len(MOVES)
        for group in groups
    }
    per_link = {
        name: {
            way: (moved["links"][name][way] - row[way]) / len(MOVES) for way in ("sent", "received")
        }
        for name, row in plain["links"].items()
    }
    moves_latency = latency(moved.pop("run"))
    plain.pop("run")
    return {
        "no_updates": plain,
        "updates": moved,
        "same_run_shape": same,
        "upstream_minus_images": plain["gateway_upstream"] - plain["image_bytes"],
        "per_update": per_update,
        "per_update_beyond_images": per_update_beyond,
        "per_update_links": per_link,
        "latency": moves_latency,
    }


# --- memory --------------------------------------------------------------------------------
class Sampler:
    """The highest VmRSS of each process, read every `period_s` on a thread of its own."""

    def __init__(self, graph: Graph, period_s: float = 0.05) -> None:
        self._graph, self._period = graph, period_s
        self.peak: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="wire-rss")

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, kib in self._graph.rss_kib().items():
                self.peak[name] = max(self.peak.get(name, 0), kib)
            self.samples += 1
            self._stop.wait(self._period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def reset_hwm(pid: int) -> bool:
    """VmHWM back to the current RSS (Linux, our own child); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def concurrent_memory(graph: Graph, settings: Settings) -> dict[str, Any]:
    """`settings.sessions` Sessions at once, each long enough that all of them run together
    past `sessions_iterations`; then every one is finished and its result read."""
    count, reach = settings.sessions, settings.sessions_iterations
    start = start_request(settings, settings.sessions_size, 1000)  # ended by `finish`
    gateway = graph.processes["gateway"].pid
    reset = reset_hwm(gateway)
    sessions = [Session(graph.stub(), start) for _ in range(count)]
    reached = [threading.Event() for _ in sessions]
    first_progress: list[float | None] = [None] * count
    ended: list[float | None] = [None] * count
    results = [0] * count

    def follow(index: int) -> None:
        for event in sessions[index]:
            if event.kind == "progress":
                first_progress[index] = first_progress[index] or event.at
                if event.iteration >= reach:
                    reached[index].set()
            elif event.kind == "result":
                results[index] += 1
        ended[index] = time.perf_counter()
        reached[index].set()  # ended early (an error): do not wait for it

    began = time.perf_counter()
    with Sampler(graph) as sampler:
        threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(count)]
        for thread in threads:
            thread.start()
        for event in reached:
            event.wait(timeout=1800)
        all_running_s = time.perf_counter() - began
        for session in sessions:
            session.send(pb.SessionRequest(finish=pb.FinishSession()))
        for thread in threads:
            thread.join(timeout=600)
    hwm = proc_status_kib(gateway, "VmHWM").get("VmHWM", 0)
    starts = [t for t in first_progress if t is not None]
    ends = [t for t in ended if t is not None]
    return {
        "sessions": count,
        "size": settings.sessions_size,
        "iterations_each_at_least": reach,
        "results": sum(results),
        # Every one had made progress before the first one ended: they ran at once.
        "all_overlapped": len(starts) == count and bool(ends) and max(starts) < min(ends),
        "seconds_until_all_reached": all_running_s,
        "seconds": time.perf_counter() - began,
        "peak_rss_kib": sampler.peak,
        "samples": sampler.samples,
        "gateway_hwm_kib": hwm if reset else None,
    }


# --- the report ----------------------------------------------------------------------------
def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def commit(root: Path) -> str:
    try:
        head = git(root, "rev-parse", "--short", "HEAD")
        dirty = git(root, "status", "--porcelain", "--untracked-files=no")
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(
    settings: Settings, root: Path, model_dir: Path, out: Path, name: str = "wire"
) -> dict[str, Any]:
    """Start the graph of `root`, measure, stop it; writes `name`.json and `name`.md."""
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    began = time.perf_counter()
    steps = 2 + 3 * len(settings.sizes)
    with (
        Proxies() as proxies,
        tempfile.TemporaryDirectory() as no_fast_models,  # none: the iterative path only
        tqdm(total=steps, desc="bench.wire", unit="step") as bar,
    ):
        graph = Graph(
            root=root.resolve(),
            model_dir=model_dir,
            log_dir=out / f"{name}-logs",
            proxies=proxies,
            settings={"STYLEBLEND_FAST_MODEL_DIR": no_fast_models},
            # One client opens all of the concurrent sessions: let it (the default is 4).
            gateway_settings={"STYLEBLEND_MAX_SESSIONS_PER_CLIENT": str(max(4, settings.sessions))},
        )

        def step(what: str) -> None:
            bar.set_postfix_str(what)
            bar.update()

        try:
            bar.set_postfix_str("starting the services")
            startup_s = graph.start()
            settle(proxies)
            idle_start = graph.rss_kib()
            step("started")
            sizes = {
                str(size): measure_size(graph, settings, size, step) for size in settings.sizes
            }
            settle(proxies)
            idle = graph.rss_kib()
            memory = concurrent_memory(graph, settings) if settings.sessions else {}
            step("concurrent sessions")
        except BaseException:
            for service in SERVICES:
                if service in graph.processes:
                    print(f"--- {service} log ---\n{graph.log_tail(service)}", file=sys.stderr)
            raise
        finally:
            graph.stop()
    report = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
        },
        "root": str(root.resolve()),
        "commit": commit(root),
        "stubs": str(stubs_path(root.resolve())),
        "settings": {
            "sizes": list(settings.sizes),
            "iterations": settings.iterations,
            "preview_every": settings.preview_every,
            "moves_after_iterations": sorted(settings.move_after()),
            "style_weights": [weight for _, weight in STYLES],
            "moves": list(MOVES),
            "sources": {"content": CONTENT, "styles": [name for name, _ in STYLES]},
            "optimizer": "lbfgs",
            "scales": 1,
            "seed": SEED,
            "sessions": settings.sessions,
            "sessions_size": settings.sessions_size,
            "sessions_iterations": settings.sessions_iterations,
        },
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "startup_seconds": startup_s,
        "seconds": time.perf_counter() - began,
        "sizes": sizes,
        "memory": {"idle_after_start_kib": idle_start, "idle_kib": idle, "concurrent": memory},
    }
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    return report


def size_text(value: float) -> str:
    """Bytes as a person reads them; exact below 10 KiB."""
    if value != value:  # NaN
        return "–"
    if abs(value) < 10 * 1024:
        return f"{value:.0f} B"
    if abs(value) < MiB:
        return f"{value / 1024:.1f} KiB"
    return f"{value / MiB:.2f} MiB"


def _ms(row: dict[str, float]) -> str:
    if not row["n"]:
        return "–"
    return f"{row['median']:.0f} ({row['min']:.0f}–{row['max']:.0f})"


def markdown(report: dict[str, Any]) -> str:
    m, s, load = report["machine"], report["settings"], report["load_average"]
    styles = " and ".join(
        f"{Path(n).stem} (style {w})"
        for n, w in zip(s["sources"]["styles"], s["style_weights"], strict=True)
    )
    lines = [
        "# Bytes between the graph's processes (`python -m bench.wire`)",
        "",
        f"{m['cpu']}, {m['cores']} cores, grpcio {m['grpcio']}; services from {report['root']} "
        f"at commit {report['commit']}. Load average {load['start'][0]:.2f} at the start, "
        f"{load['end'][0]:.2f} at the end; the services took {report['startup_seconds']:.0f} s "
        f"to start and the run {report['seconds']:.0f} s.",
        "",
        f"{Path(s['sources']['content']).stem} (content 1), {styles}; L-BFGS, one scale, "
        f"{s['iterations']} iterations, a preview every {s['preview_every']}; after a warm-up "
        f"run. (b) moves {Path(s['sources']['styles'][0]).stem}'s style weight to "
        f"{', '.join(map(str, s['moves']))}, each sent when the Progress of iteration "
        f"{', '.join(map(str, s['moves_after_iterations']))} arrives. Bytes are TCP payload "
        "both ways, counted by a proxy on each link: gRPC framing included.",
        "",
        "## A session: (a) no updates, (b) three slider moves",
        "",
        "| size | gateway upstream (a) | images to the client (a) | upstream − images (a) | "
        "service-to-service (a) | client ↔ gateway (a) | gateway upstream (b) | "
        "iterations, previews (a / b) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, row in report["sizes"].items():
        a, b = row["no_updates"], row["updates"]
        shape = f"{a['iterations']}, {a['previews']} / {b['iterations']}, {b['previews']}"
        if not row["same_run_shape"]:
            shape += " (differ!)"
        lines.append(
            f"| {size} px | {size_text(a['gateway_upstream'])} | {size_text(a['image_bytes'])} | "
            f"{size_text(row['upstream_minus_images'])} | "
            f"{size_text(a['service_to_service'])} | {size_text(a['client'])} | "
            f"{size_text(b['gateway_upstream'])} | {shape} |"
        )
    lines += [
        "",
        "## One slider move: (b − a) / 3",
        "",
        "A move changes the pictures and so their JPEGs' sizes, either way; *beyond the images* "
        "leaves them out (the client's images; upstream, less the recipe the gateway writes "
        "into the result's PNG).",
        "",
        "| size | gateway upstream | gateway upstream, beyond the images | service-to-service | "
        "client ↔ gateway, beyond the images |",
        "| --- | --- | --- | --- | --- |",
    ]
    for size, row in report["sizes"].items():
        per, beyond = row["per_update"], row["per_update_beyond_images"]
        lines.append(
            f"| {size} px | **{size_text(per['gateway_upstream'])}** | "
            f"{size_text(beyond['gateway_upstream'])} | "
            f"{size_text(per['service_to_service'])} | {size_text(beyond['client'])} |"
        )
    lines += [
        "",
        "## Each link (caller → service: bytes sent / received)",
        "",
        "| size | link | session (a) | per slider move |",
        "| --- | --- | --- | --- |",
    ]
    for size, row in report["sizes"].items():
        for name, a in row["no_updates"]["links"].items():
            per = row["per_update_links"][name]
            b = row["updates"]["links"][name]
            if not (a["sent"] or a["received"] or b["sent"] or b["received"]):
                continue  # a pair that never talks
            lines.append(
                f"| {size} px | {name} | {size_text(a['sent'])} / {size_text(a['received'])} | "
                f"{size_text(per['sent'])} / {size_text(per['received'])} |"
            )
    lines += [
        "",
        "## Slider to preview (ms, median (min–max) of the moves)",
        "",
        "| size | move → its first progress | move → the preview after it | "
        "iterations: sent after → first carried at → preview |",
        "| --- | --- | --- | --- |",
    ]
    for size, row in report["sizes"].items():
        lat = row["latency"]
        path = ", ".join(
            f"{r['sent_after_iteration']} → {r['first_carried_at_iteration']} → "
            f"{r['preview_iteration']}"
            for r in lat["moves"]
        )
        lines.append(
            f"| {size} px | {_ms(lat['to_progress_ms'])} | {_ms(lat['to_preview_ms'])} | {path} |"
        )
    memory = report["memory"]
    concurrent = memory["concurrent"]
    lines += ["", "## Resident memory (VmRSS, MiB)", ""]
    if concurrent:
        lines += [
            f"Peak: {concurrent['sessions']} Sessions at once at {concurrent['size']} px, each "
            f"past iteration {concurrent['iterations_each_at_least']} before all were finished "
            f"({concurrent['results']} results; all overlapped: {concurrent['all_overlapped']}; "
            f"{concurrent['samples']} samples over {concurrent['seconds']:.0f} s).",
            "",
        ]
    lines += [
        "| process | idle after start | idle after the sessions | peak, sessions at once |",
        "| --- | --- | --- | --- |",
    ]
    for service in SERVICES:
        peak = concurrent.get("peak_rss_kib", {}).get(service) if concurrent else None
        lines.append(
            f"| {service} | {memory['idle_after_start_kib'][service] / 1024:.0f} | "
            f"{memory['idle_kib'][service] / 1024:.0f} | "
            + (f"{peak / 1024:.0f}" if peak else "–")
            + " |"
        )
    if concurrent and concurrent["gateway_hwm_kib"]:
        lines += [
            "",
            f"The gateway's VmHWM over the concurrent sessions (reset before them): "
            f"{concurrent['gateway_hwm_kib'] / 1024:.0f} MiB.",
        ]
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument("--name", default="wire", help="the report's file name, without .md")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="the checkout whose services run (its gen/ too)"
    )
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--iterations", type=int, default=24)
    parser.add_argument("--preview-every", type=int, default=6)
    parser.add_argument("--sessions", type=int, default=8, help="at once, for memory; 0: none")
    parser.add_argument("--sessions-size", type=int, default=256)
    args = parser.parse_args()
    settings = Settings(
        sizes=tuple(args.sizes),
        iterations=args.iterations,
        preview_every=args.preview_every,
        sessions=args.sessions,
        sessions_size=args.sessions_size,
    )
    if max(settings.move_after()) >= settings.iterations:
        parser.error("--iterations must leave room for three moves: > 3 × --preview-every")
    run(settings, args.root, args.model_dir, args.out, args.name)
    print((args.out / f"{args.name}.md").read_text())
    print(f"report: {args.out / (args.name + '.md')}, {args.out / (args.name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
