"""A small but real IngestService peer on 127.0.0.1:0 for the publisher's protocol tests.

It "commits" a batch by recording it (once per batch id, as the real server's unique keys do),
then acks. It can refuse batches, withhold acks, and drop the stream after a number of batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from kfeed.v1 import ingest_service_pb2, ingest_service_pb2_grpc, types_pb2
from kfeed_ingest.columns import OPTIONAL_FIELDS

PublishRequest = ingest_service_pb2.PublishRequest
PublishResponse = ingest_service_pb2.PublishResponse
INVALID_ARGUMENT = 3


def snapshot_messages(
    columns: ingest_service_pb2.SnapshotColumns,
) -> list[types_pb2.MarketSnapshot]:
    """The rows of ``columns`` as the MarketSnapshot messages they stand for."""
    optional = zip(*(getattr(columns, name) for name, _ in OPTIONAL_FIELDS), strict=True)
    messages = []
    for index, exchange_us, receive_us, source, status, present, values in zip(
        columns.ticker_index,
        columns.exchange_time_micros,
        columns.receive_time_micros,
        columns.source,
        columns.status,
        columns.present,
        optional,
        strict=True,
    ):
        message = types_pb2.MarketSnapshot(
            ticker=columns.tickers[index], source=source, status=status
        )
        message.exchange_time.FromMicroseconds(exchange_us)
        message.receive_time.FromMicroseconds(receive_us)
        for bit, ((name, unit), value) in enumerate(zip(OPTIONAL_FIELDS, values, strict=True)):
            if not present >> bit & 1:
                continue
            if unit is None:
                setattr(message, name, value)
            else:
                setattr(getattr(message, name), unit, value)
        messages.append(message)
    return messages


class FakeIngestService(ingest_service_pb2_grpc.IngestServiceServicer):
    """Stores batches by id and acks after storing."""

    def __init__(self) -> None:
        # Batches as received, except that snapshot columns are turned into `snapshots`.
        self.stored: dict[int, PublishRequest] = {}
        # Batches that carried snapshot_columns.
        self.columnar_batches = 0
        self.received_by_stream: list[list[int]] = []
        self.refuse_tickers: set[str] = set()
        self.drop_after: int | None = None
        self.acks_allowed = asyncio.Event()
        self.acks_allowed.set()

    @property
    def received(self) -> list[int]:
        """Every batch id received, over all streams, in arrival order."""
        return [batch_id for stream in self.received_by_stream for batch_id in stream]

    async def Publish(  # noqa: N802 - the generated servicer's method name
        self,
        request_iterator: AsyncIterator[PublishRequest],
        context: grpc.aio.ServicerContext[PublishRequest, PublishResponse],
    ) -> AsyncIterator[PublishResponse]:
        received: list[int] = []
        self.received_by_stream.append(received)
        # Read eagerly, as a real server does, so that only the client's window limits arrivals.
        arrivals: asyncio.Queue[PublishRequest | None] = asyncio.Queue()

        async def read_all() -> None:
            async for request in request_iterator:
                received.append(request.batch_id)
                arrivals.put_nowait(request)
            arrivals.put_nowait(None)

        reader = asyncio.create_task(read_all())
        try:
            while (request := await arrivals.get()) is not None:
                if self.drop_after is not None and len(self.received) >= self.drop_after:
                    self.drop_after = None
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "dropped by the test")
                await self.acks_allowed.wait()
                yield self._commit(request)
        finally:
            reader.cancel()

    async def ListMarketWatermarks(  # noqa: N802 - the generated servicer's method name
        self,
        request: ingest_service_pb2.ListMarketWatermarksRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ingest_service_pb2.ListMarketWatermarksResponse:
        """The stored markets (their latest version) and their newest stored trade, one page."""
        markets: dict[str, types_pb2.Market] = {}
        latest: dict[str, int] = {}
        for _, batch in sorted(self.stored.items()):
            markets.update((m.ticker, m) for m in batch.markets)
            for trade in batch.trades:
                micros = trade.create_time.ToMicroseconds()
                latest[trade.ticker] = max(latest.get(trade.ticker, micros), micros)
        response = ingest_service_pb2.ListMarketWatermarksResponse()
        for ticker, market in sorted(markets.items()):
            if request.statuses and market.status not in request.statuses:
                continue
            watermark = response.watermarks.add(market=market)
            if ticker in latest:
                watermark.latest_trade_time.FromMicroseconds(latest[ticker])
        return response

    def _commit(self, received: PublishRequest) -> PublishResponse:
        request = PublishRequest()
        request.CopyFrom(received)
        if request.HasField("snapshot_columns"):
            self.columnar_batches += 1
            request.ClearField("snapshot_columns")
            request.snapshots.extend(snapshot_messages(received.snapshot_columns))
        refused = [
            index
            for index, snapshot in enumerate(request.snapshots)
            if snapshot.ticker in self.refuse_tickers
        ]
        if refused:
            return PublishResponse(
                batch_id=request.batch_id,
                code=INVALID_ARGUMENT,
                message="unknown market",
                field_violations=[
                    ingest_service_pb2.FieldViolation(
                        field=f"snapshots[{index}].ticker", description="no such market"
                    )
                    for index in refused
                ],
            )
        new = request.batch_id not in self.stored
        self.stored.setdefault(request.batch_id, request)
        return PublishResponse(
            batch_id=request.batch_id, snapshots_stored=len(request.snapshots) if new else 0
        )


class FakeIngestServer:
    """Runs :class:`FakeIngestService`; can be stopped and started again on the same port."""

    def __init__(self) -> None:
        self.service = FakeIngestService()
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        """``host:port`` to dial."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (on the port used before, if any)."""
        server = grpc.aio.server()
        ingest_service_pb2_grpc.add_IngestServiceServicer_to_server(self.service, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        """Stop at once, cutting open streams."""
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
