"""The gateway's bearer token: gRPC calls, the CLI, the Node client and the studio's bridge."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from styleblend.v1 import styleblend_pb2 as pb
from styleblend.v1 import styleblend_pb2_grpc

from clients.cli.main import main as cli
from services.common.config import GatewayConfig
from services.common.security import bearer_token, token_matches
from services.common.server import RunningServer, start_server
from services.gateway.web import WebServer, start_web
from tests.conftest import ROOT, SAMPLES, Graph, address
from tests.security.conftest import tiny_blend

TOKEN = "correct-horse-battery-staple"
MiB = 1024 * 1024


@dataclass
class Guarded:
    server: RunningServer
    studio: WebServer

    @property
    def address(self) -> str:
        return address(self.server)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.studio.port}/"


@pytest.fixture(scope="module")
def guarded(graph: Graph) -> Iterator[Guarded]:
    """A gateway over the graph that asks for TOKEN, and the studio's bridge in front of it."""
    from services.graph import build_gateway

    config = GatewayConfig(
        gateway_port=0,
        features_address=address(graph.features),
        blending_address=address(graph.blending),
        reconstruction_address=address(graph.reconstruction),
        gateway_token=TOKEN,
        internal_token=graph.internal_token,
    )
    server = start_server(
        lambda _: [build_gateway(config)],
        address="127.0.0.1:0",
        max_message_bytes=config.max_request_bytes,
        token=TOKEN,
    )
    studio = start_web("127.0.0.1", 0, address(server))
    yield Guarded(server, studio)
    studio.stop()
    server.stop(0)


def stub(target: str) -> styleblend_pb2_grpc.StyleBlendStub:
    return styleblend_pb2_grpc.StyleBlendStub(grpc.insecure_channel(target))


def test_bearer_token_parsing_and_comparison() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    # The scheme is case-insensitive (RFC 7235); the token is taken as it is, spaces and all.
    assert bearer_token([("authorization", "bearer abc")]) == "abc"
    assert bearer_token([("authorization", "BEARER abc")]) == "abc"
    assert bearer_token([("authorization", "bearer  abc ")]) == " abc "
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("authorization", "Bearer ")]) is None
    assert bearer_token(None) is None
    assert token_matches("abc", "abc")
    assert not token_matches("abd", "abc") and not token_matches(None, "abc")


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "this gateway needs a token"),
        ((("authorization", "Bearer wrong"),), "the token is not valid"),
        ((("authorization", TOKEN),), "this gateway needs a token"),  # no scheme: no token
        ((("authorization", f"Bearer  {TOKEN}"),), "the token is not valid"),  # padded
        ((("authorization", f"Bearer {TOKEN} "),), "the token is not valid"),
    ],
    ids=["missing", "wrong", "no-scheme", "padded", "trailing-space"],
)
def test_calls_without_the_token_are_unauthenticated(
    guarded: Guarded, metadata: tuple[tuple[str, str], ...], message: str
) -> None:
    client = stub(guarded.address)
    with pytest.raises(grpc.RpcError) as caught:
        client.GetInfo(pb.GetInfoRequest(), metadata=metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in str(caught.value.details())
    with pytest.raises(grpc.RpcError) as caught:  # a stream is refused before any work
        list(client.Blend(tiny_blend(), metadata=metadata, timeout=10))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("scheme", ["bearer", "BEARER"])
def test_the_scheme_is_case_insensitive(guarded: Guarded, scheme: str) -> None:
    metadata = (("authorization", f"{scheme} {TOKEN}"),)
    assert stub(guarded.address).GetInfo(pb.GetInfoRequest(), metadata=metadata, timeout=30).model


def test_the_right_token_opens_every_call(guarded: Guarded) -> None:
    client, metadata = stub(guarded.address), (("authorization", f"Bearer {TOKEN}"),)
    assert client.GetInfo(pb.GetInfoRequest(), metadata=metadata, timeout=30).model == "vgg19"
    events = [r.event for r in client.Blend(tiny_blend(), metadata=metadata, timeout=120)]
    assert events[-1].result.stats.iterations == 2


def test_health_and_reflection_stay_open(guarded: Guarded) -> None:
    with grpc.insecure_channel(guarded.address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (listing,) = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for s in listing.list_services_response.service}
        assert "styleblend.v1.StyleBlend" in names


def test_the_cli_sends_its_token(
    guarded: Guarded, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STYLEBLEND_TOKEN", raising=False)
    assert cli(["info", "--gateway", guarded.address]) == 1
    err = capsys.readouterr().err
    assert "error (UNAUTHENTICATED): this gateway needs a token" in err
    assert "--token" in err
    assert cli(["info", "--gateway", guarded.address, "--token", TOKEN]) == 0
    assert "vgg19" in capsys.readouterr().out


def test_the_cli_reads_the_token_from_the_environment(
    guarded: Guarded, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STYLEBLEND_TOKEN", TOKEN)
    assert cli(["info", "--gateway", guarded.address]) == 0
    assert "vgg19" in capsys.readouterr().out


NODE = shutil.which("node")


@pytest.mark.skipif(
    NODE is None or not (ROOT / "clients" / "node" / "node_modules").is_dir(),
    reason="needs node and clients/node/node_modules",
)
def test_the_node_client_sends_its_token(guarded: Guarded, tmp_path: Path) -> None:
    assert NODE is not None
    args = [
        NODE, str(ROOT / "clients" / "node" / "blend.js"), "--gateway", guarded.address,
        "--source", f"{SAMPLES / 'content' / 'coffee.jpg'}:content=1",
        "--source", f"{SAMPLES / 'style' / 'grass.jpg'}:style=1",
        "--size", "48", "--iterations", "2", "-o", str(tmp_path / "out.png"),
    ]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin"}
    refused = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 1
    assert "error (UNAUTHENTICATED): this gateway needs a token" in refused.stderr
    done = subprocess.run(
        [*args, "--token", TOKEN], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")


def http(url: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_bridge_passes_the_pages_token_on_http(guarded: Guarded) -> None:
    status, body = http(guarded.url + "api/info")
    assert status == 401
    assert body["error"]["code"] == "UNAUTHENTICATED"  # type: ignore[index]
    status, body = http(guarded.url + "api/info", "wrong")
    assert (status, body["error"]["code"]) == (401, "UNAUTHENTICATED")  # type: ignore[index]
    status, body = http(guarded.url + "api/info", TOKEN)
    assert status == 200 and body["model"] == "vgg19"
    # The page itself and the samples are not secret: they load without a token.
    with urllib.request.urlopen(guarded.url, timeout=30) as page:
        assert page.status == 200


async def session_frames(url: str, *frames: str) -> list[dict[str, object]]:
    received: list[dict[str, object]] = []
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(url + "ws/session", max_msg_size=64 * MiB) as socket,
    ):
        for frame in frames:
            await socket.send_str(frame)
        async for message in socket:
            received.append(json.loads(message.data))
    return received


def test_the_bridge_takes_the_token_as_the_first_frame(guarded: Guarded) -> None:
    start = json_format.MessageToJson(pb.SessionRequest(start=tiny_blend()))
    refused = asyncio.run(session_frames(guarded.url, start))
    assert refused[-1]["error"]["code"] == "UNAUTHENTICATED"  # type: ignore[index]
    wrong = asyncio.run(session_frames(guarded.url, json.dumps({"token": "wrong"}), start))
    assert wrong[-1]["error"]["code"] == "UNAUTHENTICATED"  # type: ignore[index]
    finish = json_format.MessageToJson(pb.SessionRequest(finish=pb.FinishSession()))
    frames = asyncio.run(session_frames(guarded.url, json.dumps({"token": TOKEN}), start, finish))
    assert not [f for f in frames if "error" in f], frames
    assert "result" in frames[-1]["event"]  # type: ignore[operator]
