"""Uploads (issue 12 §6): decoded in full before they are stored, and one client's uploads
never push out another's."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from styleblend.v1 import styleblend_pb2 as pb
from styleblend.v1 import styleblend_pb2_grpc

from services.common import images
from services.common.config import GatewayConfig
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.server import RunningServer
from services.gateway.core import Gateway
from services.gateway.upstream import Upstreams
from tests.conftest import Graph, address, start_gateway

KiB = 1024


def noise_png(seed: int, side: int = 40) -> bytes:
    """4.8 KiB and a little at 40 px."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return images.encode(pixels, "PNG", compress_level=0)  # the same size for every seed


def truncated_png() -> bytes:
    data = noise_png(99, 64)
    return data[: len(data) // 2]


SIZE = len(noise_png(0))


def gateway(store: int, per_client: int | None = None) -> Gateway:
    config = GatewayConfig(upload_store_bytes=store, upload_bytes_per_client=per_client)
    return Gateway(config, Upstreams(config))  # the upstreams are never called by an upload


def held(gateway: Gateway, uploads: list[str]) -> list[bool]:
    return [gateway.uploaded(upload_id) is not None for upload_id in uploads]


def test_an_image_that_does_not_decode_is_refused_at_upload_and_not_stored() -> None:
    core = gateway(100 * KiB)
    data = truncated_png()
    assert images.probe(data, "x", 10**6).width == 64  # its header reads
    with pytest.raises(InvalidArgument) as caught:
        core.upload(data, "alice")
    message = str(caught.value)
    assert message.startswith("the uploaded image: cannot decode the image (")
    assert "truncated" in message and "BytesIO" not in message
    assert core.uploaded(images.sha256(data)) is None and core.uploads.held_bytes == 0


def test_one_clients_uploads_do_not_evict_anothers() -> None:
    core = gateway(store=10 * SIZE, per_client=3 * SIZE)
    alice = [core.upload(noise_png(k), "alice").upload_id for k in range(3)]
    bob = [core.upload(noise_png(100 + k), "bob").upload_id for k in range(20)]
    assert held(core, alice) == [True] * 3
    assert held(core, bob) == [False] * 17 + [True] * 3  # bob's own oldest made room
    assert core.uploads.used_by("bob") <= 3 * SIZE


def test_the_quota_defaults_to_a_quarter_of_the_store() -> None:
    core = gateway(store=8 * SIZE)
    assert core.uploads.quota_bytes == 2 * SIZE
    first = [core.upload(noise_png(k), "alice").upload_id for k in range(3)]
    assert held(core, first) == [False, True, True]


def test_an_image_over_the_quota_is_refused_and_changes_nothing() -> None:
    core = gateway(store=10 * SIZE, per_client=2 * SIZE)
    mine = [core.upload(noise_png(k), "alice").upload_id for k in range(2)]
    big = noise_png(7, side=80)
    assert len(big) > 2 * SIZE
    with pytest.raises(ResourceExhausted) as caught:
        core.upload(big, "alice")
    assert str(caught.value) == (
        f"the uploaded image: {len(big):,} bytes is over the upload quota of {2 * SIZE:,} "
        "bytes a client (STYLEBLEND_UPLOAD_BYTES_PER_CLIENT)"
    )
    assert held(core, mine) == [True, True] and core.uploads.used_by("alice") == 2 * SIZE


def test_a_full_store_takes_room_from_the_client_holding_most() -> None:
    core = gateway(store=6 * SIZE, per_client=4 * SIZE)
    alice = [core.upload(noise_png(k), "alice").upload_id for k in range(2)]
    bob = [core.upload(noise_png(100 + k), "bob").upload_id for k in range(4)]
    carol = core.upload(noise_png(200), "carol").upload_id  # the store is full: bob gives
    assert held(core, alice) == [True, True] and held(core, [carol]) == [True]
    assert held(core, bob) == [False, True, True, True]
    assert core.uploads.held_bytes <= 6 * SIZE


def test_the_same_image_from_two_clients_stays_while_either_holds_it() -> None:
    core = gateway(store=10 * SIZE, per_client=2 * SIZE)
    shared = core.upload(noise_png(0), "alice").upload_id
    assert core.upload(noise_png(0), "bob").upload_id == shared
    assert core.uploads.held_bytes == SIZE  # held once, charged to both
    for k in range(2):  # alice's quota pushes out her own oldest: the shared one
        core.upload(noise_png(10 + k), "alice")
    assert core.uploaded(shared) is not None  # bob still holds it
    assert core.uploads.used_by("alice") == 2 * SIZE and core.uploads.used_by("bob") == SIZE


@pytest.fixture
def small_store(graph: Graph) -> Iterator[RunningServer]:
    server, _ = start_gateway(
        {
            "features": address(graph.features),
            "blending": address(graph.blending),
            "reconstruction": address(graph.reconstruction),
        },
        upload_store_bytes=10 * SIZE,
        upload_bytes_per_client=2 * SIZE,
    )
    yield server
    server.stop(0)


def test_over_the_wire_each_client_has_its_quota(small_store: RunningServer) -> None:
    """Clients named by a bridge on loopback (x-styleblend-client), as the studio names them."""
    with grpc.insecure_channel(address(small_store)) as channel:
        stub = styleblend_pb2_grpc.StyleBlendStub(channel)

        def upload(data: bytes, client: str) -> pb.UploadImageResponse:
            request = pb.UploadImageRequest(data=data)
            return stub.UploadImage(request, metadata=(("x-styleblend-client", client),))

        first = upload(noise_png(0), "browser-a")
        assert (first.width_px, first.height_px) == (40, 40)
        for k in range(5):
            upload(noise_png(100 + k), "browser-b")
        with pytest.raises(grpc.RpcError) as caught:
            upload(noise_png(7, side=80), "browser-b")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "STYLEBLEND_UPLOAD_BYTES_PER_CLIENT" in str(caught.value.details())
        with pytest.raises(grpc.RpcError) as caught:
            upload(truncated_png(), "browser-a")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(caught.value.details()).startswith("the uploaded image: cannot decode")
        # browser-a's upload is still there: a blend that names it is planned, not refused.
        request = pb.BlendRequest(
            sources=[pb.Source(upload_id=first.upload_id, style_weight=1, content_weight=1)],
            max_side_px=32,
            iterations=1,
        )
        events = [response.event for response in stub.Blend(request, timeout=120)]
        assert events[-1].HasField("result")
