"""The memory estimate, the budget, and the choice between whole, tiled and refused."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import grpc
import pytest
import torch
from styleblend.v1 import styleblend_pb2 as pb
from styleblend.v1 import styleblend_pb2_grpc

from services.common.config import ReconstructionConfig
from services.common.errors import ResourceExhausted
from services.graph import build_reconstruction, computing_as_configured
from services.reconstruction.memory import Budget, Footprint, MiB, Planner, estimate_bytes
from services.reconstruction.tiles import Tiling
from tests.conftest import INTERNAL_TOKEN, Graph, address, serve, start_gateway
from tests.gateway.test_graph import events, small_blend, source
from tests.reconstruction.test_core import CPU, job_for, scale_for

LAYERS = ["relu1_1", "relu3_1", "relu4_2"]


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    from export.models import build_feature_net

    return build_feature_net("vgg19")[0]


def test_the_footprint_is_linear_in_pixels_and_predicts_another_size(
    net: torch.nn.Module,
) -> None:
    footprint = Footprint.measure(net, LAYERS, CPU)
    saved, largest = Footprint._saved(net, LAYERS, CPU, 96, (), False)
    assert footprint.fixed + footprint.per_pixel * 96 * 96 == pytest.approx(saved, rel=0.01)
    # relu1_1 is VGG's biggest activation: 64 float32 channels per pixel.
    assert footprint.peak_per_pixel == pytest.approx(64 * 4, rel=0.01)
    assert largest == 64 * 4 * 96 * 96


def test_a_guided_gram_keeps_a_masked_copy_of_each_style_layer(net: torch.nn.Module) -> None:
    style = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    plain, guided = (
        Footprint.measure(net, [*style, "relu4_2"], CPU, style, guided) for guided in (False, True)
    )
    # float32 channels per pixel of the canvas: 64 at stride 1, 128 at 2, 256 at 4, 512 at 8, 16
    masked = 4 * (64 + 128 / 4 + 256 / 16 + 512 / 64 + 512 / 256)
    assert guided.per_pixel - plain.per_pixel == pytest.approx(masked, rel=0.05)
    as_is = Footprint.measure(net, [*style, "relu4_2"], CPU)
    assert plain.per_pixel == pytest.approx(as_is.per_pixel, rel=1e-3)  # NCHW: Gram on views


def test_the_estimate_counts_the_optimiser_and_tiles() -> None:
    footprint = Footprint(fixed=1e6, per_pixel=1000.0, peak_per_pixel=256.0)
    adam = estimate_bytes(footprint, 1024, 1024, optimizer="adam")
    lbfgs = estimate_bytes(footprint, 1024, 1024, optimizer="lbfgs")
    assert lbfgs - adam == 4 * 3 * 1024 * 1024 * (2 * 50 + 1)  # 50 (s, y) pairs, one more line
    tiled = estimate_bytes(footprint, 1024, 1024, optimizer="adam", tiling=Tiling(256, 64))
    assert tiled == adam - 1256 * (1024 * 1024 - 384 * 384)  # autograd sees one 384² crop


def test_the_planner_runs_whole_then_tiled_then_refuses(net: torch.nn.Module) -> None:
    job = job_for(net, scales=[scale_for(net, 128, 128)])
    tiling = Tiling(64, 16)
    generous = Planner(net, CPU, Budget(10**10), tiling)
    planned, reservation = generous.plan(job)
    assert planned.tiling is None and generous.budget.held == reservation.nbytes > 0
    whole = reservation.nbytes
    with reservation:
        pass
    assert generous.budget.held == 0

    tight = Planner(net, CPU, Budget(whole - 1), tiling)
    planned, reservation = tight.plan(job)
    assert planned.tiling == tiling and reservation.nbytes < whole
    # While it runs, the rest of the budget is too small for a second one.
    with reservation, pytest.raises(ResourceExhausted, match=r"has \d+ MiB free"):
        tight.plan(job)
    assert tight.budget.held == 0

    with pytest.raises(ResourceExhausted) as refused:
        Planner(net, CPU, Budget(10 * MiB), tiling).plan(job)
    message = str(refused.value)
    assert "a 128×128 reconstruction in 64 px tiles needs about" in message
    assert "STYLEBLEND_MEMORY_BUDGET_MIB" in message


def test_a_luminance_run_plans_one_channel(net: torch.nn.Module) -> None:
    colour = [torch.rand(128, 128, 3).numpy()]
    grey = job_for(net, scales=[scale_for(net, 128, 128)], colour=colour, optimizer="adam")
    rgb = dataclasses.replace(grey, colour=None)
    planner = Planner(net, CPU, Budget(10**10))
    assert planner.plan(rgb)[1].nbytes - planner.plan(grey)[1].nbytes == 4 * 2 * 4 * 128 * 128


def blend_with_budget(graph: Graph, models: Path, budget_mib: int) -> list[pb.BlendEvent]:
    """A 128 px blend through the shared graph's features and blending, and a reconstruction
    service of its own with this memory budget and 32 px tiles."""
    config = ReconstructionConfig(
        model_dir=models, device="cpu", memory_budget_mib=budget_mib, tile_px=32,
        tile_margin_px=16, blending_address=address(graph.blending), internal_token=INTERNAL_TOKEN,
    )  # fmt: skip
    reconstruction = serve(build_reconstruction(config))
    gateway, _ = start_gateway(
        {
            "features": address(graph.features),
            "blending": address(graph.blending),
            "reconstruction": address(reconstruction),
        }
    )
    try:
        stub = styleblend_pb2_grpc.StyleBlendStub(grpc.insecure_channel(address(gateway)))
        request = small_blend(
            source("content/chelsea.jpg", 0.0, 1.0),
            source("style/starry_night.jpg", 1.0, 0.0),
            max_side_px=128,
            iterations=3,
        )
        return events(stub.Blend(request, timeout=120))
    finally:
        gateway.stop(0)
        reconstruction.stop(0)


def test_over_the_budget_the_service_tiles_and_then_refuses(
    graph: Graph, vgg19_dir: Path, net: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    layers = graph.extractor.manifest.default_style_layers
    served = computing_as_configured(copy.deepcopy(net), CPU, ReconstructionConfig(device="cpu"))
    whole, tiled = (
        estimate_bytes(
            Footprint.measure(served, [*layers, "relu4_2"], CPU, layers, tiling is not None),
            128, 85, optimizer="lbfgs", tiling=tiling,
        ) / MiB
        for tiling in (None, Tiling(32, 16))
    )  # fmt: skip
    assert tiled < whole - 5
    with caplog.at_level(logging.INFO, logger="services.reconstruction.servicer"):
        result = blend_with_budget(graph, vgg19_dir.parent, int((whole + tiled) / 2))
    assert result[-1].WhichOneof("event") == "result"
    assert "lbfgs, tiled, about" in caplog.text
    with pytest.raises(grpc.RpcError) as refused:
        blend_with_budget(graph, vgg19_dir.parent, int(tiled / 2))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "a 128×85 reconstruction in 32 px tiles needs about" in str(refused.value.details())
