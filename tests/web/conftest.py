"""The studio's bridge on loopback against the graph, and a headless Chromium to drive it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.gateway.web import start_web
from tests.conftest import ROOT, Graph

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright's own download is not used
ARTIFACTS = ROOT / "test-artifacts"  # git ignores it
# Nothing may be fetched from the network, and no GPU is needed.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def studio_url(graph: Graph) -> Iterator[str]:
    server = start_web("127.0.0.1", 0, graph.address)
    yield f"http://127.0.0.1:{server.port}/"
    server.stop()
