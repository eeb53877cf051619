"""Bearer token, TLS / mutual TLS and the stream's resume decisions, against a scripted server.

The kfeed server has no TLS or tokens of its own yet, and cannot be made to drop subscribers or
rate-limit on cue, so a small grpc.aio server serves MarketService from a script instead and
records what the client sent.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import types_pb2
from kfeed_client import RetryPolicy, TlsConfig, connect, resumable_stream
from tests.support.factories import at

Step = pb.StreamSnapshotsResponse | grpc.StatusCode
Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass
class ScriptedMarketService:
    """GetMarket echoes the ticker; each StreamSnapshots call plays the next script."""

    scripts: list[Sequence[Step]] = field(default_factory=list)
    retry_delay: duration_pb2.Duration | None = None
    metadata: list[Metadata] = field(default_factory=list)
    stream_requests: list[pb.StreamSnapshotsRequest] = field(default_factory=list)

    async def get_market(
        self, request: pb.GetMarketRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetMarketResponse:
        self.metadata.append(tuple(context.invocation_metadata() or ()))
        return pb.GetMarketResponse(market=types_pb2.Market(ticker=request.ticker))

    async def stream_snapshots(
        self,
        request: pb.StreamSnapshotsRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.StreamSnapshotsResponse]:
        self.metadata.append(tuple(context.invocation_metadata() or ()))
        self.stream_requests.append(request)
        for step in self.scripts.pop(0) if self.scripts else ():
            if isinstance(step, grpc.StatusCode):
                if self.retry_delay is not None:
                    context.set_trailing_metadata([("grpc-status-details-bin", self._details())])
                await context.abort(step, "scripted")
            yield step

    def _details(self) -> bytes:
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="scripted")
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=self.retry_delay))
        return bytes(status.SerializeToString())

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "kfeed.v1.MarketService",
            {
                "GetMarket": grpc.unary_unary_rpc_method_handler(
                    self.get_market,
                    request_deserializer=pb.GetMarketRequest.FromString,
                    response_serializer=pb.GetMarketResponse.SerializeToString,
                ),
                "StreamSnapshots": grpc.unary_stream_rpc_method_handler(
                    self.stream_snapshots,
                    request_deserializer=pb.StreamSnapshotsRequest.FromString,
                    response_serializer=pb.StreamSnapshotsResponse.SerializeToString,
                ),
            },
        )


async def serve(
    service: ScriptedMarketService, credentials: grpc.ServerCredentials | None = None
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((service.handler(),))
    target = "127.0.0.1:0"
    if credentials is None:
        port = server.add_insecure_port(target)
    else:
        port = server.add_secure_port(target, credentials)
    await server.start()
    return server, port


@pytest.fixture
async def service() -> AsyncIterator[tuple[ScriptedMarketService, int]]:
    scripted = ScriptedMarketService()
    server, port = await serve(scripted)
    try:
        yield scripted, port
    finally:
        await server.stop(0)


def snapshot(snapshot_id: int) -> pb.StreamSnapshotsResponse:
    return pb.StreamSnapshotsResponse(
        resume_token=f"token-{snapshot_id}",
        snapshot=pb.SnapshotUpdate(snapshot=types_pb2.MarketSnapshot(snapshot_id=snapshot_id)),
    )


def gap_marker(after_id: int) -> pb.StreamSnapshotsResponse:
    return pb.StreamSnapshotsResponse(
        resume_token=f"token-{after_id}", subscriber_gap=pb.SubscriberGap(dropped_count=5)
    )


async def collect(stream: AsyncIterator[pb.StreamSnapshotsResponse], n: int) -> list[int]:
    ids: list[int] = []
    async for message in stream:
        ids.append(message.snapshot.snapshot.snapshot_id)
        if len(ids) == n:
            break
    return ids


async def test_token_is_sent_on_unary_and_streaming_calls(
    service: tuple[ScriptedMarketService, int],
) -> None:
    scripted, port = service
    scripted.scripts.append([snapshot(1)])
    async with connect(f"127.0.0.1:{port}", token="s3cret") as client:
        await client.get_market("KXA")
        await collect(client.stream_snapshots(), 1)
    assert [dict(m).get("authorization") for m in scripted.metadata] == ["Bearer s3cret"] * 2


async def test_a_gap_marker_is_filled_by_resuming_from_its_token(
    service: tuple[ScriptedMarketService, int],
) -> None:
    scripted, port = service
    scripted.scripts += [[snapshot(1), gap_marker(1), snapshot(7)], [snapshot(2), snapshot(3)]]
    async with connect(f"127.0.0.1:{port}") as client:
        stream = client.stream_snapshots(["KXA"], start_time=at(0), include_latest=True)
        ids = await collect(stream, 3)
    resumed = scripted.stream_requests[1]
    assert ids == [1, 2, 3]
    assert resumed.resume_token == "token-1"
    # The start time still selects the rows after the token (it no longer says where to start).
    assert resumed.start_time.ToDatetime(dt.UTC) == at(0)
    assert not resumed.include_latest
    assert list(resumed.tickers) == ["KXA"]


async def test_the_servers_retry_delay_is_respected(
    service: tuple[ScriptedMarketService, int],
) -> None:
    scripted, port = service
    scripted.retry_delay = duration_pb2.Duration(seconds=3)
    scripted.scripts += [[snapshot(1), grpc.StatusCode.RESOURCE_EXHAUSTED], [snapshot(2)]]
    waits: list[float] = []

    async def record_wait(seconds: float) -> None:
        waits.append(seconds)

    async with connect(f"127.0.0.1:{port}") as client:
        stream = resumable_stream(
            client.markets, pb.StreamSnapshotsRequest(), retry=RetryPolicy(), sleep=record_wait
        )
        ids = await collect(stream, 2)
    assert ids == [1, 2]
    assert waits == [3.0]
    assert scripted.stream_requests[1].resume_token == "token-1"


def test_backoff_grows_to_its_cap() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.0)
    assert [policy.backoff(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert not RetryPolicy(max_attempts=3).gives_up_after(3)
    assert RetryPolicy(max_attempts=3).gives_up_after(4)


# --- TLS ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _issue(
    name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *, is_ca: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = _issue("kfeed test CA", None, is_ca=True)
    server_cert, server_key = _issue("localhost", (ca_cert.subject, ca_key), is_ca=False)
    client_cert, client_key = _issue("kfeed client", (ca_cert.subject, ca_key), is_ca=False)
    _write(folder / "server.pem", server_cert, server_key)
    _write(folder / "client.pem", client_cert, client_key)
    return Pki(
        ca=_write(folder / "ca.pem", ca_cert, None),
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )


def _server_credentials(pki: Pki, *, require_client_cert: bool) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca.read_bytes() if require_client_cert else None,
        require_client_auth=require_client_cert,
    )


async def test_tls_verifies_the_server_with_the_given_ca(pki: Pki) -> None:
    scripted = ScriptedMarketService()
    server, port = await serve(scripted, _server_credentials(pki, require_client_cert=False))
    try:
        async with connect(f"127.0.0.1:{port}", token="t", tls=TlsConfig(ca_file=pki.ca)) as c:
            market = await c.get_market("KXTLS")
    finally:
        await server.stop(0)
    assert market.ticker == "KXTLS"
    assert dict(scripted.metadata[0])["authorization"] == "Bearer t"


async def test_mutual_tls_needs_the_client_certificate(pki: Pki) -> None:
    scripted = ScriptedMarketService()
    server, port = await serve(scripted, _server_credentials(pki, require_client_cert=True))
    mutual = TlsConfig(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    try:
        async with connect(f"127.0.0.1:{port}", tls=mutual) as client:
            assert (await client.get_market("KXMTLS")).ticker == "KXMTLS"
        async with connect(f"127.0.0.1:{port}", tls=TlsConfig(ca_file=pki.ca)) as client:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.get_market("KXMTLS")
    finally:
        await server.stop(0)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_certificate_needs_its_key() -> None:
    with pytest.raises(ValueError, match="go together"):
        TlsConfig(cert_file="client.pem")
