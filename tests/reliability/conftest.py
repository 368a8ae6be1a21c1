"""The graph as real processes, shared by the reliability tests, and the report they fill in.

`make reliability` sets STYLEBLEND_RELIABILITY_OUT; the report is written there at the end of
the run (report.json and report.md). Without it, the numbers are only asserted on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.processes import ProcessGraph
from tests.reliability.report import Report

GRACE_S = 4.0
UPSTREAM_TIMEOUT_S = 10.0
# Tight limits keep every request the fuzzer gets through cheap, and give it limits to hit.
LIMITS = {
    "MAX_SIDE_PX": 128,
    "MAX_SOURCES": 4,
    "MAX_ITERATIONS": 400,
    "MAX_SCALES": 3,
    "MAX_IMAGE_PIXELS": 1_000_000,
    "MAX_REQUEST_BYTES": 8 * 1024 * 1024,
    "UPLOAD_STORE_BYTES": 32 * 1024 * 1024,
    # Defaults within the limits: a request that leaves a field unset must not be refused.
    "DEFAULT_SIDE_PX": 64,
    "DEFAULT_ITERATIONS": 4,
}


@pytest.fixture(scope="session")
def report() -> Iterator[Report]:
    collected = Report()
    yield collected
    out = os.environ.get("STYLEBLEND_RELIABILITY_OUT")
    if out and collected.sections:
        collected.write(Path(out))


@pytest.fixture(scope="session")
def process_graph(
    vgg19_dir: Path, fast_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessGraph]:
    settings = {
        "STYLEBLEND_MODEL": "vgg19",
        "STYLEBLEND_MODEL_DIR": str(vgg19_dir.parent),
        "STYLEBLEND_FAST_MODEL_DIR": str(fast_model_dir.parent),
        "STYLEBLEND_DEVICE": "cpu",
        "STYLEBLEND_GRACE_S": str(GRACE_S),
        "STYLEBLEND_UPSTREAM_TIMEOUT_S": str(UPSTREAM_TIMEOUT_S),
        **{f"STYLEBLEND_{name}": str(value) for name, value in LIMITS.items()},
        # glibc gives each thread that allocates its own arena (up to 8 per core) and keeps
        # their freed pages: after many concurrent sessions RSS climbs with no object kept
        # (the same sessions in one process, with malloc_trim, show no growth). Two arenas,
        # as for any threaded Python server in production, leave RSS meaning what is held.
        "MALLOC_ARENA_MAX": "2",
    }
    graph = ProcessGraph(tmp_path_factory.mktemp("graph-logs"), settings)
    try:
        graph.start()
        yield graph
    finally:
        graph.stop()


@pytest.fixture
def processes(process_graph: ProcessGraph) -> ProcessGraph:
    """The graph with every service up, whatever the test before it killed."""
    process_graph.ensure_up()
    return process_graph
