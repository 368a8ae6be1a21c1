"""The public StyleBlend service over gRPC: decode, call the gateway core, encode."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
from styleblend.v1 import styleblend_pb2, styleblend_pb2_grpc

from services.common.errors import InvalidArgument
from services.common.server import Servicer
from services.gateway.core import Gateway
from services.gateway.run import BlendRun


class StyleBlendServicer(styleblend_pb2_grpc.StyleBlendServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def Blend(
        self, request: styleblend_pb2.BlendRequest, context: grpc.ServicerContext
    ) -> Iterator[styleblend_pb2.BlendResponse]:
        run = self.gateway.start(request)
        context.add_callback(run.cancel)
        for event in run.events():
            yield styleblend_pb2.BlendResponse(event=event)

    def Session(
        self,
        request_iterator: Iterator[styleblend_pb2.SessionRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[styleblend_pb2.SessionResponse]:
        first = next(request_iterator, None)
        if first is None or not first.HasField("start"):
            raise InvalidArgument("the first message of a session must carry `start`")
        run = self.gateway.start(first.start)
        context.add_callback(run.cancel)
        threading.Thread(
            target=follow, args=(request_iterator, run), daemon=True, name="session-follow"
        ).start()
        for event in run.events(session=True):
            yield styleblend_pb2.SessionResponse(event=event)

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


def style_blend_servicer(gateway: Gateway) -> Servicer:
    return Servicer(
        styleblend_pb2.DESCRIPTOR.services_by_name["StyleBlend"].full_name,
        StyleBlendServicer(gateway),
        styleblend_pb2_grpc.add_StyleBlendServicer_to_server,
    )
