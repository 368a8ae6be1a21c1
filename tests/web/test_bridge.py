"""The bridge without a browser: the proto's JSON on the socket, the gateway's errors as frames."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import aiohttp
import pytest
from google.protobuf import json_format
from styleblend.v1 import styleblend_pb2 as pb

from services.common.security import loopback_address
from services.gateway.web import start_web
from tests.conftest import SAMPLES, Graph, sample
from tests.gateway.test_graph import reconstruction_threads, small_blend, source

MiB = 1024 * 1024


def get(url: str, data: bytes | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, data=data, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def start_frame(request: pb.BlendRequest) -> str:
    return json_format.MessageToJson(pb.SessionRequest(start=request))


async def converse(
    url: str, *frames: str, close_after: int | None = None
) -> list[dict[str, object]]:
    """Send frames on a session socket and read what comes back until the server closes it.

    With `close_after`, the client closes the socket itself after that many progress events.
    """
    received: list[dict[str, object]] = []
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url + "ws/session", max_msg_size=64 * MiB) as socket,
    ):
        for frame in frames:
            await socket.send_str(frame)
        async for message in socket:
            received.append(json.loads(message.data))
            progress = [f for f in received if "progress" in f.get("event", {})]  # type: ignore[operator]
            if close_after is not None and len(progress) >= close_after:
                break
    return received


def events(frames: list[dict[str, object]]) -> list[pb.BlendEvent]:
    """Every non-error frame, read as the proto says it is: a SessionResponse."""
    return [
        json_format.ParseDict(f, pb.SessionResponse()).event for f in frames if "error" not in f
    ]


@pytest.fixture(scope="module")
def nowhere() -> Iterator[str]:
    """A bridge to a gateway that is not there."""
    server = start_web("127.0.0.1", 0, "127.0.0.1:1")
    yield f"http://127.0.0.1:{server.port}/"
    server.stop()


def test_info_is_the_gateway_s_in_json(studio_url: str, graph: Graph) -> None:
    status, body = get(studio_url + "api/info")
    info = json_format.Parse(body, pb.GetInfoResponse())
    assert status == 200
    assert info.model == "vgg19"
    assert info.limits.max_side_px == graph.config.max_side_px


def test_samples_are_listed_and_served(studio_url: str) -> None:
    status, body = get(studio_url + "api/samples")
    listing = json.loads(body)
    assert status == 200
    for kind in ("content", "style"):
        names = [entry["name"] for entry in listing[kind]]
        assert names == sorted(path.name for path in (SAMPLES / kind).glob("*.jpg"))
        for entry in listing[kind]:
            assert get(studio_url + entry["url"]) == (200, sample(f"{kind}/{entry['name']}"))
    assert get(studio_url)[1].startswith(b"<!doctype html>")
    assert get(studio_url + "../pyproject.toml")[0] == 404


def test_an_upload_is_named_by_its_hash_and_a_bad_one_is_refused(studio_url: str) -> None:
    image = sample("content/chelsea.jpg")
    status, body = get(studio_url + "api/upload", data=image)
    uploaded = json_format.Parse(body, pb.UploadImageResponse())
    assert status == 200
    assert uploaded.upload_id == hashlib.sha256(image).hexdigest()
    assert uploaded.width_px > 0 and uploaded.height_px > 0

    status, body = get(studio_url + "api/upload", data=b"not an image")
    assert status == 400
    assert json.loads(body)["error"]["code"] == "INVALID_ARGUMENT"


def test_a_session_speaks_the_proto_s_json_and_survives_a_bad_frame(studio_url: str) -> None:
    request = small_blend(
        source("content/chelsea.jpg", 0, 1),
        source("style/starry_night.jpg", 1, 0),
        iterations=12,
        preview_every=4,
    )
    frames = asyncio.run(converse(studio_url, "{not json", start_frame(request)))
    assert frames[0]["error"]["code"] == "INVALID_ARGUMENT"  # type: ignore[index]
    stream = events(frames[1:])
    assert [e.progress.iteration for e in stream if e.HasField("progress")] == list(range(1, 13))
    assert [e.preview.iteration for e in stream if e.HasField("preview")] == [4, 8]
    assert stream[-1].HasField("result") and stream[-1].result.image.startswith(b"\x89PNG")


def test_a_refused_start_arrives_as_an_error_frame(studio_url: str) -> None:
    frames = asyncio.run(converse(studio_url, start_frame(pb.BlendRequest())))
    assert frames == [
        {"error": {"code": "INVALID_ARGUMENT", "message": "sources: at least one source is needed"}}
    ]


@pytest.mark.parametrize("depth", [5000, 40])  # past Python's parser, and past the limit only
def test_deeply_nested_json_is_refused_in_words_and_closes_the_socket(
    studio_url: str, depth: int
) -> None:
    nested = "[" * depth + "]" * depth
    # Bounded: a bridge that answered and kept the socket open would otherwise hang the test.
    frames = asyncio.run(asyncio.wait_for(converse(studio_url, nested), timeout=30))
    assert frames == [
        {
            "error": {
                "code": "INVALID_ARGUMENT",
                "message": "the frame's JSON nests more than 32 levels deep; no request does",
            }
        }
    ]


def test_closing_the_socket_stops_the_reconstruction(studio_url: str) -> None:
    request = small_blend(
        source("content/astronaut.jpg", 0, 1), source("style/the_scream.jpg", 1, 0), iterations=500
    )
    frames = asyncio.run(converse(studio_url, start_frame(request), close_after=2))
    assert len(events(frames)) >= 2
    deadline = time.monotonic() + 10
    while reconstruction_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reconstruction_threads() == 0


def test_a_missing_gateway_is_reported_not_hung(nowhere: str) -> None:
    status, body = get(nowhere + "api/info")
    assert status == 503
    assert json.loads(body)["error"]["code"] == "UNAVAILABLE"
    request = small_blend(source("content/coffee.jpg", 1, 1))
    (frame,) = asyncio.run(converse(nowhere, start_frame(request)))
    assert frame["error"]["code"] == "UNAVAILABLE"  # type: ignore[index]


def test_stopping_the_bridge_closes_its_sessions_and_their_runs(graph: Graph) -> None:
    server = start_web("127.0.0.1", 0, graph.address)
    url = f"http://127.0.0.1:{server.port}/ws/session"
    request = small_blend(
        source("content/chelsea.jpg", 0, 1), source("style/grass.jpg", 1, 0), iterations=500
    )

    async def stop_mid_run() -> list[dict[str, object]]:
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as socket:
            await socket.send_str(start_frame(request))
            async for message in socket:
                if "progress" in json.loads(message.data).get("event", {}):
                    break
            await asyncio.to_thread(server.stop)
            return [json.loads(message.data) async for message in socket]

    frames = asyncio.run(stop_mid_run())
    assert frames[-1]["error"] == {  # the page can say why its session ended
        "code": "UNAVAILABLE",
        "message": "the studio server is stopping; try again shortly",
    }
    deadline = time.monotonic() + 10
    while reconstruction_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reconstruction_threads() == 0


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1:50051"),
        ("0.0.0.0", "127.0.0.1:50051"),
        ("::", "127.0.0.1:50051"),
        ("::1", "[::1]:50051"),
        ("gateway.local", "gateway.local:50051"),
    ],
)
def test_the_bridge_dials_a_wildcard_gateway_on_loopback(host: str, address: str) -> None:
    assert loopback_address(host, 50051) == address
