"""TLS and mutual TLS with certificates made in the test, and the ingest publishing over TLS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kfeed.v1 import ingest_service_pb2
from kfeed_ingest.cli import IngestCommand
from kfeed_ingest.publisher import Publisher
from kfeed_ingest.spool import Spool
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.security import SecurityConfig
from kfeed_server.transport.convert import market_to_proto
from tests.support.factories import make_market
from tests.support.security import (
    INGEST_TOKEN,
    CertificateAuthority,
    Pem,
    write_tokens_file,
)
from tests.support.servers import plaintext_channel, running_server


@dataclass(frozen=True, slots=True)
class Pki:
    """A server CA and certificate, a client CA and certificate, and an untrusted client."""

    server_ca: CertificateAuthority
    server: Pem
    client_ca: CertificateAuthority
    client: Pem
    stranger: Pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    server_ca = CertificateAuthority(directory, "server")
    client_ca = CertificateAuthority(directory, "client")
    return Pki(
        server_ca=server_ca,
        server=server_ca.issue("kfeed-server", server=True),
        client_ca=client_ca,
        client=client_ca.issue("kfeed-ingest", server=False),
        stranger=CertificateAuthority(directory, "stranger").issue("mallory", server=False),
    )


def _tls(pki: Pki, *, mutual: bool) -> SecurityConfig:
    return SecurityConfig(
        tls_cert_file=pki.server.cert_file,
        tls_key_file=pki.server.key_file,
        tls_client_ca_file=pki.client_ca.cert_file if mutual else None,
    )


@pytest.fixture
async def tls_server(pki: Pki, sqlite_url: str) -> AsyncIterator[KfeedServer]:
    config = ServerConfig(database_url=sqlite_url, security=_tls(pki, mutual=False))
    async with running_server(config) as server:
        yield server


@pytest.fixture
async def mtls_server(pki: Pki, sqlite_url: str, tmp_path: Path) -> AsyncIterator[KfeedServer]:
    security = _tls(pki, mutual=True).model_copy(
        update={"auth_tokens_file": write_tokens_file(tmp_path)}
    )
    async with running_server(ServerConfig(database_url=sqlite_url, security=security)) as server:
        yield server


def _credentials(trusted_ca: Path, client: Pem | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        trusted_ca.read_bytes(),
        client.key_file.read_bytes() if client else None,
        client.cert_file.read_bytes() if client else None,
    )


async def _health_code(channel: grpc.aio.Channel) -> grpc.StatusCode:
    async with channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def _secure(server: KfeedServer, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    # "localhost" so the name is checked against the certificate's DNS name.
    return grpc.aio.secure_channel(f"localhost:{server.port}", credentials)


async def test_a_tls_server_answers_clients_that_trust_its_ca(
    tls_server: KfeedServer, pki: Pki
) -> None:
    credentials = _credentials(pki.server_ca.cert_file)
    assert await _health_code(_secure(tls_server, credentials)) == grpc.StatusCode.OK


async def test_a_tls_server_refuses_plaintext_and_untrusting_clients(
    tls_server: KfeedServer, pki: Pki
) -> None:
    assert await _health_code(plaintext_channel(tls_server)) == grpc.StatusCode.UNAVAILABLE
    wrong_trust = _credentials(pki.client_ca.cert_file)
    assert await _health_code(_secure(tls_server, wrong_trust)) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca(
    mtls_server: KfeedServer, pki: Pki
) -> None:
    trust = pki.server_ca.cert_file
    outcomes = [
        await _health_code(_secure(mtls_server, _credentials(trust, client)))
        for client in (None, pki.stranger, pki.client)
    ]
    assert outcomes == [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.OK,
    ]


async def test_kfeed_ingest_publishes_over_mutual_tls_with_its_token(
    mtls_server: KfeedServer, pki: Pki, tmp_path: Path
) -> None:
    command = IngestCommand(
        server=f"localhost:{mtls_server.port}",
        server_token=INGEST_TOKEN,
        server_tls_ca_file=pki.server_ca.cert_file,
        server_tls_cert_file=pki.client.cert_file,
        server_tls_key_file=pki.client.key_file,
    )
    with Spool.open(tmp_path / "spool") as spool:
        publisher = Publisher(
            command.server,
            spool,
            producer="tls-test",
            token=command.server_token,
            credentials=command.server_credentials(),
        )
        async with publisher:
            await publisher.publish(
                ingest_service_pb2.PublishRequest(markets=[market_to_proto(make_market("TLS-1"))])
            )
            async with asyncio.timeout(10):
                await publisher.flush()
    assert publisher.stats.acked == 1
    assert await mtls_server.repositories.markets.existing_tickers(["TLS-1"]) == {"TLS-1"}


def test_ingest_uses_plaintext_unless_told_otherwise(pki: Pki) -> None:
    assert IngestCommand().server_credentials() is None
    assert IngestCommand(server_tls=True).server_credentials() is not None
    with pytest.raises(ValueError, match="go together"):
        IngestCommand(server_tls_cert_file=pki.client.cert_file).server_credentials()


@pytest.mark.parametrize(
    ("files", "complaint"),
    [
        ({"tls_cert_file": Path("c.pem")}, "go together"),
        ({"tls_key_file": Path("k.pem")}, "go together"),
        ({"tls_client_ca_file": Path("ca.pem")}, "needs --tls-cert-file"),
    ],
)
def test_incomplete_tls_settings_are_refused(files: dict[str, Path], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        SecurityConfig(**files)
