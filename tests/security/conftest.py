"""A tiny blend, and certificates made at test time (trustme): one CA, a server certificate
for loopback, and a client certificate for the gateway; each written to files, as a deployment
mounts them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from styleblend.v1 import styleblend_pb2 as pb

from tests.conftest import sample


def tiny_blend() -> pb.BlendRequest:
    """The smallest blend that runs the whole graph: a photo and a texture at 48 px."""
    return pb.BlendRequest(
        sources=[
            pb.Source(data=sample("content/coffee.jpg"), style_weight=0.0, content_weight=1.0),
            pb.Source(data=sample("style/grass.jpg"), style_weight=1.0, content_weight=0.0),
        ],
        max_side_px=48,
        iterations=2,
    )


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA's certificate: what both sides trust
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA nobody here trusts


def _write(cert: trustme.LeafCert, folder: Path, name: str) -> tuple[Path, Path]:
    chain, key = folder / f"{name}.pem", folder / f"{name}.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    return chain, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    server = _write(ca.issue_cert("localhost", "127.0.0.1"), folder, "server")
    client = _write(ca.issue_cert("styleblend-gateway"), folder, "client")
    return Pki(folder / "ca.pem", *server, *client, folder / "other-ca.pem")
