"""ExportSnapshots, ExportTrades (and any table with an ExportSpec): Arrow IPC over a stream.

The BigQuery Storage Read API pattern: the first message carries the Arrow IPC schema, every
later one an encapsulated IPC record batch of that schema and its row count. A client reads each
with ``pyarrow.ipc.read_record_batch(message.arrow_record_batch, schema)`` — no state between
messages (the schema has no dictionary-encoded fields, so no dictionary batches). Messages stay
under ~3 MiB, well inside every gRPC client's default 4 MiB receive limit.

Another table becomes exportable with an ExportSpec in db/repositories/export.py and one call
of :func:`export_stream` with the RPC's response type (as order-book changes are).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

import pyarrow as pa

from kfeed.v1 import market_service_pb2 as pb
from kfeed_server.db.repositories import ArrowExportReader, MarketRepository
from kfeed_server.db.repositories.export import (
    BOOK_CHANGE_EXPORT,
    SNAPSHOT_EXPORT,
    TRADE_EXPORT,
    ExportFilter,
    ExportSpec,
)
from kfeed_server.transport.errors import NotFound
from kfeed_server.transport.requests import optional_ticker, ticker_list, time_window

MAX_EXPORT_TICKERS = 10_000
MESSAGE_TARGET_BYTES = 3 * 1024 * 1024

ExportRequest = (
    pb.ExportSnapshotsRequest | pb.ExportTradesRequest | pb.ExportOrderBookChangesRequest
)
Response = TypeVar(
    "Response",
    pb.ExportSnapshotsResponse,
    pb.ExportTradesResponse,
    pb.ExportOrderBookChangesResponse,
)


async def export_filter(markets: MarketRepository, request: ExportRequest) -> ExportFilter:
    """The rows an export request selects; INVALID_ARGUMENT naming the field, NOT_FOUND for a
    ticker that is not a known market."""
    tickers = ticker_list(request.tickers, MAX_EXPORT_TICKERS)
    event_ticker = optional_ticker(request.event_ticker, "event_ticker")
    series_ticker = optional_ticker(request.series_ticker, "series_ticker")
    start, end = time_window(request)
    known = await markets.existing_tickers(tickers)
    for ticker in tickers:
        if ticker not in known:
            raise NotFound("market", ticker)
    return ExportFilter(
        tickers=sorted(set(tickers)) if tickers else None,
        event_ticker=event_ticker,
        series_ticker=series_ticker,
        start=start,
        end=end,
    )


def rows_per_message(batch: pa.RecordBatch) -> int:
    """How many of ``batch``'s rows fit one message of about MESSAGE_TARGET_BYTES."""
    if batch.num_rows == 0 or batch.nbytes <= MESSAGE_TARGET_BYTES:
        return max(batch.num_rows, 1)
    return max(1, batch.num_rows * MESSAGE_TARGET_BYTES // batch.nbytes)


async def export_stream(
    response_type: type[Response],
    spec: ExportSpec,
    batches: AsyncIterator[pa.RecordBatch],
) -> AsyncIterator[Response]:
    """The schema message, then one message per slice of every batch."""
    yield response_type(arrow_schema=spec.schema.serialize().to_pybytes())
    async for batch in batches:
        step = rows_per_message(batch)
        for offset in range(0, batch.num_rows, step):
            part = batch.slice(offset, step)
            yield response_type(
                arrow_record_batch=part.serialize().to_pybytes(), row_count=part.num_rows
            )


async def export_snapshots(
    markets: MarketRepository, reader: ArrowExportReader, request: pb.ExportSnapshotsRequest
) -> AsyncIterator[pb.ExportSnapshotsResponse]:
    rows = await export_filter(markets, request)
    batches = reader.batches(SNAPSHOT_EXPORT, rows)
    async for message in export_stream(pb.ExportSnapshotsResponse, SNAPSHOT_EXPORT, batches):
        yield message


async def export_trades(
    markets: MarketRepository, reader: ArrowExportReader, request: pb.ExportTradesRequest
) -> AsyncIterator[pb.ExportTradesResponse]:
    rows = await export_filter(markets, request)
    batches = reader.batches(TRADE_EXPORT, rows)
    async for message in export_stream(pb.ExportTradesResponse, TRADE_EXPORT, batches):
        yield message


async def export_order_book_changes(
    markets: MarketRepository,
    reader: ArrowExportReader,
    request: pb.ExportOrderBookChangesRequest,
) -> AsyncIterator[pb.ExportOrderBookChangesResponse]:
    rows = await export_filter(markets, request)
    batches = reader.batches(BOOK_CHANGE_EXPORT, rows)
    async for message in export_stream(
        pb.ExportOrderBookChangesResponse, BOOK_CHANGE_EXPORT, batches
    ):
        yield message
