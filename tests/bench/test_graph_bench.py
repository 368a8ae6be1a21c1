"""`python -m bench.graph` at 64 px with 3 iterations: every code path runs, the report is sane.

The benchmark asserts no time; this checks that its measurements exist and make sense, so it
does not rot between the runs that matter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.graph import Settings, markdown, run, with_nonce
from services.common import images
from tests.conftest import sample

SIZE = 64


def finite_positive(row: dict[str, float]) -> bool:
    """A spread of at least one sample, every value a finite time > 0, in order."""
    values = [row["min"], row["median"], row["max"]]
    positive = all(math.isfinite(v) and v > 0 for v in values)
    return row["n"] >= 1 and positive and values == sorted(values)


def test_a_quick_run_writes_a_sane_report(vgg19_dir: Path, tmp_path: Path) -> None:
    settings = Settings(
        sizes=(SIZE,), repeats=1, iterations={SIZE: 3}, updates=1, model_dir=vgg19_dir.parent
    )
    report = run(settings, tmp_path)

    assert json.loads((tmp_path / "graph.json").read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / "graph.md").read_text() == markdown(report)
    for key in ("machine", "versions", "providers", "commit", "threads", "settings", "sizes"):
        assert key in report
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert set(report["versions"]) >= {"torch", "onnxruntime", "grpcio"}
    assert report["providers"]["features_service"] == ["CPUExecutionProvider"]
    assert list(report["sizes"]) == [str(SIZE)]

    row = report["sizes"][str(SIZE)]
    iteration = row["iteration"]
    assert iteration["canvas"] == [SIZE, SIZE]  # the astronaut is square
    assert finite_positive(iteration["graph_ms"]) and finite_positive(iteration["bare_ms"])
    assert math.isfinite(iteration["ratio"]) and iteration["ratio"] > 0
    # The bare loop ran the graph's own job: the same maths gives the same loss.
    loss = iteration["final_loss"]
    assert math.isclose(loss["graph"], loss["bare"], rel_tol=1e-3)

    first = row["first_preview"]
    for key in ("cold_ms", "cached_ms", "cold_first_progress_ms", "cached_first_progress_ms"):
        assert finite_positive(first[key]), key
    assert first["cold_first_progress_ms"]["median"] <= first["cold_ms"]["median"]

    slider = row["slider"]
    assert finite_positive(slider["to_progress_ms"]) and finite_positive(slider["to_preview_ms"])
    assert slider["to_progress_ms"]["median"] <= slider["to_preview_ms"]["median"]

    features = row["features"]
    for key in ("onnxruntime_cpu_ms", "torch_nchw_ms", "torch_channels_last_ms"):
        assert finite_positive(features[key]), key
    assert finite_positive(features["torch_winograd_ms"])
    assert features["max_relative_difference"] < 1e-3  # one network, two runtimes

    sizes = row["bytes"]
    assert sizes["progress"] > 0 and sizes["preview"] > sizes["progress"]
    assert sizes["per_iteration"] >= sizes["progress"]
    assert 0 < sizes["session_update"] < 100  # a slider move is a few bytes...
    assert 0 < sizes["reconstruct_update"] < 4096  # ...and so are its targets: keys only
    assert sizes["internal_per_update"] >= sizes["reconstruct_update"]
    assert sizes["reconstruct_job"] > 0 and sizes["session_start"] > 0
    memory = row["memory"]
    for key in ("peak_graph_blend_mib", "peak_bare_loop_mib", "peak_session_mib"):
        assert 0 < memory[key] < 64 * 1024, key


def test_a_nonce_changes_the_hash_and_not_the_pixels() -> None:
    jpeg = sample("content/astronaut.jpg")
    marked = with_nonce(jpeg, "x")
    assert images.sha256(marked) != images.sha256(jpeg)
    assert (images.to_canvas(marked, 32, 32) == images.to_canvas(jpeg, 32, 32)).all()
