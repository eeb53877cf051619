"""`connect()` and :class:`KfeedClient`: the generated stubs plus typed helpers."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypeVar

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from kfeed.v1 import (
    backtest_service_pb2_grpc,
    ingest_service_pb2_grpc,
    market_service_pb2,
    market_service_pb2_grpc,
    types_pb2,
)
from kfeed_client.arrow import ProgressCallback, export_request, read_table, record_batches
from kfeed_client.connection import DEFAULT_ADDRESS, TlsConfig, open_channel
from kfeed_client.streaming import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_RETRY,
    RetryPolicy,
    resumable_stream,
)

if TYPE_CHECKING:
    import pyarrow as pa

_Item = TypeVar("_Item")


def to_timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """A Timestamp for a timezone-aware datetime (naive ones are ambiguous and refused)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"datetime must be timezone-aware, got {value!r}")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def to_duration(value: timedelta) -> duration_pb2.Duration:
    """A Duration for a timedelta."""
    duration = duration_pb2.Duration()
    duration.FromTimedelta(value)
    return duration


async def _all_pages(
    fetch_page: Callable[[str], Awaitable[tuple[Sequence[_Item], str]]],
) -> AsyncIterator[_Item]:
    """Items of every page, following ``next_page_token`` until it comes back empty."""
    page_token = ""
    while True:
        items, page_token = await fetch_page(page_token)
        for item in items:
            yield item
        if not page_token:
            return


class KfeedClient:
    """An async client of one kfeed server.

    The generated stubs are attributes (:attr:`markets`, :attr:`backtests`, :attr:`ingest`) for
    anything the helpers do not cover; the helpers hide paging and stream resumption. Errors are
    ``grpc.aio.AioRpcError`` with the server's status (NOT_FOUND, INVALID_ARGUMENT, …).
    Use as ``async with connect(...) as client:`` or call :meth:`close`.
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.markets: market_service_pb2_grpc.MarketServiceAsyncStub = (
            market_service_pb2_grpc.MarketServiceStub(channel)
        )
        self.backtests: backtest_service_pb2_grpc.BacktestServiceAsyncStub = (
            backtest_service_pb2_grpc.BacktestServiceStub(channel)
        )
        self.ingest: ingest_service_pb2_grpc.IngestServiceAsyncStub = (
            ingest_service_pb2_grpc.IngestServiceStub(channel)
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        await self.channel.close()

    async def list_markets(
        self,
        *,
        event_ticker: str = "",
        series_ticker: str = "",
        statuses: Iterable[types_pb2.MarketStatus.ValueType] = (),
        page_size: int = 0,
    ) -> AsyncIterator[types_pb2.Market]:
        """Every market matching the filters, ordered by ticker, across all pages."""
        wanted_statuses = list(statuses)

        async def fetch_page(page_token: str) -> tuple[Sequence[types_pb2.Market], str]:
            response = await self.markets.ListMarkets(
                market_service_pb2.ListMarketsRequest(
                    page_size=page_size,
                    page_token=page_token,
                    event_ticker=event_ticker,
                    series_ticker=series_ticker,
                    statuses=wanted_statuses,
                )
            )
            return response.markets, response.next_page_token

        async for market in _all_pages(fetch_page):
            yield market

    async def get_market(self, ticker: str) -> types_pb2.Market:
        """One market by ticker (NOT_FOUND when unknown)."""
        response = await self.markets.GetMarket(market_service_pb2.GetMarketRequest(ticker=ticker))
        return response.market

    async def latest_snapshot(self, ticker: str) -> types_pb2.MarketSnapshot:
        """The market's most recent stored snapshot (NOT_FOUND when it has none)."""
        response = await self.markets.GetLatestSnapshot(
            market_service_pb2.GetLatestSnapshotRequest(ticker=ticker)
        )
        return response.snapshot

    async def get_order_book(
        self, ticker: str, at: datetime | None = None, depth: int = 0
    ) -> types_pb2.OrderBook:
        """The market's order book in force at ``at`` (None: the latest), ``depth`` levels a
        side, best first (0: all). ``in_feed_gap`` says the recording missed changes then."""
        request = market_service_pb2.GetOrderBookRequest(ticker=ticker, depth=depth)
        if at is not None:
            request.time.FromDatetime(at)
        response = await self.markets.GetOrderBook(request)
        return response.book

    async def iter_snapshots(
        self,
        ticker: str,
        start: datetime | None = None,
        end: datetime | None = None,
        *,
        page_size: int = 0,
    ) -> AsyncIterator[types_pb2.MarketSnapshot]:
        """The market's snapshots in [start, end), oldest first, across all pages."""

        async def fetch_page(page_token: str) -> tuple[Sequence[types_pb2.MarketSnapshot], str]:
            request = market_service_pb2.ListSnapshotsRequest(
                ticker=ticker, page_size=page_size, page_token=page_token
            )
            _set_window(request, start, end)
            response = await self.markets.ListSnapshots(request)
            return response.snapshots, response.next_page_token

        async for snapshot in _all_pages(fetch_page):
            yield snapshot

    async def iter_trades(
        self,
        ticker: str,
        start: datetime | None = None,
        end: datetime | None = None,
        *,
        page_size: int = 0,
    ) -> AsyncIterator[types_pb2.Trade]:
        """The market's public trades in [start, end), oldest first, across all pages."""

        async def fetch_page(page_token: str) -> tuple[Sequence[types_pb2.Trade], str]:
            request = market_service_pb2.ListTradesRequest(
                ticker=ticker, page_size=page_size, page_token=page_token
            )
            _set_window(request, start, end)
            response = await self.markets.ListTrades(request)
            return response.trades, response.next_page_token

        async for trade in _all_pages(fetch_page):
            yield trade

    async def iter_candles(
        self,
        ticker: str,
        interval: timedelta,
        start: datetime,
        end: datetime | None = None,
        *,
        page_size: int = 0,
    ) -> AsyncIterator[types_pb2.Candle]:
        """The market's candles of ``interval`` (whole seconds, 1 s to 1 day) whose start lies in
        [start aligned down to the interval, end), oldest first, across all pages. ``end`` None:
        up to now."""

        async def fetch_page(page_token: str) -> tuple[Sequence[types_pb2.Candle], str]:
            request = market_service_pb2.ListCandlesRequest(
                ticker=ticker,
                interval=to_duration(interval),
                page_size=page_size,
                page_token=page_token,
            )
            _set_window(request, start, end)
            response = await self.markets.ListCandles(request)
            return response.candles, response.next_page_token

        async for candle in _all_pages(fetch_page):
            yield candle

    def export_snapshot_batches(
        self,
        tickers: Iterable[str] = (),
        *,
        event_ticker: str | None = None,
        series_ticker: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        on_rows: ProgressCallback | None = None,
    ) -> AsyncIterator[pa.RecordBatch]:
        """Stored snapshots as Arrow record batches (needs ``kfeed-client[arrow]``), in the
        order they were stored: of ``tickers`` (none: all) and/or an event's or a series'
        markets, with exchange time in [start, end). The first batch is empty and carries the
        schema; ``on_rows(n)`` is called as rows arrive."""
        request = export_request(
            market_service_pb2.ExportSnapshotsRequest,
            tickers, event_ticker, series_ticker, start, end,
        )  # fmt: skip
        return record_batches(self.markets.ExportSnapshots(request), on_rows)

    async def export_snapshots(
        self,
        tickers: Iterable[str] = (),
        *,
        event_ticker: str | None = None,
        series_ticker: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        on_rows: ProgressCallback | None = None,
    ) -> pa.Table:
        """:meth:`export_snapshot_batches` as one ``pyarrow.Table`` (``.to_pandas()``,
        ``polars.from_arrow``)."""
        batches = self.export_snapshot_batches(
            tickers, event_ticker=event_ticker, series_ticker=series_ticker,
            start=start, end=end, on_rows=on_rows,
        )  # fmt: skip
        return await read_table(batches)

    def export_trade_batches(
        self,
        tickers: Iterable[str] = (),
        *,
        event_ticker: str | None = None,
        series_ticker: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        on_rows: ProgressCallback | None = None,
    ) -> AsyncIterator[pa.RecordBatch]:
        """Stored public trades as Arrow record batches in (create_time, trade_id) order, like
        :meth:`export_snapshot_batches` (the window applies to the trade's time)."""
        request = export_request(
            market_service_pb2.ExportTradesRequest,
            tickers, event_ticker, series_ticker, start, end,
        )  # fmt: skip
        return record_batches(self.markets.ExportTrades(request), on_rows)

    async def export_trades(
        self,
        tickers: Iterable[str] = (),
        *,
        event_ticker: str | None = None,
        series_ticker: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        on_rows: ProgressCallback | None = None,
    ) -> pa.Table:
        """:meth:`export_trade_batches` as one ``pyarrow.Table``."""
        batches = self.export_trade_batches(
            tickers, event_ticker=event_ticker, series_ticker=series_ticker,
            start=start, end=end, on_rows=on_rows,
        )  # fmt: skip
        return await read_table(batches)

    def export_order_book_change_batches(
        self,
        tickers: Iterable[str] = (),
        *,
        event_ticker: str | None = None,
        series_ticker: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        on_rows: ProgressCallback | None = None,
    ) -> AsyncIterator[pa.RecordBatch]:
        """Stored order-book changes (every level's new size) as Arrow record batches, each
        market's in the order they apply, like :meth:`export_snapshot_batches`."""
        request = export_request(
            market_service_pb2.ExportOrderBookChangesRequest,
            tickers, event_ticker, series_ticker, start, end,
        )  # fmt: skip
        return record_batches(self.markets.ExportOrderBookChanges(request), on_rows)

    async def export_order_book_changes(
        self,
        tickers: Iterable[str] = (),
        *,
        event_ticker: str | None = None,
        series_ticker: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        on_rows: ProgressCallback | None = None,
    ) -> pa.Table:
        """:meth:`export_order_book_change_batches` as one ``pyarrow.Table``."""
        batches = self.export_order_book_change_batches(
            tickers, event_ticker=event_ticker, series_ticker=series_ticker,
            start=start, end=end, on_rows=on_rows,
        )  # fmt: skip
        return await read_table(batches)

    def stream_snapshots(
        self,
        tickers: Iterable[str] = (),
        *,
        start_time: datetime | None = None,
        resume_token: str | None = None,
        event_ticker: str | None = None,
        series_ticker: str | None = None,
        include_latest: bool = False,
        heartbeat_interval: timedelta | None = None,
        conflation_interval: timedelta | None = None,
        overflow_policy: market_service_pb2.OverflowPolicy.ValueType = (
            market_service_pb2.OVERFLOW_POLICY_GAP_MARKER
        ),
        retry: RetryPolicy = DEFAULT_RETRY,
        resume_on_gap: bool = True,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ) -> AsyncGenerator[market_service_pb2.StreamSnapshotsResponse, None]:
        """The live feed of the selected markets (no tickers and no event/series: all markets).

        Starts after ``resume_token``, or at ``start_time`` in the past, or live (preceded by
        each market's latest snapshot with ``include_latest``); history comes first, then a
        caught-up marker, then live snapshots. With ``start_time`` only snapshots of exchange
        time at or after it come, stored and live alike — also after ``resume_token``: to
        continue a stream that had a start exactly, pass the same start. After a disconnect it
        reconnects with backoff and continues after the last token it saw (its start kept) —
        no gap, no duplicate — and it ends only on a status that retrying cannot fix (raised
        as ``grpc.aio.AioRpcError``) or when ``retry.max_attempts`` consecutive attempts
        failed. See :func:`resumable_stream`.

        Snapshots travel in batches of up to ``max_batch_size`` when several are ready (1: one
        per message); either way each is yielded as its own message with its own resume token.
        """
        request = market_service_pb2.StreamSnapshotsRequest(
            tickers=list(tickers),
            resume_token=resume_token or "",
            event_ticker=event_ticker or "",
            series_ticker=series_ticker or "",
            include_latest=include_latest,
            overflow_policy=overflow_policy,
            max_batch_size=max_batch_size,
        )
        if start_time is not None:
            request.start_time.CopyFrom(to_timestamp(start_time))
        if heartbeat_interval is not None:
            request.heartbeat_interval.CopyFrom(to_duration(heartbeat_interval))
        if conflation_interval is not None:
            request.conflation_interval.CopyFrom(to_duration(conflation_interval))
        return resumable_stream(self.markets, request, retry=retry, resume_on_gap=resume_on_gap)

    def stream_trades(
        self,
        tickers: Iterable[str] = (),
        *,
        start_time: datetime | None = None,
        resume_token: str | None = None,
        event_ticker: str | None = None,
        series_ticker: str | None = None,
        heartbeat_interval: timedelta | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ) -> AsyncGenerator[market_service_pb2.StreamTradesResponse, None]:
        """The public tape of the selected markets (no tickers and no event/series: all):
        stored trades after ``resume_token`` or from ``start_time`` (else none), a caught-up
        marker, then live trades — resumed after a disconnect like :meth:`stream_snapshots`.
        With ``start_time`` only trades created at or after it come, as for snapshots.
        Ready trades travel in ``trade_batch`` messages of up to ``max_batch_size``."""
        request = market_service_pb2.StreamTradesRequest(
            tickers=list(tickers),
            resume_token=resume_token or "",
            event_ticker=event_ticker or "",
            series_ticker=series_ticker or "",
            max_batch_size=max_batch_size,
        )
        if start_time is not None:
            request.start_time.CopyFrom(to_timestamp(start_time))
        if heartbeat_interval is not None:
            request.heartbeat_interval.CopyFrom(to_duration(heartbeat_interval))
        return resumable_stream(self.markets, request, retry=retry)

    def stream_order_books(
        self,
        tickers: Iterable[str] = (),
        *,
        start_time: datetime | None = None,
        resume_token: str | None = None,
        depth: int = 0,
        event_ticker: str | None = None,
        series_ticker: str | None = None,
        heartbeat_interval: timedelta | None = None,
        conflation_interval: timedelta | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ) -> AsyncGenerator[market_service_pb2.StreamOrderBooksResponse, None]:
        """The order books of the selected markets (no tickers and no event/series: all): each
        market's full book (at ``start_time``, or now; none after ``resume_token``), every
        change since, a caught-up marker, then live changes, and a full book again after a feed
        gap — resumed after a disconnect like :meth:`stream_snapshots`. Batches are handed out a
        book or change a message (the batch's token on its last). ``depth`` trims full books
        only; :class:`kfeed_client.books.LocalOrderBooks` applies the messages. With
        ``conflation_interval``, live changes come as at most one full book per market per
        interval (``coalesced_count``: the changes it holds), which replaces the local book."""
        request = market_service_pb2.StreamOrderBooksRequest(
            tickers=list(tickers),
            resume_token=resume_token or "",
            depth=depth,
            event_ticker=event_ticker or "",
            series_ticker=series_ticker or "",
            max_batch_size=max_batch_size,
        )
        if start_time is not None:
            request.start_time.CopyFrom(to_timestamp(start_time))
        if heartbeat_interval is not None:
            request.heartbeat_interval.CopyFrom(to_duration(heartbeat_interval))
        if conflation_interval is not None:
            request.conflation_interval.CopyFrom(to_duration(conflation_interval))
        return resumable_stream(self.markets, request, retry=retry)


def _set_window(
    request: (
        market_service_pb2.ListSnapshotsRequest
        | market_service_pb2.ListTradesRequest
        | market_service_pb2.ListCandlesRequest
    ),
    start: datetime | None,
    end: datetime | None,
) -> None:
    if start is not None:
        request.start_time.CopyFrom(to_timestamp(start))
    if end is not None:
        request.end_time.CopyFrom(to_timestamp(end))


def connect(
    address: str = DEFAULT_ADDRESS,
    *,
    token: str | None = None,
    tls: TlsConfig | None = None,
) -> KfeedClient:
    """A client of the kfeed server at ``address`` (HOST:PORT).

    ``token`` is sent as ``authorization: Bearer <token>`` on every call; ``tls`` switches the
    channel to TLS (mutual when it names a client certificate). The channel connects lazily, on
    the first call. Call from within a running event loop.
    """
    return KfeedClient(open_channel(address, token=token, tls=tls))
