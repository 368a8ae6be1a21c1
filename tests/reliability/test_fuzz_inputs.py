"""Bad input at the validation layer, in-process: image and map decoding, and the gateway's
plans of fuzzed requests and session updates. Only the documented domain errors may come out.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from styleblend.v1 import styleblend_pb2 as pb

from services.common import guides, images
from services.common.config import GatewayConfig
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.common.fastmodel import FastManifest
from services.common.manifest import MANIFEST_FILE, Manifest
from services.gateway.plan import MIN_SIDE_PX, apply_update, parse_update, plan_blend
from tests.conftest import sample
from tests.reliability import fuzz
from tests.reliability.report import Report

SHORT, LONG = 120, 2500
MAX_PIXELS = 1_000_000
REFUSED = (InvalidArgument, ResourceExhausted)
PLAN_REFUSED = (InvalidArgument, ResourceExhausted, FailedPrecondition)


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,  # nothing written into the checkout
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- images and maps -------------------------------------------------------------------------
def check_image(data: bytes, outcomes: Counter[str]) -> None:
    """probe refuses in words or gives a size; decoding then refuses in words or gives pixels
    of the canvas's size in [0, 1]; a map of them brought to a layer stays in [0, 1]."""
    try:
        header = images.probe(data, "sources[0] image", MAX_PIXELS)
    except REFUSED as error:
        assert str(error).startswith("sources[0] image: ")
        outcomes[f"probe: {type(error).__name__}"] += 1
        return
    assert header.format in images.FORMATS
    assert header.width >= 1 and header.height >= 1, header
    assert header.pixels <= MAX_PIXELS
    try:
        pixels = images.to_canvas(data, 40, 24, "sources[0] image")
        mask = images.to_mask(data, 40, 24, "sources[0].style_map")
    except InvalidArgument as error:
        assert str(error).startswith(("sources[0] image: ", "sources[0].style_map: "))
        outcomes["decode: InvalidArgument"] += 1
        return
    assert pixels.shape == (24, 40, 3) and pixels.dtype == np.float32
    assert mask.shape == (24, 40) and mask.dtype == np.float32
    assert pixels.min() >= 0 and pixels.max() <= 1 and mask.min() >= 0 and mask.max() <= 1
    for stride in (1, 2, 4, 8, 16):  # VGG's layers round down
        layer = guides.to_layer(mask, 24 // stride, 40 // stride, stride)
        assert layer.shape == (24 // stride, 40 // stride)
        assert mask.min() - 1e-6 <= layer.min() and layer.max() <= mask.max() + 1e-6
    outcomes["decoded"] += 1


def image_test(examples: int, name: str) -> Callable[..., None]:
    @fuzz_settings(examples)
    @given(data=fuzz.image_bytes())
    def run(data: bytes, outcomes: Counter[str]) -> None:
        check_image(data, outcomes)

    def test(report: Report) -> None:
        outcomes: Counter[str] = Counter()
        run(outcomes=outcomes)
        report.add(name, {"cases": sum(outcomes.values()), "outcomes": dict(outcomes)})
        assert outcomes["decoded"] > 0 and sum(outcomes.values()) >= examples

    return test


test_image_decoding_refuses_in_words = image_test(SHORT * 2, "fuzz: image and map decoding (short)")
test_image_decoding_long = pytest.mark.reliability(
    image_test(LONG * 2, "fuzz: image and map decoding")
)


@pytest.mark.parametrize("exif_first", [True, False], ids=["exif", "no-exif"])
def test_probe_reads_no_pixel_even_for_exif(
    monkeypatch: pytest.MonkeyPatch, exif_first: bool
) -> None:
    """Found by the fuzzer: probing a PNG read its EXIF through Pillow's getexif(), which decodes
    the image first, so a 60-byte PNG claiming 5146×21,550,221 pixels took seconds and was
    killed for memory before the pixel limit was checked."""
    from PIL import ImageFile

    def no_decoding(self: object) -> None:
        raise AssertionError("probe decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    bomb = fuzz.png_header(5146, 21_550_221, b"\0\0\0\0")
    with pytest.raises(ResourceExhausted, match="5146×21550221"):
        images.probe(bomb, "sources[0] image", MAX_PIXELS)
    image, buffer = Image.new("RGB", (30, 10)), io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°
    image.save(buffer, "PNG", **({"exif": exif.tobytes()} if exif_first else {}))
    header = images.probe(buffer.getvalue(), "sources[0] image", MAX_PIXELS)
    assert (header.width, header.height) == ((10, 30) if exif_first else (30, 10))


@fuzz_settings(150)
@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    stride=st.sampled_from([1, 2, 4, 8, 16, 32]),
    round_up=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_guides_average_any_mask_onto_any_layer(
    height: int, width: int, stride: int, round_up: bool, seed: int
) -> None:
    mask = np.random.default_rng(seed).random((height, width), dtype=np.float32)
    rows = -(-height // stride) if round_up else height // stride
    columns = -(-width // stride) if round_up else width // stride
    layer = guides.to_layer(mask, rows, columns, stride)
    assert layer.shape == (rows, columns)
    if layer.size:
        assert mask.min() - 1e-6 <= layer.min() and layer.max() <= mask.max() + 1e-6
    if rows * stride == height and columns * stride == width:  # every pixel counted once
        assert abs(float(layer.mean()) - float(mask.mean())) < 1e-4


# --- the gateway's plans ---------------------------------------------------------------------
class Planning:
    """What plan_blend needs, as the fuzzed gateway has it."""

    def __init__(self, vgg19_dir: Path, fast_model_dir: Path) -> None:
        self.manifest = Manifest.from_json((vgg19_dir / MANIFEST_FILE).read_text())
        fast = FastManifest.load(fast_model_dir)
        self.fast_models = {fast.name: fast}
        self.uploaded = {images.sha256(sample(name)): sample(name) for name in fuzz.SAMPLES[:2]}
        self.config = GatewayConfig(
            max_side_px=128, max_sources=4, max_iterations=400, max_scales=3,
            max_image_pixels=MAX_PIXELS, default_side_px=64, default_iterations=4,
        )  # fmt: skip
        self.overrides = fuzz.public_overrides(
            tuple(self.manifest.layer_names), tuple(self.uploaded), tuple(self.fast_models)
        )

    def plan(self, request: pb.BlendRequest) -> Any:
        return plan_blend(request, self.manifest, self.config, self.uploaded.get, self.fast_models)


@pytest.fixture(scope="module")
def planning(vgg19_dir: Path, fast_model_dir: Path) -> Iterator[Planning]:
    yield Planning(vgg19_dir, fast_model_dir)


def check_plan(planning: Planning, request: pb.BlendRequest, outcomes: Counter[str]) -> None:
    config = planning.config
    try:
        plan = planning.plan(request)
    except PLAN_REFUSED as error:
        assert str(error), type(error)
        outcomes[type(error).__name__] += 1
        return
    canvas = plan.canvas
    assert min(canvas.width, canvas.height) >= MIN_SIDE_PX
    assert max(canvas.width, canvas.height) <= config.max_side_px
    assert 1 <= len(plan.scales) <= config.max_scales
    assert all(min(s.width, s.height) >= MIN_SIDE_PX and s.iterations >= 1 for s in plan.scales)
    assert sum(s.iterations for s in plan.scales) <= config.max_iterations
    assert 1 <= len(plan.sources) <= config.max_sources
    for source in plan.sources:
        assert np.isfinite([source.style_weight, source.content_weight]).all()
        assert source.style_weight >= 0 and source.content_weight >= 0
    assert set(plan.style_layers) <= set(planning.manifest.layer_names)
    assert set(plan.content_layers) <= set(planning.manifest.layer_names)
    assert np.isfinite(
        [plan.content_loss_weight, plan.style_loss_weight, plan.tv_loss_weight]
    ).all()
    assert plan.learning_rate > 0 and np.isfinite(plan.learning_rate)
    outcomes["planned"] += 1


def check_update(planning: Planning, update: pb.SessionUpdate, outcomes: Counter[str]) -> None:
    start = pb.BlendRequest(
        sources=[
            pb.Source(data=sample(fuzz.SAMPLES[0]), style_weight=0, content_weight=1),
            pb.Source(data=sample(fuzz.SAMPLES[2]), style_weight=1, content_weight=0),
        ],
        max_side_px=64,
        iterations=4,
    )
    plan = planning.plan(start)
    try:
        parsed = parse_update(update, planning.config, planning.uploaded.get)
        updated = apply_update(plan, parsed, planning.config)
    except PLAN_REFUSED as error:
        assert str(error).startswith(
            ("update.", "regions", "every ", "fast_strength", "universal_strength", "preserve")
        )
        outcomes[type(error).__name__] += 1
        return
    assert len(updated.sources) == len(plan.sources) and updated.scales == plan.scales
    outcomes["applied"] += 1


def plan_test(examples: int, name: str) -> Callable[..., None]:
    def test(planning: Planning, report: Report) -> None:
        outcomes: Counter[str] = Counter()
        updates: Counter[str] = Counter()

        @fuzz_settings(examples)
        @given(request=fuzz.blend_requests(planning.overrides))
        def plans(request: pb.BlendRequest) -> None:
            check_plan(planning, request, outcomes)

        @fuzz_settings(examples)
        @given(update=fuzz.session_updates(planning.overrides))
        def session_updates(update: pb.SessionUpdate) -> None:
            check_update(planning, update, updates)

        plans()
        session_updates()
        report.add(
            name,
            {
                "requests": sum(outcomes.values()),
                "request outcomes": dict(outcomes),
                "updates": sum(updates.values()),
                "update outcomes": dict(updates),
            },
        )
        assert outcomes["planned"] > 0 and updates["applied"] > 0

    return test


test_plans_of_fuzzed_requests_refuse_in_words = plan_test(SHORT, "fuzz: plans (short)")
test_plans_long = pytest.mark.reliability(plan_test(LONG, "fuzz: plans"))
