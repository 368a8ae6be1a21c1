"""A bounded load on the process graph: concurrent sessions for a while, then short ones in a row.

Each session starts a small blend, moves a slider after its first iteration and reads to the
result. Every call's status code is counted; latencies are the time to the first event and to
the end. Memory and threads of every process are read before and after, once they settle.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from styleblend.v1 import styleblend_pb2 as pb

from tests.reliability.client import Outcome, SessionCall, small_blend
from tests.reliability.processes import SERVICES, MiB, ProcessGraph
from tests.reliability.report import percentiles

CLIENT_KEY = "x-styleblend-client"  # on loopback, a client may name itself (session limits)


@dataclass(frozen=True)
class LoadShape:
    concurrent: int
    duration_s: float
    sequential: int
    side_px: int
    iterations: int
    settle_s: float = 3.0  # before memory is read: finished sessions' threads end


@dataclass
class Tally:
    codes: Counter[str] = field(default_factory=Counter)
    refusals: list[str] = field(default_factory=list)  # RESOURCE_EXHAUSTED details
    other_errors: list[str] = field(default_factory=list)
    first_event_s: list[float] = field(default_factory=list)
    session_s: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.codes[outcome.code.name] += 1
            if outcome.code == grpc.StatusCode.OK:
                if outcome.result is None:
                    self.other_errors.append("a stream ended OK without a result")
                if outcome.first_event_s is not None:
                    self.first_event_s.append(outcome.first_event_s)
                self.session_s.append(outcome.seconds)
            elif outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.refusals.append(outcome.details)
            else:
                self.other_errors.append(f"{outcome.code.name}: {outcome.details}")

    def summary(self, wall_s: float) -> dict[str, Any]:
        return {
            "sessions": sum(self.codes.values()),
            "sessions_per_s": round(len(self.session_s) / wall_s, 2) if wall_s else 0.0,
            "codes": dict(self.codes),
            "first_event": percentiles(self.first_event_s),
            "session": percentiles(self.session_s),
        }


def one_session(processes: ProcessGraph, shape: LoadShape, client: str, seed: int) -> Outcome:
    request = small_blend(shape.iterations, shape.side_px, seed=seed, preview_every=2)
    session = SessionCall(
        processes.stub(), request, timeout_s=120, metadata=((CLIENT_KEY, client),)
    )
    moved = False
    for event in session.events():
        if not moved and event.HasField("progress"):
            move = pb.SourceUpdate(index=1, style_weight=0.5)
            session.send(pb.SessionRequest(update=pb.SessionUpdate(update_id=1, sources=[move])))
            moved = True
    return session.outcome


def resources(processes: ProcessGraph) -> dict[str, dict[str, float]]:
    return {
        name: {
            "rss_mib": round(processes.rss(name) / MiB, 1),
            "threads": processes.threads(name),
        }
        for name in SERVICES
    }


def concurrently(
    processes: ProcessGraph, shape: LoadShape, duration_s: float, tally: Tally
) -> float:
    """`shape.concurrent` clients, each running sessions one after another for `duration_s`
    (each runs at least one); the wall-clock seconds it took."""
    stop_at = time.monotonic() + duration_s

    def worker(index: int) -> None:
        seed = index * 1000
        while True:
            tally.add(one_session(processes, shape, f"load-{index}", seed))
            seed += 1
            if time.monotonic() >= stop_at:
                return

    started = time.monotonic()
    workers = [
        threading.Thread(target=worker, args=(i,), name=f"load-{i}")
        for i in range(shape.concurrent)
    ]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return time.monotonic() - started


def run_load(processes: ProcessGraph, shape: LoadShape) -> dict[str, Any]:
    # Warm-up at full concurrency: caches, the servers' thread pools and the allocator's
    # per-thread arenas reach their working size, which is not a leak.
    concurrently(processes, shape, 0.0, Tally())
    time.sleep(shape.settle_s)
    before = resources(processes)

    concurrent = Tally()
    concurrent_wall = concurrently(processes, shape, shape.duration_s, concurrent)
    time.sleep(shape.settle_s)
    between = resources(processes)

    sequential, started = Tally(), time.monotonic()
    # The gateway's RSS along the way: a leak climbs, allocator drift levels off.
    samples: dict[str, float] = {}
    for seed in range(shape.sequential):
        sequential.add(one_session(processes, shape, "sequential", seed))
        if (seed + 1) % max(1, shape.sequential // 4) == 0:
            samples[str(seed + 1)] = round(processes.rss("gateway") / MiB, 1)
    sequential_wall = time.monotonic() - started

    time.sleep(shape.settle_s)
    after = resources(processes)
    return {
        "shape": {
            "concurrent": shape.concurrent,
            "duration_s": shape.duration_s,
            "sequential": shape.sequential,
            "side_px": shape.side_px,
            "iterations": shape.iterations,
        },
        "concurrent": concurrent.summary(concurrent_wall),
        "sequential": sequential.summary(sequential_wall),
        "memory_before": before,
        "memory_after_concurrent": between,
        "memory_after": after,
        "gateway_rss_mib_after_n_sequential_sessions": samples,
        "errors": concurrent.other_errors + sequential.other_errors,
        "refusals": concurrent.refusals + sequential.refusals,
    }
