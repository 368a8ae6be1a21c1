"""The whole graph over TLS, and over mutual TLS, on certificates made at test time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from styleblend.v1 import styleblend_pb2_grpc

from services.common.config import GatewayConfig, ServiceConfig
from services.common.security import channel_credentials
from services.common.server import RunningServer, Tls, start_server
from services.graph import build_gateway
from tests.conftest import Graph
from tests.security.conftest import Pki, tiny_blend

MiB = 1024 * 1024
INTERNAL = ("features", "blending", "reconstruction")


@dataclass
class TlsGraph:
    servers: dict[str, RunningServer]
    mutual: bool

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.servers[name].port}"


@pytest.fixture(params=[False, True], ids=["tls", "mutual-tls"])
def tls_graph(request: pytest.FixtureRequest, graph: Graph, pki: Pki) -> Iterator[TlsGraph]:
    """The graph's own servicers served again, every server TLS only; with mutual TLS every
    server also asks its callers for a certificate signed by the CA, and the internal ones
    go without the internal secret (the certificate says who the caller is)."""
    mutual: bool = request.param
    tls = Tls(pki.server_cert, pki.server_key, pki.ca if mutual else None)
    internal_token = None if mutual else graph.internal_token
    servers = {
        name: start_server(
            lambda _, s=graph.servicers[name]: [s],  # type: ignore[misc]
            address="127.0.0.1:0",
            max_message_bytes=64 * MiB,
            tls=tls,
            internal_token=internal_token,
        )
        for name in INTERNAL
    }
    config = GatewayConfig(
        gateway_port=0,
        features_address=f"127.0.0.1:{servers['features'].port}",
        blending_address=f"127.0.0.1:{servers['blending'].port}",
        reconstruction_address=f"127.0.0.1:{servers['reconstruction'].port}",
        upstream_timeout_s=10.0,
        upstream_ca_file=pki.ca,
        upstream_cert_file=pki.client_cert if mutual else None,
        upstream_key_file=pki.client_key if mutual else None,
        internal_token=internal_token,
    )
    servers["gateway"] = start_server(
        lambda _: [build_gateway(config)],
        address="127.0.0.1:0",
        max_message_bytes=config.max_request_bytes,
        tls=tls,
    )
    yield TlsGraph(servers, mutual)
    for server in servers.values():
        server.stop(0)


def health(channel: grpc.Channel) -> int:
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(answer.status)


def test_a_blend_goes_through_every_service_over_tls(tls_graph: TlsGraph, pki: Pki) -> None:
    credentials = (
        channel_credentials(pki.ca, pki.client_cert, pki.client_key)
        if tls_graph.mutual
        else channel_credentials(pki.ca)
    )
    with grpc.secure_channel(tls_graph.address("gateway"), credentials) as channel:
        events = [r.event for r in styleblend_pb2_grpc.StyleBlendStub(channel).Blend(tiny_blend())]
    result = events[-1].result
    assert result.stats.iterations == 2
    assert result.image.startswith(b"\x89PNG")


@pytest.mark.parametrize("name", ["gateway", "reconstruction"])
def test_plaintext_and_untrusted_callers_are_refused(
    tls_graph: TlsGraph, pki: Pki, name: str
) -> None:
    address = tls_graph.address(name)
    with grpc.insecure_channel(address) as plain, pytest.raises(grpc.RpcError) as caught:
        health(plain)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # A client that trusts another CA does not accept the server's certificate.
    with (
        grpc.secure_channel(address, channel_credentials(pki.other_ca)) as wrong_ca,
        pytest.raises(grpc.RpcError) as caught,
    ):
        health(wrong_ca)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # Without a client certificate: fine for TLS, refused in the handshake for mutual TLS.
    with grpc.secure_channel(address, channel_credentials(pki.ca)) as no_cert:
        if tls_graph.mutual:
            with pytest.raises(grpc.RpcError) as caught:
                health(no_cert)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        else:
            assert health(no_cert) == health_pb2.HealthCheckResponse.SERVING


def test_tls_settings_come_in_pairs(pki: Pki) -> None:
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file go together"):
        ServiceConfig(tls_cert_file=pki.server_cert)
    with pytest.raises(ValueError, match="tls_client_ca_file needs"):
        ServiceConfig(tls_client_ca_file=pki.ca)
    with pytest.raises(ValueError, match="upstream_cert_file needs upstream_ca_file"):
        GatewayConfig(upstream_cert_file=pki.client_cert, upstream_key_file=pki.client_key)
