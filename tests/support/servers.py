"""An in-process kfeed server on an ephemeral loopback port, a publisher to feed it over
IngestService, and readers of the error details it returns."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType

import grpc
from google.rpc import error_details_pb2, status_pb2

from kfeed.v1 import ingest_service_pb2, ingest_service_pb2_grpc
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.records import FeedGapRecord, MarketRecord, SnapshotRecord, TradeRecord
from kfeed_server.transport.convert import (
    feed_gap_to_proto,
    market_to_proto,
    snapshot_to_proto,
    trade_to_proto,
)


@asynccontextmanager
async def serving(config: ServerConfig) -> AsyncIterator[KfeedServer]:
    """``config``'s server, started, and stopped without grace afterwards."""
    server = KfeedServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0)


def status_details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status the server attached to a failed call."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    raise AssertionError("the error carries no google.rpc.Status details")


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The offending field paths of an INVALID_ARGUMENT error."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    fields: list[str] = []
    for detail in status_details(error).details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields.extend(v.field for v in bad_request.field_violations)
    return fields


class PublishSession:
    """One open IngestService.Publish stream: send a batch, await its ack."""

    def __init__(
        self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] | None = None
    ) -> None:
        stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
        self._call = stub.Publish(metadata=metadata)
        self._next_batch_id = 1

    async def publish(
        self,
        *,
        markets: Sequence[MarketRecord] = (),
        snapshots: Sequence[SnapshotRecord] = (),
        trades: Sequence[TradeRecord] = (),
        gaps: Sequence[FeedGapRecord] = (),
        batch_id: int | None = None,
    ) -> ingest_service_pb2.PublishResponse:
        request = ingest_service_pb2.PublishRequest(
            batch_id=self._next_batch_id if batch_id is None else batch_id,
            producer="tests",
            markets=[market_to_proto(m) for m in markets],
            snapshots=[snapshot_to_proto(s) for s in snapshots],
            trades=[trade_to_proto(t) for t in trades],
            feed_gaps=[feed_gap_to_proto(g) for g in gaps],
        )
        return await self.send(request)

    async def send(
        self, request: ingest_service_pb2.PublishRequest
    ) -> ingest_service_pb2.PublishResponse:
        self._next_batch_id = max(self._next_batch_id, request.batch_id) + 1
        await self._call.write(request)
        ack = await self._call.read()
        assert isinstance(ack, ingest_service_pb2.PublishResponse), ack
        return ack

    async def close(self) -> None:
        await self._call.done_writing()

    async def __aenter__(self) -> PublishSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


@asynccontextmanager
async def running_server(config: ServerConfig) -> AsyncIterator[KfeedServer]:
    """``config``'s server on an ephemeral loopback port without migrating (the test database
    is migrated already), stopped afterwards."""
    async with serving(
        config.model_copy(update={"listen": "127.0.0.1:0", "migrate": False})
    ) as server:
        yield server


def plaintext_channel(server: KfeedServer) -> grpc.aio.Channel:
    """A channel to ``server`` without TLS."""
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")


def refused(ack: ingest_service_pb2.PublishResponse) -> list[tuple[str, int, list[str]]]:
    """The ack's refused rows: (request field, index, the violated fields)."""
    return [
        (row.field, row.index, [v.field for v in row.field_violations]) for row in ack.refused_rows
    ]
