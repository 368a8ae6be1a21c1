"""The whole graph on loopback: four real servers, the public API, real images."""

from __future__ import annotations

import io
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from styleblend.v1 import styleblend_pb2 as pb

from services.common import images
from services.reconstruction.core import gram
from tests.conftest import Graph, sample


def source(name: str, style: float | None, content: float | None) -> pb.Source:
    message = pb.Source(data=sample(name))
    if style is not None:
        message.style_weight = style
    if content is not None:
        message.content_weight = content
    return message


def events(responses: Iterable[pb.BlendResponse]) -> list[pb.BlendEvent]:
    return [response.event for response in responses]


def small_blend(*sources: pb.Source, **fields: object) -> pb.BlendRequest:
    settings: dict[str, object] = {
        "max_side_px": 64,
        "iterations": 30,
        "preview_every": 10,
        "seed": 1,
    }
    settings.update(fields)
    return pb.BlendRequest(sources=list(sources), **settings)  # type: ignore[arg-type]


def test_blend_streams_progress_previews_and_a_result(graph: Graph) -> None:
    request = small_blend(
        source("content/chelsea.jpg", 0.0, 1.0),
        source("style/starry_night.jpg", 0.7, 0.0),
        source("style/the_scream.jpg", 0.3, 0.0),
        iterations=60,
        content_loss_weight=0.2,  # style-led, so the style loss has room to fall
    )
    stream = events(graph.stub().Blend(request, timeout=300))
    progress = [e.progress for e in stream if e.HasField("progress")]
    previews = [e.preview for e in stream if e.HasField("preview")]
    assert [p.iteration for p in progress] == list(range(1, 61))
    assert [p.iteration for p in previews] == [10, 20, 30, 40, 50]
    assert stream[-1].HasField("result") and sum(e.HasField("result") for e in stream) == 1
    first, last = progress[0].losses.style, progress[-1].losses.style
    assert last <= 0.1 * first, f"style loss {first:.3g} -> {last:.3g}"
    result = stream[-1].result
    image = Image.open(io.BytesIO(result.image))
    assert image.format == "PNG" and image.size == (64, 43)  # chelsea is 451×300
    assert (result.width_px, result.height_px) == (64, 43)
    assert Image.open(io.BytesIO(previews[0].image)).size == (64, 43)
    assert result.stats.iterations == 60 and not result.stats.finished_early
    assert '"model": "vgg19"' in result.recipe_json


def style_distance(result: bytes, style: bytes, net: torch.nn.Module) -> float:
    """Mean relative Gram distance over the default style layers, at 64 px."""
    layers = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]

    def grams(data: bytes) -> dict[str, torch.Tensor]:
        header = images.probe(data, "image", 10**8)
        width, height = images.fit_inside(header.width, header.height, 64)
        pixels = torch.as_tensor(images.to_canvas(data, width, height)).permute(2, 0, 1)[None]
        with torch.no_grad():
            return {name: gram(f) for name, f in net(pixels, layers).items()}

    a, b = grams(result), grams(style)
    return float(np.mean([((a[n] - b[n]).norm() / b[n].norm()).item() for n in layers]))


def test_style_weights_decide_whose_style_the_result_takes(graph: Graph) -> None:
    from export.models import build_feature_net

    net, _ = build_feature_net("vgg19")
    starry, scream = sample("style/starry_night.jpg"), sample("style/the_scream.jpg")

    def run(starry_weight: float, scream_weight: float) -> bytes:
        request = small_blend(
            source("content/astronaut.jpg", 0.0, 1.0),
            source("style/starry_night.jpg", starry_weight, 0.0),
            source("style/the_scream.jpg", scream_weight, 0.0),
        )
        return events(graph.stub().Blend(request, timeout=300))[-1].result.image

    only_starry, only_scream = run(1.0, 0.0), run(0.0, 1.0)
    assert style_distance(only_starry, starry, net) < style_distance(only_scream, starry, net)
    assert style_distance(only_scream, scream, net) < style_distance(only_starry, scream, net)


def test_uploaded_images_are_used_by_id(graph: Graph) -> None:
    stub = graph.stub()
    upload = stub.UploadImage(pb.UploadImageRequest(data=sample("style/grass.jpg")))
    assert (upload.width_px, upload.height_px) == (512, 512)
    assert upload.upload_id == images.sha256(sample("style/grass.jpg"))
    request = small_blend(
        source("content/coffee.jpg", 0.0, 1.0),
        pb.Source(upload_id=upload.upload_id, style_weight=1.0, content_weight=0.0),
        iterations=3,
    )
    assert events(stub.Blend(request, timeout=120))[-1].HasField("result")


def test_session_finishes_early_on_request(graph: Graph) -> None:
    finish = threading.Event()

    def requests() -> Iterator[pb.SessionRequest]:
        yield pb.SessionRequest(
            start=small_blend(
                source("content/astronaut.jpg", 0.0, 1.0),
                source("style/starry_night.jpg", 1.0, 0.0),
                iterations=400,
            )
        )
        finish.wait(timeout=60)
        yield pb.SessionRequest(finish=pb.FinishSession())

    seen = []
    for response in graph.stub().Session(requests(), timeout=300):
        seen.append(response.event)
        if response.event.HasField("progress") and response.event.progress.iteration == 3:
            finish.set()
    result = seen[-1].result
    assert result.stats.finished_early
    assert 3 <= result.stats.iterations < 400
    assert Image.open(io.BytesIO(result.image)).size == (64, 64)


def reconstruction_threads() -> int:
    return sum(thread.name == "reconstruction" for thread in threading.enumerate())


def test_cancelling_stops_the_reconstruction(graph: Graph) -> None:
    call = graph.stub().Blend(
        small_blend(
            source("content/astronaut.jpg", 0.0, 1.0),
            source("style/starry_night.jpg", 1.0, 0.0),
            iterations=500,
        ),
        timeout=300,
    )
    for response in call:
        if response.event.HasField("progress") and response.event.progress.iteration == 2:
            break
    assert reconstruction_threads() == 1
    call.cancel()
    deadline = time.monotonic() + 10
    while reconstruction_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reconstruction_threads() == 0


def test_get_info_describes_model_layers_and_limits(graph: Graph) -> None:
    info = graph.stub().GetInfo(pb.GetInfoRequest(), timeout=30)
    assert info.model == "vgg19" and len(info.weights_sha256) == 64
    assert "relu4_2" in [layer.name for layer in info.layers]
    assert list(info.defaults.style_layers) == [
        "relu1_1",
        "relu2_1",
        "relu3_1",
        "relu4_1",
        "relu5_1",
    ]
    assert list(info.defaults.content_layers) == ["relu4_2"]
    assert info.limits.max_side_px == 512 and info.limits.max_sources == 4
    assert info.limits.max_extract_side_px == graph.config.max_extract_side_px == 4096
    assert info.limits.max_extract_pixels == graph.config.max_extract_pixels == 2048 * 2048
    assert "CPUExecutionProvider" in info.execution_providers
    assert info.reconstruction_device == "cpu"


def status_of(graph: Graph, request: pb.BlendRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        events(graph.stub().Blend(request, timeout=60))
    return caught.value


ASTRONAUT = ("content/astronaut.jpg", 0.0, 1.0)
STARRY = ("style/starry_night.jpg", 1.0, 0.0)


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (
            small_blend(source(*ASTRONAUT), pb.Source(data=b"GIF89a broken", style_weight=1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"sources\[1\] image: not a readable image",
        ),
        (
            small_blend(source(*ASTRONAUT), source("style/starry_night.jpg", -0.5, 0.0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"sources\[1\]\.style_weight must be a finite number >= 0, got -0.5",
        ),
        (
            small_blend(source("content/astronaut.jpg", 0.0, math.nan), source(*STARRY)),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"sources\[0\]\.content_weight .* got nan",
        ),
        (
            small_blend(source(*ASTRONAUT), source("style/starry_night.jpg", None, 0.0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"sources\[1\]\.style_weight is missing",
        ),
        (
            small_blend(source(*ASTRONAUT), source(*STARRY), style_layers=["relu9_9"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"style_layers: unknown layer\(s\) relu9_9; vgg19 has relu1_1, relu1_2, .*relu5_4",
        ),
        (
            small_blend(source(*ASTRONAUT), source(*STARRY), max_side_px=4096),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            r"max_side_px 4096 is over the limit of 512",
        ),
        (
            small_blend(source(*ASTRONAUT), source(*STARRY), iterations=10_000),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            r"iterations 10000 is over the limit of 500",
        ),
        (
            small_blend(*[source(*STARRY)] * 5),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            r"sources: 5 is over the limit of 4",
        ),
        (
            small_blend(source("content/astronaut.jpg", 0.0, 0.0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"nothing to blend",
        ),
        (
            small_blend(
                source(*ASTRONAUT), pb.Source(upload_id="feed", style_weight=1, content_weight=0)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"sources\[1\]\.upload_id: no upload 'feed'",
        ),
        (
            small_blend(source(*ASTRONAUT), source(*STARRY), optimizer=9),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"optimizer: 9 is not one of OPTIMIZER_LBFGS, OPTIMIZER_ADAM",
        ),
    ],
    ids=[
        "corrupt-image",
        "negative-weight",
        "nan-weight",
        "missing-weight",
        "unknown-layer",
        "too-large",
        "too-many-iterations",
        "too-many-sources",
        "all-zero",
        "unknown-upload",
        "unknown-optimizer",
    ],
)
def test_bad_requests_get_a_status_and_a_message(
    graph: Graph, request_: pb.BlendRequest, code: grpc.StatusCode, message: str
) -> None:
    error = status_of(graph, request_)
    assert error.code() == code
    assert re.search(message, str(error.details())), str(error.details())


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(graph: Graph) -> None:
    from tests.common.test_images import png_header_only

    bomb = pb.Source(data=png_header_only(30_000, 30_000), style_weight=1.0, content_weight=0.0)
    error = status_of(graph, small_blend(source(*ASTRONAUT), bomb))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "sources[1] image: 30000×30000 = 900,000,000 pixels is over the limit of 40,000,000" in (
        str(error.details())
    )


def test_a_request_over_the_byte_limit_is_refused(graph: Graph) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1100, 1100, 3), dtype=np.uint8)
    big = pb.Source(data=images.encode(noise), style_weight=1.0, content_weight=0.0)
    assert big.ByteSize() > graph.config.max_request_bytes
    error = status_of(graph, small_blend(source(*ASTRONAUT), big))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in str(error.details())
