"""The universal path through the graph: any sources in one pass, refining, sessions, refusals.

The graph's decoders are a tiny run of the real training script (tests/conftest.py), so these
tests judge the plumbing and the request's rules; tests/features/test_universal.py judges what
weights, maps and content blending do to the image.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from styleblend.internal.v1 import features_pb2
from styleblend.v1 import styleblend_pb2 as pb

from services.common import images
from tests.conftest import Graph, internal_metadata, sample
from tests.gateway.test_fast import pixels, requests
from tests.gateway.test_graph import source
from tests.gateway.test_references import features_stub

STARRY, GRASS = "style/starry_night.jpg", "style/grass.jpg"
CAT = "content/chelsea.jpg"


def universal_request(*sources: pb.Source, **options: object) -> pb.BlendRequest:
    return pb.BlendRequest(
        sources=list(sources),
        max_side_px=96,
        iterations=4,
        universal=pb.UniversalOptions(**options),  # type: ignore[arg-type]
    )


def blend(graph: Graph, request: pb.BlendRequest) -> list[pb.BlendEvent]:
    return [r.event for r in graph.stub().Blend(request, timeout=120)]


def test_info_reports_the_loaded_decoders(graph: Graph) -> None:
    info = graph.stub().GetInfo(pb.GetInfoRequest(), timeout=30)
    assert info.HasField("universal")
    assert list(info.universal.layers) == ["relu2_1", "relu1_1"]  # coarse to fine
    assert info.universal.feature_model == "vgg19"
    assert all(steps > 0 for steps in info.universal.steps)


def test_a_universal_blend_of_a_painting_no_network_knows(graph: Graph) -> None:
    request = universal_request(source(CAT, 0, 1), source(GRASS, 1, 0))
    events = blend(graph, request)
    assert [e.WhichOneof("event") for e in events] == ["preview", "result"]
    preview, result = events[0].preview, events[1].result
    assert preview.universal and not preview.fast and preview.iteration == 0
    assert (result.width_px, result.height_px) == (96, 64)
    assert result.image.startswith(b"\x89PNG")
    photo = images.to_canvas(sample(CAT), 96, 64)
    styled = pixels(result.image)
    assert np.abs(styled - photo).mean() > 0.02  # the grass's statistics changed it
    assert '"universal"' in result.recipe_json


def test_strength_zero_gives_the_decoded_photo_and_levels_are_honoured(graph: Graph) -> None:
    photo = images.to_canvas(sample(CAT), 96, 64)
    none = pixels(blend(graph, universal_request(source(CAT, 0, 1), source(GRASS, 1, 0),
                                                 strength=0.0))[-1].result.image)  # fmt: skip
    full = pixels(blend(graph, universal_request(source(CAT, 0, 1), source(GRASS, 1, 0)))[-1]
                  .result.image)  # fmt: skip
    fine = pixels(blend(graph, universal_request(source(CAT, 0, 1), source(GRASS, 1, 0),
                                                 levels=["relu1_1"]))[-1].result.image)  # fmt: skip
    # Strength 0 only encodes and decodes: nearer the photo than the full blend is.
    assert np.abs(none - photo).mean() < np.abs(full - photo).mean()
    assert np.abs(fine - full).mean() > 0  # one level is not both


def test_refine_optimises_on_from_the_universal_image(graph: Graph) -> None:
    request = universal_request(source(CAT, 0, 1), source(STARRY, 1, 0), refine=True)
    request.preview_every = 1
    events = blend(graph, request)
    previews = [e.preview for e in events if e.HasField("preview")]
    assert previews[0].universal and not previews[1].universal
    progress = [e.progress for e in events if e.HasField("progress")]
    assert len(progress) == 4 and events[-1].HasField("result")
    universal, first_step = pixels(previews[0].image), pixels(previews[1].image)
    content = images.to_canvas(sample(CAT), 96, 64)
    assert np.abs(first_step - universal).mean() < 0.5 * np.abs(content - universal).mean()


def test_a_universal_session_answers_every_update_at_once(graph: Graph) -> None:
    start = universal_request(source(CAT, 0, 1), source(STARRY, 1, 0), source(GRASS, 0, 0))
    swap = pb.SessionUpdate(
        update_id=1,
        sources=[
            pb.SourceUpdate(index=1, style_weight=0),
            pb.SourceUpdate(index=2, style_weight=1),
        ],
    )
    weaker = pb.SessionUpdate(update_id=2, universal_strength=0.0)
    bad = pb.SessionUpdate(update_id=3, universal_strength=-1.0)
    wrong = pb.SessionUpdate(update_id=4, fast_strength=0.5)
    stream = graph.stub().Session(requests(start, swap, weaker, bad, wrong), timeout=120)
    events = [r.event for r in stream]
    previews = [e.preview for e in events if e.HasField("preview")]
    rejected = {e.update_rejected.update_id: e.update_rejected.message for e in events
                if e.HasField("update_rejected")}  # fmt: skip
    assert events[-1].HasField("result") and all(p.universal for p in previews)
    assert [p.update_id for p in previews] in ([0, 1, 2], [0, 2])  # 1 may coalesce into 2
    assert previews[0].image == blend(graph, start)[0].preview.image
    strength_zero = universal_request(source(CAT, 0, 1), source(GRASS, 1, 0), strength=0.0)
    assert previews[-1].image == blend(graph, strength_zero)[0].preview.image
    assert "universal_strength must be within 0..1" in rejected[3]
    assert "this session was not started with `fast`" in rejected[4]


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (universal_request(source(CAT, 0, 1), source(GRASS, 1, 0), levels=["relu4_1"]),
         grpc.StatusCode.INVALID_ARGUMENT, "universal.levels[0]: no decoder for 'relu4_1'"),
        (universal_request(source(CAT, 0, 1), source(GRASS, 1, 0),
                           levels=["relu1_1", "relu1_1"]),
         grpc.StatusCode.INVALID_ARGUMENT, "names a level twice"),
        (universal_request(source(CAT, 0, 1), source(GRASS, 1, 0), strength=float("nan")),
         grpc.StatusCode.INVALID_ARGUMENT, "universal.strength must be within 0..1, got nan"),
        (universal_request(source(GRASS, 1, 0)), grpc.StatusCode.INVALID_ARGUMENT,
         "universal: the method needs a source with a content_weight > 0"),
        (pb.BlendRequest(sources=[source(CAT, 0, 1), source(STARRY, 1, 0)],
                         fast=pb.FastOptions(model="test-model"),
                         universal=pb.UniversalOptions()),
         grpc.StatusCode.INVALID_ARGUMENT, "fast and universal: ask for one one-pass method"),
    ],
)  # fmt: skip
def test_bad_universal_requests_are_refused_by_name(
    graph: Graph, request_: pb.BlendRequest, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(graph.stub().Blend(request_, timeout=60))
    assert caught.value.code() == code
    assert message in str(caught.value.details())


def test_a_direct_call_is_held_to_the_features_limits_and_needs_the_token(graph: Graph) -> None:
    """Skipping the gateway buys nothing: no token, no call; with it, the features service's own
    size limits (the iterative path's) refuse a canvas before any image is decoded."""
    stub = features_stub(graph)
    cat = sample(CAT)
    source_ = features_pb2.UniversalSource(image=cat, content_weight=1.0)
    huge = features_pb2.UniversalRequest(sources=[source_], width_px=8192, height_px=8192)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Universal(huge, timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        stub.Universal(huge, metadata=internal_metadata(graph), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "8192" in str(caught.value.details())
    tiny = features_pb2.UniversalRequest(sources=[source_], width_px=8, height_px=8)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Universal(tiny, metadata=internal_metadata(graph), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_refused_call_keeps_no_statistics_and_a_slider_move_encodes_only_the_photo(
    graph: Graph,
) -> None:
    styliser = graph.servicers["features"].servicer.universal  # type: ignore[attr-defined]
    ramp = np.tile(np.linspace(0, 1, 48, dtype=np.float32), (48, 1))
    painting = images.encode(np.dstack([ramp, ramp[::-1], ramp.T]))

    def request(strength: float) -> features_pb2.UniversalRequest:
        return features_pb2.UniversalRequest(
            sources=[
                features_pb2.UniversalSource(image=sample(CAT), content_weight=1.0),
                features_pb2.UniversalSource(image=painting, style_weight=1.0,
                                             style_width_px=48, style_height_px=48),
            ],
            width_px=64, height_px=48, strength=strength,
        )  # fmt: skip

    key = f"{images.sha256(painting)}:48x48:"
    stub, metadata = features_stub(graph), internal_metadata(graph)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Universal(request(2.0), metadata=metadata, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert styliser.kept(key) is None  # refused: nothing kept
    first = stub.Universal(request(1.0), metadata=metadata, timeout=60)
    assert styliser.kept(key) is not None
    runs = styliser.encoder_runs
    again = stub.Universal(request(1.0), metadata=metadata, timeout=60)
    assert again.image == first.image
    assert styliser.encoder_runs - runs == len(styliser.universal.levels_by_default)  # the photo's


def test_regions_are_bounded_before_any_mask_is_decoded(graph: Graph) -> None:
    """One small mask named 10,000 times would be 10,000 canvas-sized masks and channels."""
    limit = graph.config.max_regions
    mask = pb.InfluenceMap(data=images.encode(np.ones((8, 8, 3), np.float32)))
    many = [pb.Region(mask=mask, style_weights=[0, 1])] * (limit + 1)
    request = universal_request(source(CAT, 0, 1), source(GRASS, 0, 0))
    request.regions.extend(many)
    with pytest.raises(grpc.RpcError) as caught:
        list(graph.stub().Blend(request, timeout=60))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"regions: {limit + 1} is over the limit of {limit}" in str(caught.value.details())
    start = universal_request(source(CAT, 0, 1), source(GRASS, 1, 0))
    update = pb.SessionUpdate(update_id=1, regions=pb.Regions(regions=many))
    events = [r.event for r in graph.stub().Session(requests(start, update), timeout=120)]
    (rejected,) = [e.update_rejected for e in events if e.HasField("update_rejected")]
    assert rejected.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert events[-1].HasField("result")  # the session went on without it
