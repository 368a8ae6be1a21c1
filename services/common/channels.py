"""Calls from one service to another: channels, the graph's credential, and gRPC failures as
domain errors. The gateway calls all three internal services; blending calls features for
tensors and reconstruction calls blending for targets (tensors move by reference, DESIGN.md)."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import grpc
import numpy as np
from styleblend.internal.v1 import (
    blending_pb2,
    blending_pb2_grpc,
    features_pb2,
    features_pb2_grpc,
)

from services.common import errors, security, wire
from services.common.config import ServiceConfig

T = TypeVar("T")

_PASSED_ON: dict[grpc.StatusCode, type[errors.StyleBlendError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
}


def _not_held(error: grpc.Call) -> str | None:
    for key, value in error.trailing_metadata() or ():
        if key == errors.NotHeld.METADATA_KEY:
            return str(value)
    return None


def replicated(address: str) -> bool:
    """Whether a target names a service's replicas (a list, or DNS), not one process."""
    return "," in address or address.startswith("dns:")


def domain_error(error: grpc.RpcError, service: str, address: str) -> Exception:
    """What a caller should see for a failure of the service it called."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else str(error)) or ""
    held = _not_held(error) if isinstance(error, grpc.Call) else None
    if code == grpc.StatusCode.FAILED_PRECONDITION and held is not None:
        return errors.NotHeld(held, details)
    if code in _PASSED_ON:
        return _PASSED_ON[code](details)
    if code == grpc.StatusCode.UNAUTHENTICATED:  # the graph's fault, not the caller's
        return errors.FailedPrecondition(
            f"the {service} service at {address} refused the call ({details}); give every "
            "service the same STYLEBLEND_INTERNAL_TOKEN"
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        hint = (
            "check that its replicas are up"
            if replicated(address)
            else "start the graph with `styleblend up`"
        )
        return errors.Unavailable(
            f"the {service} service at {address} is unavailable ({code.name}: {details}); {hint}"
        )
    return RuntimeError(f"{service} service failed: {code.name}: {details}")


def upstream_credentials(config: ServiceConfig) -> grpc.ChannelCredentials | None:
    """TLS to the services when the config names their CA (with a client certificate: mutual)."""
    if config.upstream_ca_file is None:
        return None
    return security.channel_credentials(
        config.upstream_ca_file, config.upstream_cert_file, config.upstream_key_file
    )


def channel_options(config: ServiceConfig) -> list[tuple[str, object]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # With a `dns:///name-headless:port` target every replica is a backend and calls
        # spread over them; a Reconstruct stream is one call, so it stays on one replica.
        ("grpc.lb_policy_name", "round_robin"),
        # A restarted service is found again within a second; gRPC's default backoff
        # grows to two minutes, refusing calls all that time though the service is back.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


def open_channel(
    address: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, object]]
) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def internal_metadata(config: ServiceConfig) -> tuple[tuple[str, str], ...]:
    """The graph's credential, which every internal service asks its callers for."""
    secret = config.internal_secret
    return ((security.AUTHORIZATION, f"Bearer {secret}"),) if secret else ()


class Peer:
    """One internal service as another one calls it: a channel and the graph's credential."""

    def __init__(
        self, config: ServiceConfig, service: str, address: str, tls_name: str | None = None
    ) -> None:
        """`tls_name`: the name the server's certificate carries, when `address` is not it
        (a replica's pod IP; its certificate names the service)."""
        self.config, self.service, self.address = config, service, address
        options = channel_options(config)
        if tls_name and config.upstream_ca_file is not None:
            options.append(("grpc.ssl_target_name_override", tls_name))
        self.channel = open_channel(address, upstream_credentials(config), options)
        self.metadata = internal_metadata(config)

    def call(
        self, method: Callable[..., T], request: object, metadata: Sequence[tuple[str, str]] = ()
    ) -> T:
        try:
            return method(
                request,
                timeout=self.config.upstream_timeout_s,
                metadata=(*self.metadata, *metadata),
            )
        except grpc.RpcError as error:
            raise domain_error(error, self.service, self.address) from None

    def close(self) -> None:
        self.channel.close()


def _host(address: str) -> str:
    """ "dns:///features-headless:50052" -> "features-headless"."""
    target = address.rsplit("/", 1)[-1]
    return target.rsplit(":", 1)[0].strip("[]")


class Replicas:
    """A service's replicas as another service fetches from them: the one named by a
    reference's holder, or the service's own address (round robin over its replicas)."""

    MAX_HOLDERS = 64  # channels kept to individual replicas; a replaced pod's goes first

    def __init__(self, config: ServiceConfig, service: str, address: str) -> None:
        self.config, self.service = config, service
        self.default = Peer(config, service, address)
        self._holders: OrderedDict[str, Peer] = OrderedDict()
        self._lock = threading.Lock()

    def at(self, holder: str) -> Peer:
        if not holder or holder == self.default.address:
            return self.default
        with self._lock:
            peer = self._holders.get(holder)
            if peer is None:
                peer = Peer(self.config, self.service, holder, _host(self.default.address))
                self._holders[holder] = peer
                if len(self._holders) > self.MAX_HOLDERS:
                    self._holders.popitem(last=False)[1].close()
            self._holders.move_to_end(holder)
            return peer

    @contextlib.contextmanager
    def gone_is_not_held(self, peer: Peer, kind: str, remedy: str) -> Iterator[None]:
        """A replica named by a reference that no longer answers took what it kept with it:
        that is NotHeld (the caller recomputes), not the whole service being down."""
        try:
            yield
        except errors.Unavailable as error:
            if peer is self.default:
                raise
            raise errors.NotHeld(
                kind,
                f"the {self.service} replica at {peer.address} that held it is gone "
                f"({error}); {remedy}",
            ) from None


class FeatureTensors:
    """The features service's kept tensors, for blending: `tensors(keys, at)`."""

    def __init__(self, config: ServiceConfig, address: str) -> None:
        self.replicas = Replicas(config, "features", address)

    def tensors(self, keys: Sequence[str], at: str = "") -> dict[str, np.ndarray]:
        peer = self.replicas.at(at)
        stub = features_pb2_grpc.FeaturesServiceStub(peer.channel)
        request = features_pb2.FetchTensorsRequest(keys=keys)
        with self.replicas.gone_is_not_held(peer, "tensor", "extract them again"):
            answer = peer.call(stub.FetchTensors, request)
        return {key: wire.from_tensor(answer.tensors[key], key) for key in keys}


class BlendedTargets:
    """The blending service's kept targets, for reconstruction: `targets(key, at)`."""

    def __init__(self, config: ServiceConfig, address: str) -> None:
        self.replicas = Replicas(config, "blending", address)

    def targets(self, key: str, at: str = "") -> blending_pb2.BlendTargetsResponse:
        peer = self.replicas.at(at)
        stub = blending_pb2_grpc.BlendingServiceStub(peer.channel)
        with self.replicas.gone_is_not_held(peer, "targets", "blend them again"):
            answer = peer.call(stub.FetchTargets, blending_pb2.FetchTargetsRequest(key=key))
        return answer.targets
