"""Interactive blending through the public API: live updates, influence maps, colour, scales."""

from __future__ import annotations

import gc
import io
import os
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image
from styleblend.v1 import styleblend_pb2 as pb

from services.common import colour, images
from services.common.heap import malloc_trim
from tests.conftest import Graph, sample
from tests.gateway.test_graph import source, style_distance

STARRY, SCREAM = "style/starry_night.jpg", "style/the_scream.jpg"


def half_mask(left: bool, width: int = 64, height: int = 64) -> bytes:
    mask = np.zeros((height, width, 3), np.uint8)
    if left:
        mask[:, : width // 2] = 255
    else:
        mask[:, width // 2 :] = 255
    return images.encode(mask)


class Session:
    """A Session call driven from the test: send messages at any time, read events."""

    def __init__(self, graph: Graph, start: pb.BlendRequest) -> None:
        self._outgoing: queue.Queue[pb.SessionRequest | None] = queue.Queue()
        self._outgoing.put(pb.SessionRequest(start=start))
        self.call = graph.stub().Session(self._requests(), timeout=300)

    def _requests(self) -> Iterator[pb.SessionRequest]:
        while (message := self._outgoing.get()) is not None:
            yield message

    def send(self, message: pb.SessionRequest) -> None:
        self._outgoing.put(message)

    def events(self) -> Iterator[pb.BlendEvent]:
        try:
            for response in self.call:
                yield response.event
        finally:
            self._outgoing.put(None)


def blend(**fields: object) -> pb.BlendRequest:
    settings: dict[str, object] = {
        "max_side_px": 64,
        "iterations": 40,
        "seed": 5,
        "preview_every": 5,
    }
    settings.update(fields)
    return pb.BlendRequest(**settings)  # type: ignore[arg-type]


def run_session(
    graph: Graph, start: pb.BlendRequest, *updates: pb.SessionUpdate
) -> list[pb.BlendEvent]:
    session = Session(graph, start)
    for update in updates:
        session.send(pb.SessionRequest(update=update))
    return list(session.events())


def test_a_live_update_moves_the_result_toward_the_new_style(graph: Graph) -> None:
    from export.models import build_feature_net

    net, _ = build_feature_net("vgg19")
    start = blend(
        sources=[source("content/astronaut.jpg", 0, 1), source(STARRY, 1, 0), source(SCREAM, 0, 0)]
    )
    switch = pb.SessionUpdate(
        update_id=11,
        at_iteration=15,
        sources=[
            pb.SourceUpdate(index=1, style_weight=0),
            pb.SourceUpdate(index=2, style_weight=1),
        ],
    )
    switched = run_session(graph, start, switch)
    unswitched = run_session(graph, start)

    progress = [e.progress for e in switched if e.HasField("progress")]
    assert [p.iteration for p in progress] == list(range(1, 41))  # one run, never restarted
    assert {(p.update_id, p.update_iteration) for p in progress[14:]} == {(11, 15)}
    assert all(p.update_id == 0 for p in progress[:14])
    # The first preview after the update is at iteration 15: it reflects the new targets.
    scream = sample(SCREAM)
    result, baseline = switched[-1].result, unswitched[-1].result
    assert style_distance(result.image, scream, net) < style_distance(baseline.image, scream, net)
    assert '"at_iteration": 15' in result.recipe_json


def test_influence_maps_put_each_style_where_it_is_painted(graph: Graph) -> None:
    from export.models import build_feature_net

    net, _ = build_feature_net("vgg19")
    starry = source(STARRY, 1, 0)
    starry.style_map.data = half_mask(left=True)
    scream = source(SCREAM, 1, 0)
    scream.style_map.data = half_mask(left=False)
    request = blend(
        sources=[source("content/coffee.jpg", 0, 1), starry, scream],
        max_side_px=96,
        iterations=60,
        content_loss_weight=0.2,
    )
    result = [e for e in graph.stub().Blend(request, timeout=300)][-1].event.result
    image = np.asarray(Image.open(io.BytesIO(result.image)), np.float32) / 255
    half = image.shape[1] // 2
    left, right = image[:, :half], image[:, half:]

    def distance(part: np.ndarray, style: str) -> float:
        return style_distance(images.encode(part), sample(style), net)

    assert distance(left, STARRY) < distance(left, SCREAM)
    assert distance(right, SCREAM) < distance(right, STARRY)
    # Starry Night is blue, The Scream orange: each half's colour leans its own way.
    assert left[..., 2].mean() - left[..., 0].mean() > right[..., 2].mean() - right[..., 0].mean()


def chrominance_gap(result: pb.Result, content: str) -> float:
    pixels = np.asarray(Image.open(io.BytesIO(result.image)), np.float32) / 255
    photo = images.to_canvas(sample(content), result.width_px, result.height_px)
    return float(np.abs(colour.to_yiq(pixels)[..., 1:] - colour.to_yiq(photo)[..., 1:]).mean())


def mean_colour_gap(result: pb.Result, content: str) -> float:
    pixels = np.asarray(Image.open(io.BytesIO(result.image)), np.float32) / 255
    photo = images.to_canvas(sample(content), result.width_px, result.height_px)
    return float(np.abs(pixels.reshape(-1, 3).mean(0) - photo.reshape(-1, 3).mean(0)).sum())


def test_preserving_colour_keeps_the_contents_colours(graph: Graph) -> None:
    def run(mode: int) -> pb.Result:
        request = blend(
            sources=[source("content/chelsea.jpg", 0, 1), source(STARRY, 1, 0)],
            iterations=20,
            preserve_color=mode,
        )
        return list(graph.stub().Blend(request, timeout=300))[-1].event.result

    plain = run(pb.PRESERVE_COLOR_UNSPECIFIED)
    luminance = run(pb.PRESERVE_COLOR_LUMINANCE)
    histogram = run(pb.PRESERVE_COLOR_HISTOGRAM)
    assert chrominance_gap(luminance, "content/chelsea.jpg") < 0.005
    assert chrominance_gap(plain, "content/chelsea.jpg") > 0.03
    assert mean_colour_gap(histogram, "content/chelsea.jpg") < 0.5 * mean_colour_gap(
        plain, "content/chelsea.jpg"
    )


def test_coarse_to_fine_reaches_the_canvas_with_previews_at_every_scale(graph: Graph) -> None:
    request = blend(
        sources=[source("content/chelsea.jpg", 0, 1), source(STARRY, 1, 0)],
        max_side_px=128,
        scales=2,
        iterations_per_scale=[6, 4],
        preview_every=3,
    )
    events = [r.event for r in graph.stub().Blend(request, timeout=300)]
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [(p.scale, p.width_px, p.height_px) for p in progress] == [(0, 64, 42)] * 6 + [
        (1, 128, 85)
    ] * 4
    previews = [e.preview for e in events if e.HasField("preview")]
    assert [p.iteration for p in previews] == [3, 6, 9]
    assert {(p.width_px, p.height_px) for p in previews} == {(128, 85)}
    assert Image.open(io.BytesIO(previews[0].image)).size == (128, 85)
    assert Image.open(io.BytesIO(events[-1].result.image)).size == (128, 85)


def test_style_scale_changes_the_strokes_and_is_bounded(graph: Graph) -> None:
    def run(scale: float) -> bytes:
        request = blend(
            sources=[source("content/chelsea.jpg", 0, 1), source(STARRY, 1, 0)],
            iterations=5,
            style_scale=scale,
        )
        return list(graph.stub().Blend(request, timeout=300))[-1].event.result.image

    assert run(0.5) != run(2.0)
    with pytest.raises(grpc.RpcError) as caught:
        run(9.0)
    assert "style_scale must be within 0.25..4.0, got 9.0" in str(caught.value.details())


def settled_rss_bytes() -> int:
    """Resident memory once garbage is collected and malloc has handed free pages back."""
    gc.collect()
    malloc_trim()
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def alive(kind: type) -> int:
    return sum(type(thing) is kind for thing in gc.get_objects())


def test_cancelled_sessions_free_their_memory(graph: Graph) -> None:
    sessions = 25
    from services.gateway.run import BlendRun
    from services.reconstruction.core import Control

    start = blend(
        sources=[source("content/astronaut.jpg", 0, 1), source(STARRY, 1, 0)], iterations=500
    )

    def cancelled_session() -> None:
        session = Session(graph, start)
        for event in session.events():
            if event.HasField("progress"):
                session.call.cancel()
                break

    def session_threads() -> int:
        """Threads a session starts (the servers' worker pools grow on demand: not a leak)."""
        names = {"reconstruction", "session-follow", "gateway-pump", "gateway-updates"}
        return sum(thread.name in names for thread in threading.enumerate())

    def settle() -> None:
        """Wait, briefly, for the sessions' threads to end and their objects to go."""
        deadline = time.monotonic() + 30  # a hang guard: threads end later on a loaded machine
        while time.monotonic() < deadline and (session_threads() or alive(BlendRun)):
            time.sleep(0.05)
            gc.collect()

    for _ in range(5):  # warm up: caches and allocator pools reach their working size
        cancelled_session()
    settle()
    before = settled_rss_bytes()
    for _ in range(sessions):
        cancelled_session()
    settle()
    assert session_threads() == 0
    assert alive(BlendRun) == 0 and alive(Control) == 0  # nothing of any session is kept
    # A session's tensors (VGG activations at 256 px) are tens of MiB, so keeping any of them
    # would grow RSS by half a GiB or more over 25 sessions; the allocator's own drift,
    # measured over rounds of 50 with no trend, is 20 to 90 MiB.
    growth = settled_rss_bytes() - before
    assert growth < 256 * 1024 * 1024, f"grew by {growth / 2**20:.1f} MiB over {sessions} sessions"


def test_bad_updates_are_refused_and_the_session_goes_on(graph: Graph) -> None:
    start = blend(
        sources=[source("content/astronaut.jpg", 0, 1), source(STARRY, 1, 0)], iterations=30
    )
    garbage = pb.SourceUpdate(index=1, style_map=pb.InfluenceMap(data=b"not an image"))
    updates = [
        pb.SessionUpdate(update_id=1, sources=[garbage]),
        pb.SessionUpdate(update_id=2, sources=[pb.SourceUpdate(index=7, style_weight=1)]),
        pb.SessionUpdate(update_id=3, sources=[pb.SourceUpdate(index=1, style_weight=-2)]),
        pb.SessionUpdate(update_id=3, style_loss_weight=1),
        pb.SessionUpdate(update_id=4, style_loss_weight=2),  # a good one
    ]
    events = run_session(graph, start, *updates)
    rejected = {
        e.update_rejected.update_id: e.update_rejected
        for e in events
        if e.HasField("update_rejected")
    }
    assert set(rejected) == {1, 2, 3}
    assert rejected[1].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "update.sources[1].style_map image: not a readable image" in rejected[1].message
    assert "update.sources[7]: no such source; the session has 2" in rejected[2].message
    assert "update.sources[1].style_weight must be a finite number >= 0" in rejected[3].message
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.iteration for p in progress] == list(range(1, 31))
    assert progress[-1].update_id == 4
    assert events[-1].HasField("result")


def test_an_update_after_finish_is_refused_in_band(graph: Graph) -> None:
    session = Session(graph, blend(sources=[source(STARRY, 1, 0)], iterations=300))
    events = []
    for event in session.events():
        events.append(event)
        if event.HasField("progress") and event.progress.iteration == 2:
            session.send(pb.SessionRequest(finish=pb.FinishSession()))
            session.send(pb.SessionRequest(update=pb.SessionUpdate(update_id=9, tv_loss_weight=1)))
    rejected = [e.update_rejected for e in events if e.HasField("update_rejected")]
    assert [(r.update_id, r.code) for r in rejected] == [
        (9, grpc.StatusCode.FAILED_PRECONDITION.value[0])
    ]
    assert "the session is finishing" in rejected[0].message
    assert events[-1].result.stats.finished_early


def test_an_update_before_start_is_invalid(graph: Graph) -> None:
    requests = iter([pb.SessionRequest(update=pb.SessionUpdate(update_id=1, tv_loss_weight=1))])
    with pytest.raises(grpc.RpcError) as caught:
        list(graph.stub().Session(requests, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the first message of a session must carry `start`" in str(caught.value.details())


def test_slider_moves_reuse_the_features_and_are_coalesced(graph: Graph) -> None:
    start = blend(
        sources=[source("content/astronaut.jpg", 0, 1), source(STARRY, 1, 0), source(SCREAM, 1, 0)],
        iterations=60,
    )
    session = Session(graph, start)
    events, passes = [], graph.extractor.forward_passes
    for event in session.events():
        events.append(event)
        if event.HasField("progress") and event.progress.iteration == 2:
            passes = graph.extractor.forward_passes
            for step in range(1, 21):  # a slider dragged: 20 moves at once
                move = pb.SourceUpdate(index=1, style_weight=1 - step / 20)
                session.send(
                    pb.SessionRequest(update=pb.SessionUpdate(update_id=step, sources=[move]))
                )
    assert graph.extractor.forward_passes == passes  # every source was extracted once, at the start
    applied = {e.progress.update_id for e in events if e.HasField("progress")} - {0}
    assert 20 in applied and len(applied) < 20  # the latest always lands; most are skipped
    assert events[-1].HasField("result")
