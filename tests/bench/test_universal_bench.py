"""bench.universal's pure helpers: the refine search, the loss units, the targets' verdicts."""

from __future__ import annotations

import math

from bench import universal
from services.reconstruction import core


def test_iterations_to_reach_counts_from_the_start_image() -> None:
    # A style loss falling as L-BFGS runs (after 0, 1, … iterations).
    styles = [0.345, 0.301, 0.262, 0.233, 0.219, 0.205]
    assert universal.iterations_to_reach(styles, 0.233) == 3  # reaching it exactly counts
    assert universal.iterations_to_reach(styles, 0.24) == 3
    assert universal.iterations_to_reach(styles, 0.5) == 0  # the start image is already there
    assert universal.iterations_to_reach(styles, 0.2) is None  # not within the run
    assert universal.iterations_to_reach([], 1.0) is None


def test_relative_divides_the_graphs_weights_out() -> None:
    weights = core.LossWeights(content=1.0, style=5.0, tv=0.0)
    losses = core.Losses(content=0.528, style=1.725, tv=0.0)
    judged = universal.relative(losses, weights)
    assert math.isclose(judged["style"], 0.345)
    assert math.isclose(judged["content"], 0.528)


def test_targets_met_reads_the_medians_and_the_refine_cap() -> None:
    report = {
        "size": 512,
        "levels": "relu3_1+relu1_1",
        "speed": {
            "rows": {
                "universal relu3_1+relu1_1, cached": {"median": 550.0},
                "L-BFGS iteration": {"median": 1700.0},
            }
        },
        "quality": [{"refine": {"iterations": 12}}, {"refine": {"iterations": None}}],
    }
    (seconds, measured, ok), (per_iteration, _, faster), (refine, taken, within) = (
        universal.targets_met(report)
    )
    assert ok and faster and within is False  # one pair never got there within the cap
    assert measured == "0.55 s"
    assert taken == "12, not within the cap"
    assert "512 px" in seconds and "L-BFGS" in per_iteration and "75" in refine
    assert universal.verdict(None) == "n/a" and universal.verdict(True) == "yes"


def test_level_names() -> None:
    assert universal.level_name(("relu3_1", "relu1_1")) == "relu3_1+relu1_1"
    assert universal.level_name(universal.LEVEL_SETS[-1]) == "all"
