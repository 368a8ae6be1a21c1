"""Tensors by reference: the gateway moves keys and weights, the services fetch from each other,
and whatever a service no longer holds is sent again, recomputed, or refused in words."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from styleblend.internal.v1 import (
    blending_pb2,
    blending_pb2_grpc,
    features_pb2,
    features_pb2_grpc,
)
from styleblend.v1 import styleblend_pb2 as pb
from styleblend.v1 import styleblend_pb2_grpc

from services.blending.servicer import BlendingServicer
from services.common import images
from services.common.channels import BlendedTargets, FeatureTensors
from services.common.config import BlendingConfig, FeaturesConfig
from services.common.errors import NotHeld, Unavailable
from services.common.metrics import ServiceMetrics
from services.common.server import RunningServer
from services.features.servicer import FeaturesServicer
from services.gateway.core import Gateway
from services.gateway.servicer import style_blend_servicer
from services.gateway.upstream import Upstreams
from services.graph import build_blending, build_features
from services.reconstruction.servicer import ReconstructionServicer, reconstruction_servicer
from tests.conftest import (
    INTERNAL_TOKEN,
    Graph,
    address,
    internal_metadata,
    sample,
    serve,
    start_gateway,
)
from tests.gateway.test_fast import pixels
from tests.gateway.test_graph import source
from tests.gateway.test_session import SCREAM, STARRY, blend, half_mask
from tests.reliability.processes import free_port

CONTENT = "content/astronaut.jpg"
UNKNOWN = "0" * 64
SERVICE_NAMES = ("features", "blending", "reconstruction")


def not_held_kind(error: grpc.RpcError) -> str | None:
    assert isinstance(error, grpc.Call)
    return dict(error.trailing_metadata() or ()).get(NotHeld.METADATA_KEY)


def features_stub(graph: Graph) -> features_pb2_grpc.FeaturesServiceStub:
    return features_pb2_grpc.FeaturesServiceStub(grpc.insecure_channel(address(graph.features)))


def blending_stub(graph: Graph) -> blending_pb2_grpc.BlendingServiceStub:
    return blending_pb2_grpc.BlendingServiceStub(grpc.insecure_channel(address(graph.blending)))


def test_references_nobody_holds_are_failed_precondition_saying_what(graph: Graph) -> None:
    metadata = internal_metadata(graph)
    calls: list[tuple[Callable[[], object], str, str]] = [
        (
            lambda: features_stub(graph).FetchTensors(
                features_pb2.FetchTensorsRequest(keys=[UNKNOWN]), metadata=metadata
            ),
            "tensor",
            "no longer held by the features service",
        ),
        (
            lambda: blending_stub(graph).FetchTargets(
                blending_pb2.FetchTargetsRequest(key=UNKNOWN), metadata=metadata
            ),
            "targets",
            "no longer held by the blending service",
        ),
        (
            lambda: features_stub(graph).Extract(
                features_pb2.ExtractRequest(
                    image_sha256=UNKNOWN, width_px=64, height_px=64, gram_layers=["relu1_1"]
                ),
                metadata=metadata,
            ),
            "image",
            "image: image 000000000000… is not held by the features service",
        ),
        (  # blending asks features for a tensor it never made: the kind comes back through
            lambda: blending_stub(graph).BlendTargets(
                blending_pb2.BlendTargetsRequest(
                    sources=[
                        blending_pb2.SourceFeatures(gram_keys={"relu1_1": UNKNOWN}, style_weight=1)
                    ],
                    width_px=64,
                    height_px=64,
                    by_reference=True,
                ),
                metadata=metadata,
            ),
            "tensor",
            "no longer held by the features service; extract them again",
        ),
    ]
    for call, kind, words in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, kind
        assert not_held_kind(caught.value) == kind
        assert words in str(caught.value.details())


def test_bytes_that_are_not_the_image_their_sha256_names_are_refused(graph: Graph) -> None:
    request = features_pb2.ExtractRequest(
        image=sample(STARRY), image_sha256=UNKNOWN, width_px=64, height_px=64,
        gram_layers=["relu1_1"],
    )  # fmt: skip
    with pytest.raises(grpc.RpcError) as caught:
        features_stub(graph).Extract(request, metadata=internal_metadata(graph))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image: the bytes' sha256 is" in str(caught.value.details())


def keyed_request(
    graph: Graph, style_weights: tuple[float, float]
) -> blending_pb2.BlendTargetsRequest:
    """Two style sources by their keys at the features service, with a map for the second."""
    sources = []
    for name, weight in zip((STARRY, SCREAM), style_weights, strict=True):
        extracted = features_stub(graph).Extract(
            features_pb2.ExtractRequest(
                image=sample(name), width_px=64, height_px=64,
                gram_layers=["relu1_1", "relu2_1"], by_reference=True,
            ),
            metadata=internal_metadata(graph),
        )  # fmt: skip
        assert not extracted.grams.tensors and set(extracted.gram_keys) == {"relu1_1", "relu2_1"}
        sources.append(
            blending_pb2.SourceFeatures(gram_keys=extracted.gram_keys, style_weight=weight)
        )
    sources[1].style_map = half_mask(left=True)
    return blending_pb2.BlendTargetsRequest(sources=sources, width_px=64, height_px=64)


def test_targets_by_reference_are_the_targets_inline(graph: Graph) -> None:
    """Keys name content: the same request gives the same key, and what blending keeps under
    it is, byte for byte, what it returns inline for the same tensors fetched by hand."""
    stub, metadata = blending_stub(graph), internal_metadata(graph)
    request = keyed_request(graph, (0.7, 0.3))
    request.by_reference = True
    first = stub.BlendTargets(request, metadata=metadata)
    again = stub.BlendTargets(request, metadata=metadata)
    assert first.key and first.key == again.key and not first.channels
    moved = keyed_request(graph, (0.4, 0.6))
    moved.by_reference = True
    assert stub.BlendTargets(moved, metadata=metadata).key != first.key
    kept = stub.FetchTargets(
        blending_pb2.FetchTargetsRequest(key=first.key), metadata=metadata
    ).targets

    inline = keyed_request(graph, (0.7, 0.3))
    for message in inline.sources:
        keys = dict(message.gram_keys)
        fetched = features_stub(graph).FetchTensors(
            features_pb2.FetchTensorsRequest(keys=list(keys.values())), metadata=metadata
        )
        message.ClearField("gram_keys")
        for layer, key in keys.items():
            message.grams.tensors[layer].CopyFrom(fetched.tensors[key])
    answer = stub.BlendTargets(inline, metadata=metadata)
    assert len(answer.channels) == 2 and answer.channels[0].grams.tensors["relu1_1"].data
    assert kept.SerializeToString(deterministic=True) == answer.SerializeToString(
        deterministic=True
    )


class FaultyUpstreams(Upstreams):
    """The gateway's real upstreams; after the `call`-th call of `method`, `fault` runs, as a
    full store or a restarted replica would drop what a service held."""

    def __init__(self, graph: Graph, method: str, call: int, fault: Callable[[], None]) -> None:
        super().__init__(graph.config)
        self.fault_at = {"method": method, "call": call, "calls": 0}
        self.fault = fault

    def _after(self, method: str) -> None:
        if method == self.fault_at["method"]:
            self.fault_at["calls"] += 1  # type: ignore[operator]
            if self.fault_at["calls"] == self.fault_at["call"]:
                self.fault()

    def extract(self, request: features_pb2.ExtractRequest) -> features_pb2.ExtractResponse:
        answer = super().extract(request)
        self._after("extract")
        return answer

    def blend_targets(
        self, request: blending_pb2.BlendTargetsRequest
    ) -> blending_pb2.BlendTargetsResponse:
        answer = super().blend_targets(request)
        self._after("blend_targets")
        return answer


def faulty_gateway(graph: Graph, upstreams: Upstreams) -> Iterator[RunningServer]:
    metrics = ServiceMetrics("gateway")
    server = serve(style_blend_servicer(Gateway(graph.config, upstreams), metrics), metrics=metrics)
    yield server
    server.stop(0)


def events_of(
    server: RunningServer, graph: Graph, *requests: pb.SessionRequest
) -> list[pb.BlendEvent]:
    """A session's events; the requests go first, and the client's side stays open to the end."""
    done = threading.Event()

    def sending() -> Iterator[pb.SessionRequest]:
        yield from requests
        done.wait(300)

    stub = styleblend_pb2_grpc.StyleBlendStub(grpc.insecure_channel(address(server)))
    try:
        return [response.event for response in stub.Session(sending(), timeout=300)]
    finally:
        done.set()


def services(graph: Graph) -> tuple[FeaturesServicer, BlendingServicer]:
    features = graph.servicers["features"].servicer
    blending = graph.servicers["blending"].servicer
    assert isinstance(features, FeaturesServicer) and isinstance(blending, BlendingServicer)
    return features, blending


def test_a_tensor_evicted_before_blending_fetches_it_is_extracted_again(graph: Graph) -> None:
    _, blending = services(graph)

    def evict() -> None:  # right after the first extraction: every kept tensor is gone
        graph.extractor.clear_cache()
        blending.fetched.clear()
        blending.targets.clear()  # else an earlier test's same blend is found by its key

    start = blend(sources=[source(CONTENT, 0, 1), source(STARRY, 1, 0)], iterations=5)
    passes = graph.extractor.forward_passes
    upstreams = FaultyUpstreams(graph, "extract", 1, evict)
    for server in faulty_gateway(graph, upstreams):
        events = events_of(server, graph, pb.SessionRequest(start=start))
    assert events[-1].HasField("result"), events[-1]
    assert not any(e.HasField("update_rejected") for e in events)
    # Blending found the content's tensors gone: both sources were extracted again, and
    # features ran the model for the content (evicted) and Starry Night (evicted too).
    assert upstreams.fault_at["calls"] == 4
    assert graph.extractor.forward_passes - passes >= 2


def test_targets_evicted_before_reconstruction_fetches_them_refuse_that_update_only(
    graph: Graph,
) -> None:
    _, blending = services(graph)
    evict = blending.targets.clear
    start = blend(sources=[source(CONTENT, 0, 1), source(STARRY, 1, 0)], iterations=30)
    updates = [  # at fixed iterations, so neither is coalesced into the other; new targets
        pb.SessionUpdate(
            update_id=n, at_iteration=at, sources=[pb.SourceUpdate(index=1, style_weight=weight)]
        )
        for n, at, weight in ((1, 10, 0.5), (2, 20, 0.8))
    ]
    requests = [pb.SessionRequest(start=start), *(pb.SessionRequest(update=u) for u in updates)]
    # blend_targets: call 1 is the start's, call 2 the first update's: evicted at once.
    for server in faulty_gateway(graph, FaultyUpstreams(graph, "blend_targets", 2, evict)):
        events = events_of(server, graph, *requests)
    rejected = [e.update_rejected for e in events if e.HasField("update_rejected")]
    assert [r.update_id for r in rejected] == [1]
    assert rejected[0].code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "no longer held by the blending service" in rejected[0].message
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.iteration for p in progress] == list(range(1, 31))  # the hold was let go
    assert {p.update_id for p in progress[19:]} == {2}
    assert all(p.update_id == 0 for p in progress[:19])
    assert events[-1].HasField("result")
    assert '"update_id": 1' not in events[-1].result.recipe_json


def test_images_a_service_lost_are_sent_again_and_the_update_applies(graph: Graph) -> None:
    features, blending = services(graph)

    def restart() -> None:  # as a new replica: neither service holds any image
        features.images.clear()
        blending.images.clear()

    start = blend(sources=[source(CONTENT, 0, 1), source(STARRY, 1, 0)], iterations=20)
    mapped = pb.SourceUpdate(index=1, style_map=pb.InfluenceMap(data=half_mask(left=False)))
    update = pb.SessionUpdate(update_id=1, at_iteration=8, sources=[mapped])
    requests = [pb.SessionRequest(start=start), pb.SessionRequest(update=update)]
    for server in faulty_gateway(graph, FaultyUpstreams(graph, "blend_targets", 1, restart)):
        events = events_of(server, graph, *requests)
    assert not any(e.HasField("update_rejected") for e in events)
    progress = [e.progress for e in events if e.HasField("progress")]
    assert {p.update_id for p in progress[7:]} == {1}
    assert features.images.nbytes >= len(sample(CONTENT))
    assert blending.images.nbytes > 0  # the map, sent again
    assert images.sha256(half_mask(left=False)) != images.sha256(half_mask(left=True))
    assert events[-1].HasField("result")


def test_the_gateway_carries_no_tensor_to_blending_or_reconstruction(graph: Graph) -> None:
    """What the gateway sends upstream for a session, seen on its own calls: keys, not
    tensors; images by sha256 once a service holds them."""
    sent: list[blending_pb2.BlendTargetsRequest | features_pb2.ExtractRequest] = []

    class Recording(Upstreams):
        def blend_targets(
            self, request: blending_pb2.BlendTargetsRequest
        ) -> blending_pb2.BlendTargetsResponse:
            sent.append(request)
            return super().blend_targets(request)

        def extract(self, request: features_pb2.ExtractRequest) -> features_pb2.ExtractResponse:
            sent.append(request)
            return super().extract(request)

    start = blend(sources=[source(CONTENT, 0, 1), source(STARRY, 1, 0)], iterations=4)
    for server in faulty_gateway(graph, Recording(graph.config)):
        events_of(server, graph, pb.SessionRequest(start=start))  # the images reach features
        sent.clear()
        events = events_of(server, graph, pb.SessionRequest(start=start))
    assert events[-1].HasField("result")
    blends = [m for m in sent if isinstance(m, blending_pb2.BlendTargetsRequest)]
    extracts = [m for m in sent if isinstance(m, features_pb2.ExtractRequest)]
    assert blends and extracts
    for message in blends:
        assert message.by_reference
        assert all(not s.grams.tensors and not s.features.tensors for s in message.sources)
        assert any(s.gram_keys or s.feature_keys for s in message.sources)
    assert all(m.by_reference and not m.image and m.image_sha256 for m in extracts)
    assert max(m.ByteSize() for m in sent) < 4096
    assert np.isfinite(events[-1].result.stats.final_losses.total)


def test_the_fast_path_sends_weights_and_map_sha256s_not_a_per_pixel_mix(graph: Graph) -> None:
    """With a style map the mix is N×H×W; features makes it from the weights and the map, so
    the gateway's Stylise carries neither the mix nor, once features holds them, any image."""
    sent: list[features_pb2.StyliseRequest] = []

    class Recording(Upstreams):
        def stylise(self, request: features_pb2.StyliseRequest) -> features_pb2.StyliseResponse:
            sent.append(request)
            return super().stylise(request)

    mapped = source(SCREAM, 1, 0)
    mapped.style_map.data = half_mask(left=True, width=96, height=64)
    request = pb.BlendRequest(
        sources=[source("content/chelsea.jpg", 0, 1), source(STARRY, 1, 0), mapped],
        max_side_px=96,
        fast=pb.FastOptions(model="test-model"),
    )
    inline = [r.event for r in graph.stub().Blend(request, timeout=60)]
    for server in faulty_gateway(graph, Recording(graph.config)):
        stub = styleblend_pb2_grpc.StyleBlendStub(grpc.insecure_channel(address(server)))
        events = [r.event for r in stub.Blend(request, timeout=60)]
    # The same network and the same mix as the gateway under test's own graph makes.
    np.testing.assert_array_equal(pixels(events[-1].result.image), pixels(inline[-1].result.image))
    (message,) = sent  # features held the images already: no second try with bytes
    assert not message.HasField("mix") and not message.image and message.image_sha256
    assert (
        message.style_mix.sources[2].style_map_sha256 and not message.style_mix.sources[2].style_map
    )
    assert message.ByteSize() < 1024


def test_each_fetch_goes_to_the_replica_that_holds_the_key(graph: Graph, vgg19_dir: Path) -> None:
    """Two replicas of features and of blending: the gateway reaches replica A of each, while
    blending's and reconstruction's own addresses name replica B (the shared graph's, emptied
    first). Each reference carries its holder's address, so every fetch finds its key at A."""
    _, blending_b = services(graph)
    graph.extractor.clear_cache()
    blending_b.targets.clear()
    blending_b.fetched.clear()
    config = FeaturesConfig(model="vgg19", model_dir=vgg19_dir.parent, fast_model_dir=vgg19_dir)
    features_a = build_features(config)
    wiring = BlendingConfig(features_address=address(graph.features), internal_token=INTERNAL_TOKEN)
    blending_a = build_blending(wiring)
    own = graph.servicers["reconstruction"].servicer
    assert isinstance(own, ReconstructionServicer)
    reconstruction = reconstruction_servicer(
        own.net, own.manifest, own.device, None, own.planner,
        BlendedTargets(wiring, address(graph.blending)),
    )  # fmt: skip
    servers = [serve(s) for s in (features_a, blending_a, reconstruction)]
    for server, servicer in zip(servers[:2], (features_a, blending_a), strict=True):
        servicer.servicer.holder = address(server)  # type: ignore[attr-defined]
    upstreams = {name: address(s) for name, s in zip(SERVICE_NAMES, servers, strict=True)}
    gateway, _ = start_gateway(upstreams)
    start = blend(sources=[source(CONTENT, 0, 1), source(STARRY, 1, 0)], iterations=12)
    move = pb.SessionUpdate(
        update_id=1, at_iteration=6, sources=[pb.SourceUpdate(index=1, style_weight=0.5)]
    )
    try:
        events = events_of(
            gateway, graph, pb.SessionRequest(start=start), pb.SessionRequest(update=move)
        )
    finally:
        for server in (gateway, *servers):
            server.stop(0)
    assert not any(e.HasField("update_rejected") for e in events), events
    progress = [e.progress for e in events if e.HasField("progress")]
    assert {p.update_id for p in progress[5:]} == {1}
    assert events[-1].HasField("result")
    assert graph.extractor.cache_bytes == 0 and blending_b.targets.nbytes == 0  # B held nothing
    assert features_a.servicer.extractor.forward_passes >= 2  # type: ignore[attr-defined]


def test_a_holder_that_is_gone_is_not_held_but_a_service_down_is_unavailable(graph: Graph) -> None:
    """A replica that went away took its tensors with it: the caller is told NotHeld and
    recomputes elsewhere. The service's own address not answering is the service down."""
    config = BlendingConfig(internal_token=INTERNAL_TOKEN, upstream_timeout_s=2.0)
    gone = f"127.0.0.1:{free_port()}"
    with pytest.raises(NotHeld) as caught:
        FeatureTensors(config, address(graph.features)).tensors([UNKNOWN], at=gone)
    assert caught.value.kind == "tensor"
    assert f"the features replica at {gone} that held it is gone" in str(caught.value)
    with pytest.raises(Unavailable):
        FeatureTensors(config, gone).tensors([UNKNOWN])
    with pytest.raises(NotHeld) as targets:  # and the same for blending's targets
        BlendedTargets(config, address(graph.blending)).targets(UNKNOWN, at=gone)
    assert targets.value.kind == "targets"


def test_a_refused_request_leaves_the_image_store_as_it_was(graph: Graph) -> None:
    """Bytes are kept only once the request they came with has succeeded."""
    features, _ = services(graph)
    features.images.clear()
    grass = sample("style/grass.jpg")
    refused = features_pb2.ExtractRequest(
        image=grass, width_px=64, height_px=64, gram_layers=["no_such_layer"]
    )
    with pytest.raises(grpc.RpcError) as caught:
        features_stub(graph).Extract(refused, metadata=internal_metadata(graph))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert features.images.nbytes == 0
    by_sha = features_pb2.ExtractRequest(
        image_sha256=images.sha256(grass), width_px=64, height_px=64, gram_layers=["relu1_1"]
    )
    with pytest.raises(grpc.RpcError) as missing:
        features_stub(graph).Extract(by_sha, metadata=internal_metadata(graph))
    assert not_held_kind(missing.value) == "image"
    refused.gram_layers[:] = ["relu1_1"]  # the same bytes, asked rightly: now they are kept
    features_stub(graph).Extract(refused, metadata=internal_metadata(graph))
    assert features.images.nbytes == len(grass)
    features_stub(graph).Extract(by_sha, metadata=internal_metadata(graph))
