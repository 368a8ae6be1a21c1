"""Building and running a gRPC server: health, reflection, limits, error codes, SIGTERM,
TLS and a token when configured, and metrics and a log line for every call."""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import errors, logs, security
from services.common.metrics import MetricsHttp, ServiceMetrics, serve_metrics

log = logging.getLogger(__name__)

_STATUS = {code.value[0]: code for code in grpc.StatusCode}
MAX_CONNECTION_AGE_S = 300
MAX_CONNECTION_AGE_GRACE_S = 3600


def status_of(error: errors.StyleBlendError) -> grpc.StatusCode:
    return _STATUS[error.code]


def _abort(context: grpc.ServicerContext, error: Exception, method: str) -> None:
    if isinstance(error, errors.NotHeld):
        context.set_trailing_metadata(((errors.NotHeld.METADATA_KEY, error.kind),))
    if isinstance(error, errors.StyleBlendError):
        context.abort(status_of(error), str(error))
    # context.abort raises a bare Exception after setting the code: let it through untouched.
    if context.code() not in (None, grpc.StatusCode.OK):  # type: ignore[attr-defined]
        raise error
    log.exception("internal error in %s", method, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


Wrap = Callable[[Callable[..., Any], str], Callable[..., Any]]


class UndecodableRequest(errors.InvalidArgument):
    """Request bytes that do not parse as the method's message: the caller's fault."""


def _parse(deserialize: Callable[[bytes], Any], raw: bytes) -> Any:
    try:
        return deserialize(raw)
    except DecodeError:
        kind = getattr(deserialize, "__self__", None)  # FromString is bound to its message class
        descriptor = getattr(kind, "DESCRIPTOR", None)
        name = descriptor.full_name if descriptor is not None else "message"
        raise UndecodableRequest(
            f"the request is not a valid {name}: its bytes do not parse; send it serialized "
            "by protobuf, as the generated stubs do"
        ) from None


def _parsed_stream(
    deserialize: Callable[[bytes], Any], raws: Iterator[bytes], context: grpc.ServicerContext
) -> Iterator[Any]:
    for raw in raws:
        try:
            yield _parse(deserialize, raw)
        except UndecodableRequest as error:
            # Set here too, for a servicer that reads the stream in a thread of its own: the
            # call's status says why, whichever thread ends it.
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(str(error))
            raise


def _decoding(
    behaviour: Callable[..., Any], deserialize: Callable[[bytes], Any], streamed: bool
) -> Callable[..., Any]:
    """`behaviour`, taking the request's raw bytes (a stream of them when `streamed`)."""
    if streamed:
        return lambda raws, context: behaviour(_parsed_stream(deserialize, raws, context), context)
    return lambda raw, context: behaviour(_parse(deserialize, raw), context)


def _wrapped(
    handler: grpc.RpcMethodHandler,
    method: str,
    unary: Wrap,
    streaming: Wrap,
    *,
    decode: bool = False,
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped: `unary` for one answer, `streaming` for a
    stream of them. With `decode` gRPC hands over the request's bytes and the behaviour parses
    them, so bytes that do not parse are INVALID_ARGUMENT (gRPC's own deserializer would make
    them INTERNAL), and a handler that refuses a call never parses it."""
    deserialize = handler.request_deserializer
    codec = {
        "request_deserializer": None if decode and deserialize else deserialize,
        "response_serializer": handler.response_serializer,
    }

    def prepared(behaviour: Callable[..., Any], streamed: bool) -> Callable[..., Any]:
        if decode and deserialize is not None:
            return _decoding(behaviour, deserialize, streamed)
        return behaviour

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(prepared(handler.unary_unary, False), method), **codec
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            streaming(prepared(handler.unary_stream, False), method), **codec
        )
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            streaming(prepared(handler.stream_stream, True), method), **codec
        )
    return handler  # client-streaming: none of our services has one


class DomainErrorInterceptor(grpc.ServerInterceptor):
    """Maps domain errors to status codes, and anything else to INTERNAL with a logged traceback.
    The innermost interceptor: it also parses the request (see `_wrapped`), so the ones
    around it see bytes, and a refused call is never parsed."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return _wrapped(handler, handler_call_details.method, _unary, _streaming, decode=True)


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


def _code_of(context: grpc.ServicerContext, error: BaseException | None) -> str:
    if isinstance(error, GeneratorExit):  # the caller went away before the stream ended
        return grpc.StatusCode.CANCELLED.name
    code = context.code()  # type: ignore[attr-defined]
    if isinstance(code, grpc.StatusCode):
        return code.name
    return grpc.StatusCode.OK.name if error is None else grpc.StatusCode.UNKNOWN.name


class ObservingInterceptor(grpc.ServerInterceptor):
    """Counts and times every call by method and code, and logs one line for it, carrying the
    session id the caller put in the metadata (`x-styleblend-session`)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(security.OPEN_PREFIXES):
            return handler  # probes are not traffic
        session_id = logs.session_from(handler_call_details.invocation_metadata)
        return _wrapped(
            handler,
            handler_call_details.method,
            lambda behaviour, method: self._unary(behaviour, method, session_id),
            lambda behaviour, method: self._streaming(behaviour, method, session_id),
        )

    def _unary(
        self, behaviour: Callable[..., Any], method: str, session_id: str
    ) -> Callable[..., Any]:
        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            with logs.session(session_id):
                started, error = time.perf_counter(), None
                try:
                    return behaviour(request, context)
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    self._record(method, context, error, started)

        return observed

    def _streaming(
        self, behaviour: Callable[..., Iterator[Any]], method: str, session_id: str
    ) -> Callable[..., Any]:
        def observed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with logs.session(session_id):
                started, error = time.perf_counter(), None
                try:
                    yield from behaviour(request, context)
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    self._record(method, context, error, started)

        return observed

    def _record(
        self,
        method: str,
        context: grpc.ServicerContext,
        error: BaseException | None,
        started: float,
    ) -> None:
        seconds = time.perf_counter() - started
        code = _code_of(context, error)
        service, _, name = method.strip("/").partition("/")
        self.metrics.requests.labels(service, name, code).inc()
        if code != "OK":
            self.metrics.errors.labels(service, name, code).inc()
        self.metrics.latency.labels(service, name).observe(seconds)
        log.info(
            "%s %s in %.1f ms",
            method,
            code,
            seconds * 1000,
            extra={
                "service": self.metrics.service,
                "rpc": method,
                "code": code,
                "duration_ms": round(seconds * 1000, 1),
            },  # the session comes with every record (logs.install)
        )


class CountingExecutor(futures.ThreadPoolExecutor):
    """A thread pool that knows how many calls wait for a thread and how many hold one."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix="grpc")
        self.workers = max_workers
        self.queued = 0
        self.busy = 0
        self._count_lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        with self._count_lock:
            self.queued += 1

        def counted() -> Any:
            with self._count_lock:
                self.queued -= 1
                self.busy += 1
            try:
                return fn(*args, **kwargs)
            finally:
                with self._count_lock:
                    self.busy -= 1

        return super().submit(counted)


class PortInUse(OSError):
    """Another server listens on the port. gRPC would share it (SO_REUSEPORT) and split the
    calls between the two at random; styleblend refuses it instead."""

    def __init__(self, address: str, port: int, what: str = "") -> None:
        super().__init__(
            f"{address}{f' ({what})' if what else ''} is in use: another server (another "
            f"styleblend graph?) listens on port {port}; stop it, or choose another port"
        )
        self.address = address
        self.port = port


def split_address(address: str) -> tuple[str, int]:
    """`127.0.0.1:50051` → ("127.0.0.1", 50051), `[::1]:50051` → ("::1", 50051)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def bind_error(host: str, port: int) -> OSError | None:
    """Why a server cannot listen on host:port (tried with a socket, bound and closed at
    once), or None when it can."""
    try:
        places = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        return error
    for family, kind, proto, _, place in places:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC and aiohttp do: a closed connection's TIME_WAIT does not hold the port,
            # a listening socket does (unless both sides asked for SO_REUSEPORT).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(place)
            except OSError as error:
                return error
    return None


def _listen(server: grpc.Server, address: str, tls: Tls | None) -> int:
    try:
        if tls is not None:
            port = server.add_secure_port(address, tls.credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # gRPC says only "Failed to bind"; the port says why
        port = 0
    if port == 0:
        host, wanted = split_address(address)
        error = bind_error(host, wanted)
        if error is not None and error.errno == errno.EADDRINUSE:
            raise PortInUse(address, wanted)
        raise OSError(f"cannot listen on {address}: {error or 'gRPC could not bind it'}")
    return port


@dataclass(frozen=True)
class Tls:
    """Server TLS from files; with `client_ca`, clients must show a certificate it signed."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return security.server_credentials(self.cert_file, self.key_file, self.client_ca_file)


@dataclass(frozen=True)
class Servicer:
    """A servicer and how to register it: `add` is the generated add_XServicer_to_server."""

    name: str  # full service name, e.g. "styleblend.v1.StyleBlend"
    servicer: object
    add: Callable[[Any, grpc.Server], None]
    # Called with the grace period when the server stops, so long calls can end with what
    # they have instead of being cancelled at its end.
    drain: Callable[[float], None] | None = None


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    metrics: ServiceMetrics = field(default_factory=lambda: ServiceMetrics("unnamed"))
    metrics_http: MetricsHttp | None = None  # the /metrics endpoint, when one was asked for
    drains: list[Callable[[float], None]] = field(default_factory=list)

    def stop(self, grace_s: float) -> threading.Event:
        self.health.enter_graceful_shutdown()
        stopped = self.server.stop(grace_s)  # new calls are refused from here on
        for drain in self.drains:
            drain(grace_s)
        if self.metrics_http is not None:
            self.metrics_http.stop()
            self.metrics_http = None
        return stopped


def start_server(
    servicers: Callable[[int], Sequence[Servicer]],
    *,
    address: str,
    max_message_bytes: int,
    max_workers: int = 32,
    tls: Tls | None = None,
    token: str | None = None,
    internal_token: str | None = None,
    metrics: ServiceMetrics | None = None,
    metrics_port: int | None = None,
) -> RunningServer:
    """Start a server on `address` (port 0 picks a free one) and return it with its port; a
    port another server listens on is PortInUse.

    `servicers` is called with the bound port, so a servicer can be wired to its own server.
    With `tls` it speaks TLS only. With `internal_token` the internal services' methods need
    it (the graph's own credential, which the gateway sends); with `token` every other call
    needs that one (the gateway's), and the internal methods too when there is no
    `internal_token`. Health and reflection stay open.
    `metrics_port` (0: a free one) serves `metrics` over HTTP on the same interface.
    """
    logs.install()
    metrics = metrics or ServiceMetrics("unnamed")
    executor = CountingExecutor(max_workers)
    interceptors: list[grpc.ServerInterceptor] = [ObservingInterceptor(metrics)]
    if internal_token is not None:
        interceptors.append(security.TokenInterceptor.internal(internal_token))
    if token is not None:
        interceptors.append(
            security.TokenInterceptor(
                token, skip=security.INTERNAL_PREFIXES if internal_token is not None else ()
            )
        )
    interceptors.append(DomainErrorInterceptor())
    server = grpc.server(
        executor,
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Clients re-resolve DNS only when a connection ends: closing connections after a
            # while lets round_robin find replicas the autoscaler added. The long grace lets a
            # session running on the old connection finish.
            ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_S * 1000),
            ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_S * 1000),
            # gRPC shares a port with any other server that also asked (its default): a second
            # graph would bind beside the first and take half its calls.
            ("grpc.so_reuseport", 0),
        ],
    )
    port = _listen(server, address, tls)
    metrics.gauge_from(
        "styleblend_grpc_queued_calls", "calls waiting for a server thread", lambda: executor.queued
    )
    metrics.gauge_from(
        "styleblend_grpc_busy_threads", "server threads serving a call", lambda: executor.busy
    )
    metrics.gauge_from("styleblend_grpc_threads", "server threads in all", lambda: executor.workers)
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
    log.info("serving %s on port %d%s", ", ".join(names), port, " (TLS)" if tls else "")
    metrics_http = None
    if metrics_port is not None:
        host = address.rpartition(":")[0].strip("[]")
        metrics_http = serve_metrics(metrics, host, metrics_port)
        log.info("metrics at http://%s:%d/metrics", host or "0.0.0.0", metrics_http.port)
    drains = [entry.drain for entry in entries if entry.drain is not None]
    return RunningServer(server, port, health_servicer, metrics, metrics_http, drains)


def serve_until_terminated(running: RunningServer, grace_s: float) -> None:
    """Block until SIGTERM or SIGINT, then stop: health goes NOT_SERVING, calls get `grace_s`."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    log.info("stopping, %.1f s grace for calls in flight", grace_s)
    running.stop(grace_s).wait()
