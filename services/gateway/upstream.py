"""The gateway's calls to the three internal services; gRPC failures become domain errors."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
from styleblend.internal.v1 import (
    blending_pb2,
    blending_pb2_grpc,
    features_pb2,
    features_pb2_grpc,
    reconstruction_pb2,
    reconstruction_pb2_grpc,
)

from services.common import logs
from services.common.channels import (
    channel_options,
    domain_error,
    internal_metadata,
    open_channel,
    replicated,
    upstream_credentials,
)
from services.common.config import GatewayConfig
from services.common.errors import Unavailable

T = TypeVar("T")


class ReconstructCall:
    """A running Reconstruct stream: iterate it for events, cancel it to stop the service's work."""

    def __init__(self, call: grpc.Call, address: str) -> None:
        self._call = call
        self._address = address

    def __iter__(self) -> Iterator[reconstruction_pb2.ReconstructResponse]:
        started = False
        try:
            for response in self._call:  # type: ignore[attr-defined]
                started = True
                yield response
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED:
                return
            if started and error.code() == grpc.StatusCode.UNAVAILABLE:
                # The process running this run went away (killed, evicted, its node gone).
                again = (
                    "start the blend again, and a replica that is up takes it"
                    if replicated(self._address)
                    else "start the blend again once the service is back (`styleblend up`)"
                )
                raise Unavailable(
                    f"the reconstruction service at {self._address} is unavailable: the replica "
                    f"running this blend went away mid-run ({error.details()}); its image is "
                    f"lost: {again}"
                ) from None
            raise domain_error(error, "reconstruction", self._address) from None

    def cancel(self) -> None:
        self._call.cancel()


class Upstreams:
    """Channels to features, blending and reconstruction, from the gateway's config.

    Every call carries the graph's internal credential (`internal_token`), when there is one:
    the internal services answer only the gateway. `for_session` gives a view whose calls
    carry a session id, so the other services' logs can say which session they worked for.
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        options = channel_options(config)
        credentials = upstream_credentials(config)
        self._channels = [
            open_channel(address, credentials, options)
            for address in (
                config.features_address,
                config.blending_address,
                config.reconstruction_address,
            )
        ]
        self.metadata: tuple[tuple[str, str], ...] = internal_metadata(config)
        self.features = features_pb2_grpc.FeaturesServiceStub(self._channels[0])
        self.blending = blending_pb2_grpc.BlendingServiceStub(self._channels[1])
        self.reconstruction = reconstruction_pb2_grpc.ReconstructionServiceStub(self._channels[2])

    def for_session(self, session_id: str) -> Upstreams:
        """The same channels; every call names `session_id` in its metadata."""
        view = copy.copy(self)
        view.metadata = (*self.metadata, (logs.SESSION_KEY, session_id))
        return view

    def _unary(self, service: str, address: str, call: Callable[..., T], request: object) -> T:
        try:
            return call(request, timeout=self.config.upstream_timeout_s, metadata=self.metadata)
        except grpc.RpcError as error:
            raise domain_error(error, service, address) from None

    def get_model(self) -> features_pb2.GetModelResponse:
        return self._unary(
            "features",
            self.config.features_address,
            self.features.GetModel,
            features_pb2.GetModelRequest(),
        )

    def extract(self, request: features_pb2.ExtractRequest) -> features_pb2.ExtractResponse:
        return self._unary("features", self.config.features_address, self.features.Extract, request)

    def blend_targets(
        self, request: blending_pb2.BlendTargetsRequest
    ) -> blending_pb2.BlendTargetsResponse:
        return self._unary(
            "blending", self.config.blending_address, self.blending.BlendTargets, request
        )

    def stylise(self, request: features_pb2.StyliseRequest) -> features_pb2.StyliseResponse:
        return self._unary("features", self.config.features_address, self.features.Stylise, request)

    def universal(self, request: features_pb2.UniversalRequest) -> features_pb2.UniversalResponse:
        return self._unary(
            "features", self.config.features_address, self.features.Universal, request
        )

    def get_device(self) -> reconstruction_pb2.GetDeviceResponse:
        return self._unary(
            "reconstruction",
            self.config.reconstruction_address,
            self.reconstruction.GetDevice,
            reconstruction_pb2.GetDeviceRequest(),
        )

    def reconstruct(
        self, requests: Iterator[reconstruction_pb2.ReconstructRequest]
    ) -> ReconstructCall:
        # No deadline: a run lasts as long as its iterations; a down service still fails fast.
        call = self.reconstruction.Reconstruct(requests, metadata=self.metadata)
        return ReconstructCall(call, self.config.reconstruction_address)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
