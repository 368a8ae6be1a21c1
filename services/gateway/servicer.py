"""The public StyleBlend service over gRPC: decode, call the gateway core, encode."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import grpc
from styleblend.v1 import styleblend_pb2, styleblend_pb2_grpc

from services.common import logs
from services.common.errors import InvalidArgument
from services.common.metrics import ServiceMetrics
from services.common.security import SessionSlots, client_identity
from services.common.server import Servicer
from services.gateway.core import Gateway
from services.gateway.run import BlendRun, Upstreams

log = logging.getLogger(__name__)


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
            run = self.gateway.start(request, self._upstreams(session_id))
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
            first = next(request_iterator, None)
            if first is None or not first.HasField("start"):
                raise InvalidArgument("the first message of a session must carry `start`")
            run = self.gateway.start(first.start, self._upstreams(session_id))
            context.add_callback(run.cancel)
            threading.Thread(
                target=follow, args=(request_iterator, run), daemon=True, name="session-follow"
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
        upload = self.gateway.upload(request.data)
        return styleblend_pb2.UploadImageResponse(
            upload_id=upload.upload_id, width_px=upload.header.width, height_px=upload.header.height
        )

    def GetInfo(
        self, request: styleblend_pb2.GetInfoRequest, context: grpc.ServicerContext
    ) -> styleblend_pb2.GetInfoResponse:
        return self.gateway.info()


def follow(request_iterator: Iterator[styleblend_pb2.SessionRequest], run: BlendRun) -> None:
    """Apply a session's later messages to its run."""
    try:
        for request in request_iterator:
            if request.HasField("finish"):
                run.finish()
            elif request.HasField("update"):
                run.update(request.update)
            elif request.HasField("start"):
                run.reject_start()
    except grpc.RpcError:
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
