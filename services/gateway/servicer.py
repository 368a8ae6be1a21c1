"""The public StyleBlend service over gRPC: parse each request into the gateway's own types
(plan.py), call the gateway core, encode."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator

import grpc
from styleblend.v1 import styleblend_pb2, styleblend_pb2_grpc

from services.common import logs
from services.common.config import GatewayConfig
from services.common.errors import DeadlineExceeded, InvalidArgument, StyleBlendError
from services.common.metrics import ServiceMetrics
from services.common.security import SessionSlots, client_identity
from services.common.server import Servicer
from services.gateway.core import Gateway
from services.gateway.plan import Update
from services.gateway.run import BlendRun, Upstreams

log = logging.getLogger(__name__)

# gRPC's sync server gives each streaming call one thread for its whole life; these are the
# threads no session can take, so GetInfo, UploadImage and health always find one.
RESERVED_THREADS = 16


def server_threads(config: GatewayConfig, *, internal_services: bool = False) -> int:
    """Threads for a server that hosts the gateway: one for each session it allows (two when the
    internal services share the server: each session's Reconstruct stream is a call to it too),
    and the reserve."""
    per_session = 2 if internal_services else 1
    return config.max_sessions * per_session + RESERVED_THREADS


class ClientCancelled(Exception):
    """The client went away before the call could begin: a normal event, not an error."""


class StyleBlendServicer(styleblend_pb2_grpc.StyleBlendServicer):
    """Each Blend and Session takes a session slot for its client and gets a session id, which
    its calls to the other services carry and which the client gets in the initial metadata."""

    def __init__(self, gateway: Gateway, slots: SessionSlots) -> None:
        self.gateway = gateway
        self.slots = slots

    def Blend(
        self, request: styleblend_pb2.BlendRequest, context: grpc.ServicerContext
    ) -> Iterator[styleblend_pb2.BlendResponse]:
        session_id, release = self._open(context)
        try:
            run = self.gateway.start(self.gateway.plan(request), self._upstreams(session_id))
            context.add_callback(run.cancel)
            for event in run.events():
                yield styleblend_pb2.BlendResponse(event=event)
        finally:
            release()

    def Session(
        self,
        request_iterator: Iterator[styleblend_pb2.SessionRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[styleblend_pb2.SessionResponse]:
        session_id, release = self._open(context)
        try:
            try:
                first = first_request(request_iterator, self.gateway.config.session_start_timeout_s)
            except ClientCancelled:
                log.info("session cancelled before `start`")
                context.set_code(grpc.StatusCode.CANCELLED)  # what the call's log line says
                return
            if first is None or not first.HasField("start"):
                raise InvalidArgument("the first message of a session must carry `start`")
            run = self.gateway.start(self.gateway.plan(first.start), self._upstreams(session_id))
            context.add_callback(run.cancel)
            threading.Thread(
                target=follow,
                args=(request_iterator, run, self.gateway.parse_update),
                daemon=True,
                name="session-follow",
            ).start()
            for event in run.events(session=True):
                yield styleblend_pb2.SessionResponse(event=event)
        finally:
            release()

    def _open(self, context: grpc.ServicerContext) -> tuple[str, Callable[[], None]]:
        """A slot (or RESOURCE_EXHAUSTED) and a fresh session id, sent to the client at once."""
        client = client_identity(context.peer(), context.invocation_metadata())
        release = self.slots.acquire(client)
        context.add_callback(release)  # also when the client goes away mid-stream
        session_id = logs.new_session_id()
        logs.set_session(session_id)
        context.send_initial_metadata(((logs.SESSION_KEY, session_id),))
        log.info("session for %s", client, extra={"client": client})
        return session_id, release

    def _upstreams(self, session_id: str) -> Upstreams:
        upstreams = self.gateway.upstreams
        # The gateway's real channels name the session; a stand-in without them is used as is.
        for_session = getattr(upstreams, "for_session", None)
        return for_session(session_id) if for_session is not None else upstreams

    def UploadImage(
        self, request: styleblend_pb2.UploadImageRequest, context: grpc.ServicerContext
    ) -> styleblend_pb2.UploadImageResponse:
        client = client_identity(context.peer(), context.invocation_metadata())
        upload = self.gateway.upload(request.data, client)
        return styleblend_pb2.UploadImageResponse(
            upload_id=upload.upload_id, width_px=upload.header.width, height_px=upload.header.height
        )

    def GetInfo(
        self, request: styleblend_pb2.GetInfoRequest, context: grpc.ServicerContext
    ) -> styleblend_pb2.GetInfoResponse:
        return self.gateway.info()


def first_request(
    request_iterator: Iterator[styleblend_pb2.SessionRequest], timeout_s: float
) -> styleblend_pb2.SessionRequest | None:
    """A session's first message (None if the client closed its side without one), read on a
    thread of its own so that a client that sends nothing is ended after `timeout_s` and frees
    its slot and server thread; the reader ends with the call."""
    arrived: queue.Queue[styleblend_pb2.SessionRequest | Exception | None] = queue.Queue()

    def read() -> None:
        try:
            arrived.put(next(request_iterator, None))
        except Exception as error:  # the client cancelled, or sent bytes that do not parse
            arrived.put(error)

    threading.Thread(target=read, daemon=True, name="session-start").start()
    try:
        first = arrived.get(timeout=timeout_s)
    except queue.Empty:
        raise DeadlineExceeded(
            f"no `start` within {timeout_s:g} s: a session's first message must carry `start`; "
            "the session is ended, open a new one"
        ) from None
    if isinstance(first, grpc.RpcError):
        raise ClientCancelled from first
    if isinstance(first, Exception):
        raise first
    return first


def follow(
    request_iterator: Iterator[styleblend_pb2.SessionRequest],
    run: BlendRun,
    parse: Callable[[styleblend_pb2.SessionUpdate], Update],
) -> None:
    """Apply a session's later messages to its run, each update parsed first."""
    try:
        for request in request_iterator:
            if request.HasField("finish"):
                run.finish()
            elif request.HasField("update"):
                try:
                    update = parse(request.update)
                except StyleBlendError as error:
                    run.reject(request.update.update_id, error)
                else:
                    run.update(update)
            elif request.HasField("start"):
                run.reject_start()
    except (grpc.RpcError, InvalidArgument):  # gone, or sent bytes that do not parse
        run.cancel()


def style_blend_servicer(gateway: Gateway, metrics: ServiceMetrics | None = None) -> Servicer:
    """The public service; its session limits come from the gateway's config."""
    config = gateway.config
    slots = SessionSlots(config.max_sessions, config.max_sessions_per_client)
    if metrics is not None:
        metrics.gauge_from(
            "styleblend_gateway_active_sessions",
            "Blend and Session calls running now",
            lambda: slots.active,
        )
    return Servicer(
        styleblend_pb2.DESCRIPTOR.services_by_name["StyleBlend"].full_name,
        StyleBlendServicer(gateway, slots),
        styleblend_pb2_grpc.add_StyleBlendServicer_to_server,
        drain=gateway.runs.shut_down,
    )
