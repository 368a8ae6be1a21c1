"""The request as the gateway holds it: defaults from one home, updates parsed before they apply."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from styleblend.v1 import styleblend_pb2 as pb

from services.common.config import GatewayConfig
from services.common.errors import InvalidArgument
from services.common.manifest import Manifest
from services.gateway.plan import (
    Update,
    apply_update,
    parse_update,
    plan_blend,
    request_defaults,
)
from services.gateway.recipe import update_request
from tests.conftest import Graph, sample

CONFIG = GatewayConfig(default_side_px=96, default_iterations=7, default_learning_rate=0.05)


@pytest.fixture(scope="module")
def manifest(vgg19_dir: Path) -> Manifest:
    return Manifest.load(vgg19_dir)


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 200).save(buffer, "PNG")
    return buffer.getvalue()


def two_sources() -> pb.BlendRequest:
    return pb.BlendRequest(
        sources=[
            pb.Source(data=sample("content/chelsea.jpg"), style_weight=0, content_weight=1),
            pb.Source(data=sample("style/starry_night.jpg"), style_weight=1, content_weight=0),
        ]
    )


def test_what_a_request_leaves_unset_is_the_defaults(manifest: Manifest) -> None:
    defaults = request_defaults(manifest, CONFIG)
    plan = plan_blend(two_sources(), manifest, CONFIG, lambda _: None)
    assert max(plan.canvas.width, plan.canvas.height) == defaults.side_px == 96
    assert sum(scale.iterations for scale in plan.scales) == defaults.iterations == 7
    assert plan.learning_rate == defaults.learning_rate == 0.05
    assert plan.style_layers == defaults.style_layers == tuple(manifest.default_style_layers)
    assert plan.content_layers == defaults.content_layers
    assert (plan.content_loss_weight, plan.style_loss_weight, plan.tv_loss_weight) == (
        manifest.loss_defaults.content,
        manifest.loss_defaults.style,
        manifest.loss_defaults.tv,
    )
    assert (plan.optimizer, plan.init, plan.style_scale) == ("lbfgs", "content", 1.0)
    assert plan.preview_every == defaults.preview_every


def test_get_info_reports_the_defaults_a_request_gets(graph: Graph, vgg19_dir: Path) -> None:
    info = graph.stub().GetInfo(pb.GetInfoRequest(), timeout=30)
    manifest = Manifest.load(vgg19_dir)
    defaults = request_defaults(manifest, graph.config)
    assert info.defaults.max_side_px == defaults.side_px
    assert info.defaults.iterations == defaults.iterations
    assert info.defaults.optimizer == pb.OPTIMIZER_LBFGS
    assert tuple(info.defaults.style_layers) == defaults.style_layers
    assert info.defaults.tv_loss_weight == pytest.approx(defaults.tv_loss_weight)
    assert info.defaults.learning_rate == pytest.approx(defaults.learning_rate)


def parsed(message: pb.SessionUpdate) -> Update:
    return parse_update(message, CONFIG, lambda _: None)


def test_an_update_is_checked_on_its_own_then_against_the_session(manifest: Manifest) -> None:
    plan = plan_blend(two_sources(), manifest, CONFIG, lambda _: None)
    with pytest.raises(InvalidArgument, match=r"update.sources\[1\].style_weight must be"):
        parsed(pb.SessionUpdate(sources=[pb.SourceUpdate(index=1, style_weight=-1)]))
    far = parsed(pb.SessionUpdate(sources=[pb.SourceUpdate(index=5, style_weight=1)]))
    with pytest.raises(InvalidArgument, match=r"update.sources\[5\]: no such source; .* has 2"):
        apply_update(plan, far, CONFIG)
    region = pb.Region(mask=pb.InfluenceMap(data=png(32, 32)), style_weights=[1, 0, 1])
    three = parsed(pb.SessionUpdate(regions=pb.Regions(regions=[region])))
    with pytest.raises(InvalidArgument, match=r"regions\[0\].style_weights: 3 weights for 2"):
        apply_update(plan, three, CONFIG)


def test_a_parsed_update_holds_its_images_and_renders_back_by_reference(
    manifest: Manifest,
) -> None:
    """A map uploaded for an update is resolved once: the upload may expire before the update is
    applied again (after a refusal before it), and the recipe names it by sha256."""
    mask = png(40, 30)
    held = {"m": mask}
    plan = plan_blend(two_sources(), manifest, CONFIG, lambda _: None)
    message = pb.SessionUpdate(
        update_id=3,
        sources=[pb.SourceUpdate(index=1, style_map=pb.InfluenceMap(upload_id="m"))],
        style_loss_weight=2.5,
        at_iteration=4,
    )
    update = parse_update(message, CONFIG, held.get)
    held.clear()  # expired
    updated = apply_update(plan, update, CONFIG)
    assert updated.sources[1].style_map is not None
    assert updated.sources[1].style_map.data == mask
    assert (
        updated.style_loss_weight == 2.5 and updated.content_loss_weight == plan.content_loss_weight
    )
    again = update_request(update)
    assert again.sources[0].style_map.upload_id == updated.sources[1].style_map.sha256
    assert (again.update_id, again.at_iteration, again.style_loss_weight) == (3, 4, 2.5)
    assert not again.HasField("content_loss_weight") and not again.HasField("regions")
    cleared = parse_update(
        pb.SessionUpdate(sources=[pb.SourceUpdate(index=1, clear_style_map=True)]), CONFIG, held.get
    )
    assert apply_update(updated, cleared, CONFIG).sources[1].style_map is None
    assert update_request(cleared).sources[0].clear_style_map
