"""Who may call: the gateway's bearer token, the graph's internal credential, TLS credentials
from files, sessions per client.

Nothing here reads a path a request names: every path comes from config.
"""

from __future__ import annotations

import hmac
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from services.common.errors import ResourceExhausted

AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
CLIENT_KEY = "x-styleblend-client"  # the studio's bridge names the browser it speaks for
# Always open: probes and API discovery carry no token.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Features, blending and reconstruction: only the gateway may call them.
INTERNAL_PREFIXES = ("/styleblend.internal.",)


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> grpc.ServerCredentials:
    """TLS with this certificate; with a client CA, clients must show a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(key_file.read_bytes(), cert_file.read_bytes())],
        root_certificates=_read(client_ca_file),
        require_client_auth=client_ca_file is not None,
    )


def channel_credentials(
    ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS that trusts `ca_file`; with a certificate and key, ready for mutual TLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes(),
        private_key=_read(key_file),
        certificate_chain=_read(cert_file),
    )


def bearer_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer …` entry, if there is one. The scheme is
    case-insensitive (RFC 7235); the token is everything after the one space that follows it,
    taken as it is: a token with spaces around it is another token."""
    for key, value in metadata or ():
        if key == AUTHORIZATION and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token
    return None


def token_matches(given: str | None, expected: str) -> bool:
    # compare_digest takes time independent of where the strings differ.
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without the bearer token (UNAUTHENTICATED); health and reflection stay
    open, and so do the methods under `skip` (another interceptor guards them).

    The gateway's token guards the public API; `TokenInterceptor.internal` is the same check
    with the graph's own credential, guarding the internal services' methods."""

    def __init__(
        self,
        token: str,
        *,
        only: tuple[str, ...] = ("/",),
        skip: tuple[str, ...] = (),
        missing: str = "this gateway needs a token: send `authorization: Bearer TOKEN` "
        "(styleblend --token, or STYLEBLEND_TOKEN)",
        wrong: str = "the token is not valid for this gateway (it is compared exactly, "
        "spaces included)",
    ) -> None:
        if not token:
            raise ValueError("an empty token would let everyone in; leave it unset instead")
        self._token = token
        self._only = only
        self._skip = (*OPEN_PREFIXES, *skip)
        self._missing = missing
        self._wrong = wrong

    @classmethod
    def internal(cls, token: str) -> TokenInterceptor:
        """Only the gateway may call the internal services: it sends the graph's credential."""
        return cls(
            token,
            only=INTERNAL_PREFIXES,
            missing="this service answers only the styleblend gateway: call the gateway "
            "instead (the gateway sends the graph's credential, STYLEBLEND_INTERNAL_TOKEN)",
            wrong="the internal credential is not this graph's: the gateway and the internal "
            "services need the same STYLEBLEND_INTERNAL_TOKEN",
        )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(self._skip) or not method.startswith(self._only):
            return continuation(handler_call_details)
        given = bearer_token(handler_call_details.invocation_metadata)
        if token_matches(given, self._token):
            return continuation(handler_call_details)
        if continuation(handler_call_details) is None:
            return None  # UNIMPLEMENTED, as without a token
        reason = self._missing if given is None else self._wrong
        return refusing(grpc.StatusCode.UNAUTHENTICATED, reason)


def refusing(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that aborts every call with `code` before reading its request.

    A request-streaming handler whatever the method's kind: gRPC reads a unary request in
    full before calling its handler, but calls a streaming one at once. The status ends the
    call, so the caller's megabytes are never read, let alone parsed."""

    def abort(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(abort)


def peer_host(peer: str) -> str:
    """`ipv4:10.0.0.7:5123` → `10.0.0.7`, `ipv6:[::1]:5123` → `::1`; the port changes with
    every connection, so it is not part of who the client is."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer


def is_loopback(host: str) -> bool:
    return host == "::1" or host.startswith("127.")


def client_identity(peer: str, metadata: Any) -> str:
    """Who a call counts against: its peer's address, or, from a bridge on this machine, the
    browser it names (`x-styleblend-client`). Only a loopback peer may name another client."""
    host = peer_host(peer)
    if is_loopback(host):
        for key, value in metadata or ():
            if key == CLIENT_KEY and isinstance(value, str) and value:
                return value[:200]
    return host


class SessionSlots:
    """Counts running sessions in total and per client; over either limit: RESOURCE_EXHAUSTED."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._running: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        with self._lock:
            return sum(self._running.values())

    def acquire(self, client: str) -> Callable[[], None]:
        """Take a slot for `client`; returns the release, which is safe to call twice."""
        with self._lock:
            running = sum(self._running.values())
            if running >= self.total:
                raise ResourceExhausted(
                    f"sessions: {running} are running, the limit of {self.total} in total; "
                    "try again when one has finished"
                )
            if self._running[client] >= self.per_client:
                raise ResourceExhausted(
                    f"sessions: {self._running[client]} are running for client {client}, the "
                    f"limit of {self.per_client} per client; finish one first"
                )
            self._running[client] += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                self._running[client] -= 1
                if self._running[client] <= 0:
                    del self._running[client]

        return release

    @contextmanager
    def slot(self, client: str) -> Iterator[Callable[[], None]]:
        release = self.acquire(client)
        try:
            yield release
        finally:
            release()


WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")  # listening on every interface


def loopback_address(host: str, port: int) -> str:
    """Where the bridge dials a gateway that listens on host:port, from the same machine."""
    if host in WILDCARD_HOSTS:  # listening everywhere includes loopback
        return f"127.0.0.1:{port}"
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
