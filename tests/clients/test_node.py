"""The Node.js client (`clients/node/blend.js`) as a person runs it, against a real gateway."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from bench.ports import free_port
from tests.conftest import ROOT, SAMPLES, Graph

NODE = shutil.which("node")
CLIENT = ROOT / "clients" / "node"
ASTRONAUT = str(SAMPLES / "content" / "astronaut.jpg")
STARRY = str(SAMPLES / "style" / "starry_night.jpg")

pytestmark = pytest.mark.skipif(
    NODE is None or not (CLIENT / "node_modules").is_dir(),
    reason="needs node and clients/node/node_modules (`npm ci --prefix clients/node`)",
)

# iteration 3/6 scale 1/1 64×64 style 3.598 content 0.112 tv 0 total 3.71 5.08 it/s
PROGRESS = re.compile(
    r"^iteration (\d+)/(\d+) scale 1/1 64×64 style \S+ content \S+ tv \S+ total \S+ [\d.]+ it/s$",
    re.MULTILINE,
)


def blend(*args: str) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run(
        [NODE, str(CLIENT / "blend.js"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_blend_prints_progress_and_writes_previews_and_result(graph: Graph, tmp_path: Path) -> None:
    out, previews = tmp_path / "out" / "result.png", tmp_path / "previews"
    # No style weight for the astronaut and no content weight for Starry Night: they count as 0,
    # and the gateway refuses a source without both fields set, so this also proves they are sent.
    done = blend(
        "--gateway", graph.address,
        "--source", f"{ASTRONAUT}:content=1",
        "--source", f"{STARRY}:style=1",
        "--size", "64", "--iterations", "6", "--seed", "7", "--preview-every", "2",
        "--previews", str(previews),
        "-o", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [(int(i), int(n)) for i, n in PROGRESS.findall(done.stdout)] == [
        (i, 6) for i in range(1, 7)
    ]
    assert f"wrote {out} (64×64, 6 iterations in " in done.stdout
    with Image.open(out) as result:
        assert isinstance(result, PngImageFile) and result.size == (64, 64)
        assert "styleblend:recipe" in result.text  # the gateway's PNG, written as it came
    written = sorted(previews.iterdir())
    assert [p.name for p in written] == ["preview_00002.jpg", "preview_00004.jpg"]
    for path in written:
        with Image.open(path) as preview:
            assert (preview.format, preview.size) == ("JPEG", (64, 64))


def test_server_errors_are_a_status_and_a_message(graph: Graph, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    done = blend("--gateway", graph.address, "--source", f"{STARRY}:style=1",
                 "--size", "5000", "-o", str(out))  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error (RESOURCE_EXHAUSTED): max_side_px 5000 is over the limit of "
        f"{graph.config.max_side_px}"
    )
    assert not out.exists()


def test_without_a_gateway_it_says_how_to_start_one(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    done = blend("--gateway", address, "--source", f"{STARRY}:style=1",
                 "-o", str(tmp_path / "x.png"))  # fmt: skip
    assert done.returncode == 1
    assert f"no styleblend gateway is reachable at {address}" in done.stderr
    assert "styleblend up" in done.stderr and "    at " not in done.stderr  # no stack trace


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (STARRY, "give a weight"),
        (f"{STARRY}:style=-1", "style must be a finite number >= 0"),
        (f"{STARRY}:style=", 'style="" is not a number'),
        (f"{STARRY}:colour=1", 'unknown option "colour"'),
        ("missing.jpg:style=1", "missing.jpg: no such file"),
    ],
    ids=["no-weight", "negative", "empty", "unknown-option", "missing-file"],
)
def test_bad_sources_are_refused_before_any_call(source: str, message: str, tmp_path: Path) -> None:
    # Port 1: nothing listens there, so a call would fail differently.
    done = blend("--gateway", "127.0.0.1:1", "--source", source, "-o", str(tmp_path / "x.png"))
    assert done.returncode == 2
    assert message in done.stderr and "UNAVAILABLE" not in done.stderr
