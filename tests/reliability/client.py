"""A client's side of Blend and Session, recording what came back and when."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from styleblend.v1 import styleblend_pb2 as pb
from styleblend.v1 import styleblend_pb2_grpc

from tests.conftest import sample

CONTENT, STYLE = "content/chelsea.jpg", "style/starry_night.jpg"


def small_blend(
    iterations: int, side: int = 64, *, seed: int = 3, preview_every: int = 5
) -> pb.BlendRequest:
    return pb.BlendRequest(
        sources=[
            pb.Source(data=sample(CONTENT), style_weight=0.0, content_weight=1.0),
            pb.Source(data=sample(STYLE), style_weight=1.0, content_weight=0.0),
        ],
        max_side_px=side,
        iterations=iterations,
        optimizer=pb.OPTIMIZER_ADAM,
        seed=seed,
        preview_every=preview_every,
    )


@dataclass
class Outcome:
    """How one call ended: its events, and a status code other than OK if it failed."""

    events: list[pb.BlendEvent] = field(default_factory=list)
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    first_event_s: float | None = None
    seconds: float = 0.0

    @property
    def result(self) -> pb.Result | None:
        last = self.events[-1] if self.events else None
        return last.result if last is not None and last.HasField("result") else None

    def of(self, kind: str) -> list[pb.BlendEvent]:
        return [event for event in self.events if event.WhichOneof("event") == kind]


class SessionCall:
    """A Session driven from a test: send at any time, read events as they come."""

    def __init__(
        self,
        stub: styleblend_pb2_grpc.StyleBlendStub,
        start: pb.BlendRequest,
        timeout_s: float,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._outgoing: queue.Queue[pb.SessionRequest | None] = queue.Queue()
        self._outgoing.put(pb.SessionRequest(start=start))
        self.started = time.monotonic()
        self.call = stub.Session(self._requests(), timeout=timeout_s, metadata=metadata)
        self.outcome = Outcome()

    def _requests(self) -> Iterator[pb.SessionRequest]:
        while (message := self._outgoing.get()) is not None:
            yield message

    def send(self, message: pb.SessionRequest) -> None:
        self._outgoing.put(message)

    def events(self) -> Iterator[pb.BlendEvent]:
        """Events until the stream ends; a failure is recorded in `outcome`, not raised."""
        try:
            for response in self.call:
                if self.outcome.first_event_s is None:
                    self.outcome.first_event_s = time.monotonic() - self.started
                self.outcome.events.append(response.event)
                yield response.event
        except grpc.RpcError as error:
            self.outcome.code = error.code()
            self.outcome.details = str(error.details())
        finally:
            self.outcome.seconds = time.monotonic() - self.started
            self._outgoing.put(None)

    def finish(self) -> None:
        self.send(pb.SessionRequest(finish=pb.FinishSession()))

    def run(self) -> Outcome:
        for _ in self.events():
            pass
        return self.outcome


def blend(
    stub: styleblend_pb2_grpc.StyleBlendStub, request: pb.BlendRequest, timeout_s: float
) -> Outcome:
    outcome, started = Outcome(), time.monotonic()
    try:
        for response in stub.Blend(request, timeout=timeout_s):
            if outcome.first_event_s is None:
                outcome.first_event_s = time.monotonic() - started
            outcome.events.append(response.event)
    except grpc.RpcError as error:
        outcome.code = error.code()
        outcome.details = str(error.details())
    outcome.seconds = time.monotonic() - started
    return outcome
