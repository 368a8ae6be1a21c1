"""Only the studio's own page (and origins configured for a proxy) may drive the studio."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aiohttp
import pytest
from google.protobuf import json_format
from styleblend.v1 import styleblend_pb2 as pb
from yarl import URL

from services.common.config import GatewayConfig
from services.gateway.web import Origins, WebServer
from services.graph import start_studio
from tests.conftest import Graph, sample

REFUSED_START = json_format.MessageToJson(pb.SessionRequest(start=pb.BlendRequest()))
SOURCES_NEEDED = "sources: at least one source is needed"


async def first_frame(url: str, headers: dict[str, str]) -> dict[str, object] | int:
    """Open the session socket with `headers` and send a start the gateway refuses: its error
    frame if the upgrade was taken, else the upgrade's HTTP status."""
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(URL(url) / "ws/session", headers=headers) as socket:
                await socket.send_str(REFUSED_START)
                message = await socket.receive(timeout=30)
                return json.loads(message.data)
        except aiohttp.WSServerHandshakeError as refused:
            return refused.status


async def upload(url: str, headers: dict[str, str]) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            URL(url) / "api/upload", data=sample("content/chelsea.jpg"), headers=headers
        ) as response,
    ):
        return response.status


def talk(url: str, **headers: str) -> dict[str, object] | int:
    return asyncio.run(first_frame(url, headers))


@pytest.fixture(scope="module")
def proxied(graph: Graph) -> Iterator[str]:
    """The studio as the gateway starts it, told (as STYLEBLEND_STUDIO_ORIGINS would) of a proxy."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(
            "STYLEBLEND_STUDIO_ORIGINS", "https://studio.example.org, http://proxy.test:8443/"
        )
        config = GatewayConfig(http_port=0)
    studio: WebServer = start_studio(config, graph.gateway.port)
    yield f"http://127.0.0.1:{studio.port}/"
    studio.stop()


def refused_start(frame: dict[str, object] | int) -> bool:
    return frame == {"error": {"code": "INVALID_ARGUMENT", "message": SOURCES_NEEDED}}


def test_another_page_may_not_open_the_socket(studio_url: str) -> None:
    assert talk(studio_url, Origin="http://evil.example") == 403
    assert talk(studio_url, Origin="null") == 403  # a sandboxed frame or a file
    port = URL(studio_url).port
    assert talk(studio_url, Origin="http://127.0.0.1:1") == 403  # another local server
    # DNS rebinding: evil.example resolved to 127.0.0.1, so the Host names it too.
    assert (
        talk(studio_url, Origin=f"http://evil.example:{port}", Host=f"evil.example:{port}") == 403
    )


def test_the_studio_s_own_page_and_non_browsers_may(studio_url: str) -> None:
    port = URL(studio_url).port
    assert refused_start(talk(studio_url, Origin=f"http://127.0.0.1:{port}"))
    localhost = f"http://localhost:{port}/"
    assert refused_start(talk(localhost, Origin=f"http://localhost:{port}"))
    assert refused_start(talk(studio_url))  # no Origin: not a page in a browser


def test_a_configured_origin_may(proxied: str) -> None:
    assert refused_start(talk(proxied, Origin="https://studio.example.org"))
    assert refused_start(talk(proxied, Origin="http://proxy.test:8443"))
    assert talk(proxied, Origin="https://studio.example.org:444") == 403
    assert talk(proxied, Origin="http://evil.example") == 403


def test_uploads_follow_the_same_rule_and_reads_stay_open(studio_url: str) -> None:
    port = URL(studio_url).port
    assert asyncio.run(upload(studio_url, {"Origin": "http://evil.example"})) == 403
    assert asyncio.run(upload(studio_url, {"Origin": f"http://127.0.0.1:{port}"})) == 200
    assert asyncio.run(upload(studio_url, {})) == 200

    async def info() -> int:
        async with (
            aiohttp.ClientSession() as http,
            http.get(URL(studio_url) / "api/info", headers={"Origin": "http://evil.example"}) as r,
        ):
            return r.status

    assert asyncio.run(info()) == 200  # no CORS headers: the other page cannot read it


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
        ("http://LOCALHOST:8080", "localhost:8080", True),
        ("http://[::1]:8080", "[::1]:8080", True),
        ("http://192.168.1.5:9090", "192.168.1.5:9090", True),  # reached by address, port-mapped
        ("http://studio.lan:8080", "studio.lan:8080", True),  # the name it was told to listen on
        ("http://localhost:8080", "127.0.0.1:8080", False),
        ("http://other.lan:8080", "other.lan:8080", False),
        ("https://127.0.0.1:8080", "127.0.0.1:8080", False),
        ("http://127.0.0.1:8080/path", "127.0.0.1:8080", False),
        (None, "127.0.0.1:8080", True),
    ],
)
def test_own_origin_means_an_address_or_a_name_no_dns_can_move(
    origin: str | None, host: str, allowed: bool
) -> None:
    assert Origins("studio.lan").allows(origin, "http", host) is allowed
