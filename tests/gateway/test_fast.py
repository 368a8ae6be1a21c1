"""The feed-forward path through the graph: instant images, strength, maps, refining, sessions."""

from __future__ import annotations

import io
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image
from styleblend.v1 import styleblend_pb2 as pb

from services.common import images
from tests.conftest import Graph, sample
from tests.gateway.test_graph import source

STARRY, SCREAM, GRASS = "style/starry_night.jpg", "style/the_scream.jpg", "style/grass.jpg"
CAT = "content/chelsea.jpg"


def fast_request(*sources: pb.Source, **fast: object) -> pb.BlendRequest:
    return pb.BlendRequest(
        sources=list(sources),
        max_side_px=96,
        iterations=4,
        fast=pb.FastOptions(model="test-model", **fast),  # type: ignore[arg-type]
    )


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255


def test_info_lists_the_fast_models_and_their_styles(graph: Graph) -> None:
    info = graph.stub().GetInfo(pb.GetInfoRequest(), timeout=30)
    (model,) = info.fast_models
    assert model.name == "test-model"
    assert [s.name for s in model.styles] == ["identity", "starry", "scream", "matisse"]
    assert model.styles[1].sha256 == images.sha256(sample(STARRY))


def test_a_fast_blend_is_one_preview_and_a_result_from_the_network(graph: Graph) -> None:
    request = fast_request(source(CAT, 0, 1), source(STARRY, 1, 0))
    events = [r.event for r in graph.stub().Blend(request, timeout=60)]
    assert [e.WhichOneof("event") for e in events] == ["preview", "result"]
    preview, result = events[0].preview, events[1].result
    assert preview.fast and preview.iteration == 0
    assert (result.width_px, result.height_px) == (96, 64)
    assert pixels(result.image).shape == (64, 96, 3)
    assert '"fast"' in result.recipe_json and '"test-model"' in result.recipe_json


def test_strength_zero_is_the_identity_style_and_weights_pick_the_style(graph: Graph) -> None:
    def run(*sources: pb.Source, **fast: object) -> np.ndarray:
        events = list(graph.stub().Blend(fast_request(*sources, **fast), timeout=60))
        return pixels(events[-1].event.result.image)

    starry = run(source(CAT, 0, 1), source(STARRY, 1, 0))
    scream = run(source(CAT, 0, 1), source(SCREAM, 1, 0))
    nothing = run(source(CAT, 0, 1), source(STARRY, 1, 0), strength=0.0)
    identity = run(source(CAT, 0, 1), source(STARRY, 0, 0))  # no style weight anywhere
    assert np.abs(starry - scream).mean() > 0.01
    np.testing.assert_array_equal(nothing, identity)
    photo = images.to_uint8(images.to_canvas(sample(CAT), 96, 64)).astype(np.float32) / 255
    np.testing.assert_array_equal(nothing, photo)  # strength 0 is the photo itself
    half = run(source(CAT, 0, 1), source(STARRY, 1, 0), strength=0.5)
    assert np.abs(half - starry).mean() > 0 and np.abs(half - nothing).mean() > 0


def test_a_style_map_mixes_per_pixel(graph: Graph) -> None:
    left = np.zeros((64, 96, 3), np.float32)
    left[:, :48] = 1.0
    right = 1.0 - left
    mapped = pb.BlendRequest()
    mapped.CopyFrom(fast_request(source(CAT, 0, 1), source(STARRY, 1, 0), source(SCREAM, 1, 0)))
    mapped.sources[1].style_map.data = images.encode(left)
    mapped.sources[2].style_map.data = images.encode(right)
    split = pixels(list(graph.stub().Blend(mapped, timeout=60))[-1].event.result.image)
    whole = {
        name: pixels(list(graph.stub().Blend(
            fast_request(source(CAT, 0, 1), source(path, 1, 0)), timeout=60
        ))[-1].event.result.image)
        for name, path in (("starry", STARRY), ("scream", SCREAM))
    }  # fmt: skip

    def gap(a: np.ndarray, b: np.ndarray, columns: slice) -> float:
        return float(np.abs(a[:, columns] - b[:, columns]).mean())

    assert gap(split, whole["starry"], slice(0, 32)) < gap(split, whole["scream"], slice(0, 32))
    assert gap(split, whole["scream"], slice(64, 96)) < gap(split, whole["starry"], slice(64, 96))


def test_refine_starts_the_reconstruction_from_the_network_image(graph: Graph) -> None:
    request = fast_request(source(CAT, 0, 1), source(STARRY, 1, 0), refine=True)
    request.preview_every = 1
    events = [r.event for r in graph.stub().Blend(request, timeout=120)]
    previews = [e.preview for e in events if e.HasField("preview")]
    assert previews[0].fast and not previews[1].fast
    progress = [e.progress for e in events if e.HasField("progress")]
    assert len(progress) == 4 and events[-1].HasField("result")
    # One step from the network's image stays near it; the content photo is far from it.
    network, first_step = pixels(previews[0].image), pixels(previews[1].image)
    content = images.to_canvas(sample(CAT), 96, 64)
    assert np.abs(first_step - network).mean() < 0.5 * np.abs(content - network).mean()


def requests(start: pb.BlendRequest, *updates: pb.SessionUpdate) -> Iterator[pb.SessionRequest]:
    yield pb.SessionRequest(start=start)
    yield from (pb.SessionRequest(update=u) for u in updates)
    yield pb.SessionRequest(finish=pb.FinishSession())


def test_a_fast_session_previews_every_update_and_ends_on_finish(graph: Graph) -> None:
    start = fast_request(source(CAT, 0, 1), source(STARRY, 1, 0), source(SCREAM, 0, 0))
    swap = pb.SessionUpdate(
        update_id=1,
        sources=[
            pb.SourceUpdate(index=1, style_weight=0),
            pb.SourceUpdate(index=2, style_weight=1),
        ],
    )
    weaker = pb.SessionUpdate(update_id=2, fast_strength=0.0)
    bad = pb.SessionUpdate(update_id=3, fast_strength=3.0)
    events = [r.event for r in graph.stub().Session(requests(start, swap, weaker, bad), timeout=60)]
    previews = [e.preview for e in events if e.HasField("preview")]
    rejected = [e.update_rejected for e in events if e.HasField("update_rejected")]
    assert events[-1].HasField("result")
    assert [p.update_id for p in previews] in ([0, 1, 2], [0, 2])  # 1 may coalesce into 2
    # The start's image however soon the updates come, then strength 0's: the photo itself.
    blend = [r.event for r in graph.stub().Blend(start, timeout=60)]
    assert previews[0].image == blend[0].preview.image
    photo = images.to_uint8(images.to_canvas(sample(CAT), 96, 64)).astype(np.float32) / 255
    np.testing.assert_array_equal(pixels(previews[-1].image), photo)
    assert events[-1].result.image.startswith(previews[-1].image[:-12])
    assert [(r.update_id, "fast_strength must be within 0..1" in r.message) for r in rejected] == [
        (3, True)
    ]


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (fast_request(source(CAT, 0, 1), source(GRASS, 1, 0)), grpc.StatusCode.FAILED_PRECONDITION,
         "sources[1] brings style, but fast model 'test-model' was not trained on that image"),
        (pb.BlendRequest(sources=[source(CAT, 0, 1), source(STARRY, 1, 0)],
                         fast=pb.FastOptions(model="nope")),
         grpc.StatusCode.INVALID_ARGUMENT, "fast.model: no fast model 'nope' (there are: test-mo"),
        (fast_request(source(CAT, 0, 1), source(STARRY, 1, 0), strength=1.5),
         grpc.StatusCode.INVALID_ARGUMENT, "fast.strength must be within 0..1, got 1.5"),
        (fast_request(source(STARRY, 1, 0)), grpc.StatusCode.INVALID_ARGUMENT,
         "the network needs a source with a content_weight > 0"),
    ],
)  # fmt: skip
def test_bad_fast_requests_are_refused_by_name(
    graph: Graph, request_: pb.BlendRequest, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(graph.stub().Blend(request_, timeout=60))
    assert caught.value.code() == code
    assert message in str(caught.value.details())
