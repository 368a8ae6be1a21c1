"""Inputs that cost far more than they look (issue 12 §3): slivers, weights float32 cannot
carry, images that decode only at Blend time. Planned in-process, and over the wire."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from styleblend.v1 import styleblend_pb2 as pb

from services.common import images
from services.common.config import GatewayConfig
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.manifest import Manifest
from services.gateway.plan import (
    MAX_LEARNING_RATE,
    MAX_WEIGHT,
    MIN_NONZERO_WEIGHT,
    Plan,
    apply_update,
    parse_update,
    plan_blend,
)
from tests.conftest import Graph, sample

CAT, STARRY = "content/chelsea.jpg", "style/starry_night.jpg"
CONFIG = GatewayConfig()


@pytest.fixture(scope="module")
def manifest(vgg19_dir: Path) -> Manifest:
    return Manifest.load(vgg19_dir)


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def request(*, style: bytes | None = None, **fields: object) -> pb.BlendRequest:
    return pb.BlendRequest(
        sources=[
            pb.Source(data=sample(CAT), style_weight=0.0, content_weight=1.0),
            pb.Source(data=style or sample(STARRY), style_weight=1.0, content_weight=0.0),
        ],
        max_side_px=64,
        iterations=3,
        **fields,  # type: ignore[arg-type]
    )


def no_uploads(upload_id: str) -> bytes | None:
    return None


def plan(message: pb.BlendRequest, manifest: Manifest, config: GatewayConfig = CONFIG) -> Plan:
    return plan_blend(message, manifest, config, no_uploads)


def applied(planned: Plan, update: pb.SessionUpdate) -> Plan:
    """The update as a session takes it: parsed at the servicer, applied by the run."""
    return apply_update(planned, parse_update(update, CONFIG, no_uploads), CONFIG)


# --- slivers ---------------------------------------------------------------------------------
def test_a_sliver_style_image_is_refused_naming_it(manifest: Manifest) -> None:
    """2500×1 (92 bytes) would have been extracted at 80000×32: 25–32 s and gigabytes."""
    sliver = png(2500, 1)
    assert len(sliver) < 200
    with pytest.raises(InvalidArgument) as caught:
        plan(request(style=sliver), manifest)
    message = str(caught.value)
    assert message.startswith("sources[1]: its 2500×1 style image is too long and thin")
    assert "80000×32" in message and "4096 px" in message and "128 times" in message


def test_the_longest_sliver_allowed_stays_within_the_extraction_limits(
    manifest: Manifest,
) -> None:
    ratio = CONFIG.max_extract_side_px // 32
    planned = plan(request(style=png(ratio, 1)), manifest)
    for scale in planned.scales:
        width, height = planned.style_size(planned.sources[1], scale)
        assert max(width, height) <= CONFIG.max_extract_side_px
        assert width * height <= CONFIG.max_extract_pixels
    with pytest.raises(InvalidArgument, match=r"sources\[1\]: its 129×1"):
        plan(request(style=png(ratio + 1, 1)), manifest)


def test_a_sliver_that_brings_no_style_costs_nothing_until_it_does(manifest: Manifest) -> None:
    """As content it is cropped to the canvas; a session update that gives it style is refused,
    and so is a region that does."""
    message = request()
    message.sources.append(pb.Source(data=png(1, 3000), style_weight=0.0, content_weight=0.5))
    planned = plan(message, manifest)
    update = pb.SessionUpdate(sources=[pb.SourceUpdate(index=2, style_weight=0.3)])
    with pytest.raises(InvalidArgument, match=r"sources\[2\]: its 1×3000 style image"):
        applied(planned, update)
    region = pb.Region(mask=pb.InfluenceMap(data=png(64, 64)), style_weights=[0, 1, 0.5])
    regions = pb.SessionUpdate(regions=pb.Regions(regions=[region]))
    with pytest.raises(InvalidArgument, match=r"sources\[2\]: its 1×3000 style image"):
        applied(planned, regions)


def test_a_sliver_that_sets_the_canvas_is_named(manifest: Manifest) -> None:
    message = request()
    message.sources[0].data = png(2500, 1)
    with pytest.raises(InvalidArgument) as caught:
        plan(message, manifest)
    assert str(caught.value).startswith("sources[0] sets the canvas: its image is 2500×1")


def test_style_scale_that_asks_for_too_many_pixels_is_over_the_limit(manifest: Manifest) -> None:
    """A square style at a 1024 px canvas and style_scale 4 is 4096×4096: 16.7 M pixels."""
    big = request(style_scale=4.0)
    big.max_side_px = 1024
    big.sources[0].data = png(1024, 1024)
    with pytest.raises(ResourceExhausted) as caught:
        plan(big, manifest)
    message = str(caught.value)
    assert message.startswith("sources[1]: style_scale 4 makes its")
    assert "4,194,304 pixels" in message and "STYLEBLEND_MAX_EXTRACT_PIXELS" in message
    big.style_scale = 2.0
    plan(big, manifest)  # 2048×… fits


def test_a_canvas_over_the_extraction_limit_is_refused(manifest: Manifest) -> None:
    with pytest.raises(ResourceExhausted, match="the 64×43 canvas has 2,752 pixels") as caught:
        plan(request(), manifest, GatewayConfig(max_extract_pixels=2000))
    assert "STYLEBLEND_MAX_EXTRACT_PIXELS" in str(caught.value)
    plan(request(), manifest, GatewayConfig(max_extract_pixels=64 * 43))


# --- weights float32 cannot carry ------------------------------------------------------------
FLOAT32_MAX = float(np.finfo(np.float32).max)
HUGE = (1e39, 1e300, FLOAT32_MAX, MAX_WEIGHT * 1.5)


def blend_fields() -> list[tuple[str, str]]:
    """(where, field) for every weight of a BlendRequest."""
    return [("source", "style_weight"), ("source", "content_weight"), ("region", "0"),
            ("request", "content_loss_weight"), ("request", "style_loss_weight"),
            ("request", "tv_loss_weight")]  # fmt: skip


def with_weight(where: str, name: str, value: float) -> tuple[pb.BlendRequest, str]:
    message = request()
    if where == "source":
        setattr(message.sources[1], name, value)
        return message, f"sources[1].{name}"
    if where == "region":
        message.regions.append(
            pb.Region(mask=pb.InfluenceMap(data=png(64, 64)), style_weights=[value, 1.0])
        )
        return message, "regions[0].style_weights[0]"
    setattr(message, name, value)
    return message, name


@pytest.mark.parametrize(("where", "name"), blend_fields())
@pytest.mark.parametrize("value", HUGE)
def test_a_weight_float32_cannot_carry_is_refused(
    manifest: Manifest, where: str, name: str, value: float
) -> None:
    message, field = with_weight(where, name, value)
    with pytest.raises(InvalidArgument) as caught:
        plan(message, manifest)
    assert str(caught.value) == f"{field} {value:g} is over the largest allowed, {MAX_WEIGHT:g}"


@pytest.mark.parametrize(("where", "name"), blend_fields())
def test_the_largest_and_smallest_weights_are_taken_and_tinier_ones_refused(
    manifest: Manifest, where: str, name: str
) -> None:
    for value in (MAX_WEIGHT, MIN_NONZERO_WEIGHT):
        plan(with_weight(where, name, value)[0], manifest)
    message, field = with_weight(where, name, 1e-40)
    with pytest.raises(InvalidArgument, match=rf"^{re.escape(field)} 1e-40 is too small to count"):
        plan(message, manifest)


@pytest.mark.parametrize("value", [1e39, 1e300, 1.5])
def test_a_learning_rate_over_a_whole_step_is_refused(manifest: Manifest, value: float) -> None:
    with pytest.raises(
        InvalidArgument, match=re.escape(f"learning_rate {value:g} is over the largest")
    ):
        plan(request(learning_rate=value), manifest)
    assert plan(request(learning_rate=MAX_LEARNING_RATE), manifest).learning_rate == 1.0


@pytest.mark.parametrize("value", [1e39, 1e300, math.inf])
def test_style_scale_stays_in_its_range(manifest: Manifest, value: float) -> None:
    with pytest.raises(InvalidArgument, match=r"style_scale must be within 0\.25\.\.4\.0"):
        plan(request(style_scale=value), manifest)


UPDATE_FIELDS = [
    ("source", "style_weight", "update.sources[1].style_weight"),
    ("source", "content_weight", "update.sources[1].content_weight"),
    ("region", "", "regions[0].style_weights[1]"),
    ("update", "content_loss_weight", "update.content_loss_weight"),
    ("update", "style_loss_weight", "update.style_loss_weight"),
    ("update", "tv_loss_weight", "update.tv_loss_weight"),
]


def update_with(where: str, name: str, value: float) -> pb.SessionUpdate:
    if where == "source":
        change = pb.SourceUpdate(index=1)
        setattr(change, name, value)
        return pb.SessionUpdate(sources=[change])
    if where == "region":
        region = pb.Region(mask=pb.InfluenceMap(data=png(64, 64)), style_weights=[0.0, value])
        return pb.SessionUpdate(regions=pb.Regions(regions=[region]))
    return pb.SessionUpdate(**{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(("where", "name", "field"), UPDATE_FIELDS)
def test_a_session_update_is_held_to_the_same_bounds(
    manifest: Manifest, where: str, name: str, field: str
) -> None:
    planned = plan(request(), manifest)
    for value in HUGE:
        with pytest.raises(InvalidArgument) as caught:
            applied(planned, update_with(where, name, value))
        assert str(caught.value) == f"{field} {value:g} is over the largest allowed, 1e+06"
    with pytest.raises(InvalidArgument, match="is too small to count"):
        applied(planned, update_with(where, name, 1e-300))
    updated = applied(planned, update_with(where, name, MAX_WEIGHT))
    assert updated != planned


def test_the_largest_weights_still_make_a_picture(graph: Graph) -> None:
    """The bound is one the computation carries: every weight at MAX_WEIGHT through the graph
    gives finite losses and an image, not the all-black one 1e39 gave."""
    message = pb.BlendRequest(
        sources=[
            pb.Source(data=sample(CAT), style_weight=MAX_WEIGHT, content_weight=MAX_WEIGHT),
            pb.Source(data=sample(STARRY), style_weight=MAX_WEIGHT, content_weight=MAX_WEIGHT),
        ],
        max_side_px=48,
        iterations=3,
        content_loss_weight=MAX_WEIGHT,
        style_loss_weight=MAX_WEIGHT,
        tv_loss_weight=MAX_WEIGHT,
        seed=1,
    )
    events = [response.event for response in graph.stub().Blend(message, timeout=300)]
    losses = [e.progress.losses for e in events if e.HasField("progress")]
    assert losses and all(math.isfinite(loss.total) for loss in losses)
    pixels = np.asarray(Image.open(io.BytesIO(events[-1].result.image)).convert("RGB"), float)
    assert pixels.std() > 5 and 20 < pixels.mean() < 235


def test_a_weight_of_1e39_is_refused_over_the_wire(graph: Graph) -> None:
    message = request()
    message.sources[1].style_weight = 1e39
    with pytest.raises(grpc.RpcError) as caught:
        list(graph.stub().Blend(message, timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        caught.value.details() == "sources[1].style_weight 1e+39 is over the largest allowed, 1e+06"
    )


def test_a_sliver_is_refused_over_the_wire_before_any_extraction(graph: Graph) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(graph.stub().Blend(request(style=png(2500, 1)), timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sources[1]: its 2500×1 style image" in str(caught.value.details())


# --- images that decode only later -----------------------------------------------------------
def truncated() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = images.encode(noise)
    return data[: len(data) // 2]


@pytest.mark.parametrize("where", ["source", "style_map", "init_image"])
def test_an_image_that_does_not_decode_is_refused_at_planning_naming_it(
    manifest: Manifest, where: str
) -> None:
    message = request()
    if where == "source":
        message.sources[1].data, field = truncated(), "sources[1] image"
    elif where == "style_map":
        message.sources[1].style_map.data, field = truncated(), "sources[1].style_map image"
    else:
        message.init, message.init_image, field = pb.INIT_IMAGE, truncated(), "init_image"
    with pytest.raises(InvalidArgument) as caught:
        plan(message, manifest)
    text = str(caught.value)
    assert text.startswith(f"{field}: cannot decode the image (")
    assert "truncated" in text and "BytesIO" not in text


def test_garbage_bytes_are_named_without_a_buffer_repr(graph: Graph) -> None:
    message = request()
    message.sources[0].content_map.data = b"this is not an image"
    with pytest.raises(grpc.RpcError) as caught:
        list(graph.stub().Blend(message, timeout=60))
    details = str(caught.value.details())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("sources[0].content_map image: not a readable image (not a PNG")
    assert "BytesIO" not in details and "0x" not in details
