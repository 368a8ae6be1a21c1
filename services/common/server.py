"""Building and running a gRPC server: health, reflection, limits, error codes, SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import errors

log = logging.getLogger(__name__)

_STATUS = {code.value[0]: code for code in grpc.StatusCode}


def status_of(error: errors.StyleBlendError) -> grpc.StatusCode:
    return _STATUS[error.code]


def _abort(context: grpc.ServicerContext, error: Exception, method: str) -> None:
    if isinstance(error, errors.StyleBlendError):
        context.abort(status_of(error), str(error))
    # context.abort raises a bare Exception after setting the code: let it through untouched.
    if context.code() not in (None, grpc.StatusCode.OK):  # type: ignore[attr-defined]
        raise error
    log.exception("internal error in %s", method, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


class DomainErrorInterceptor(grpc.ServerInterceptor):
    """Maps domain errors to status codes, and anything else to INTERNAL with a logged traceback."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, method), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, method), **codec
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _streaming(handler.stream_stream, method), **codec
            )
        return handler  # client-streaming: none of our services has one


def _unary(behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behaviour(request, context)
        except Exception as error:
            _abort(context, error, method)

    return guarded


def _streaming(behaviour: Callable[..., Iterator[Any]], method: str) -> Callable[..., Any]:
    def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behaviour(request, context)
        except Exception as error:
            _abort(context, error, method)

    return guarded


@dataclass(frozen=True)
class Servicer:
    """A servicer and how to register it: `add` is the generated add_XServicer_to_server."""

    name: str  # full service name, e.g. "styleblend.v1.StyleBlend"
    servicer: object
    add: Callable[[Any, grpc.Server], None]


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer

    def stop(self, grace_s: float) -> threading.Event:
        self.health.enter_graceful_shutdown()
        return self.server.stop(grace_s)


def start_server(
    servicers: Callable[[int], Sequence[Servicer]],
    *,
    address: str,
    max_message_bytes: int,
    max_workers: int = 32,
) -> RunningServer:
    """Start a server on `address` (port 0 picks a free one) and return it with its port.

    `servicers` is called with the bound port, so a servicer can be wired to its own server.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[DomainErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    entries = servicers(port)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for entry in entries:
        entry.add(entry.servicer, server)
        health_servicer.set(entry.name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    names = [entry.name for entry in entries]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    server.start()
    log.info("serving %s on port %d", ", ".join(names), port)
    return RunningServer(server, port, health_servicer)


def serve_until_terminated(running: RunningServer, grace_s: float) -> None:
    """Block until SIGTERM or SIGINT, then stop: health goes NOT_SERVING, calls get `grace_s`."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    log.info("stopping, %.1f s grace for calls in flight", grace_s)
    running.stop(grace_s).wait()
