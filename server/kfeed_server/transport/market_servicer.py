"""kfeed.v1.MarketService: queries over the repositories and the live snapshot stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar, cast

import grpc

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_server.books import BookStream, OrderBooks
from kfeed_server.db.repositories import Repositories
from kfeed_server.records import MarketStatus, Page
from kfeed_server.streaming.hub import SnapshotHub
from kfeed_server.transport import candles, export, market_structure, order_books
from kfeed_server.transport.book_stream import BookStreams
from kfeed_server.transport.convert import (
    feed_gap_to_proto,
    market_to_proto,
    snapshot_fields,
    snapshot_to_proto,
    trade_to_proto,
)
from kfeed_server.transport.errors import NotFound
from kfeed_server.transport.requests import (
    PageSizeLimits,
    RequestTokens,
    enum_values,
    optional_ticker,
    require_ticker,
    ticker_list,
    time_window,
)
from kfeed_server.transport.snapshot_stream import SnapshotStreams, StreamLimits
from kfeed_server.transport.trade_stream import TradeStreams

MARKETS_PAGE = PageSizeLimits(default=100, maximum=1000)
SNAPSHOTS_PAGE = PageSizeLimits(default=1000, maximum=10_000)
TRADES_PAGE = PageSizeLimits(default=1000, maximum=10_000)
FEED_GAPS_PAGE = PageSizeLimits(default=100, maximum=1000)
MAX_FEED_GAP_TICKERS = 1000

Context = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R")


class MarketServicer(pb_grpc.MarketServiceServicer):
    """Serves MarketService from the repositories. Holds no SQL."""

    def __init__(
        self,
        repositories: Repositories,
        hub: SnapshotHub,
        tokens: RequestTokens,
        stream_limits: StreamLimits | None = None,
    ) -> None:
        self._markets = repositories.markets
        self._snapshots = repositories.snapshots
        self._trades = repositories.trades
        self._feed_gaps = repositories.feed_gaps
        self._candle_sources = repositories.candle_sources
        self._books = OrderBooks(repositories.markets, repositories.books)
        self._exports = repositories.exports
        self._tokens = tokens
        self._streams = SnapshotStreams(
            repositories.markets,
            repositories.snapshots,
            hub,
            tokens,
            stream_limits or StreamLimits(),
            repositories.exports,
        )
        self._trade_streams = TradeStreams(self._streams, repositories.trades, tokens)
        self._book_streams = BookStreams(
            self._streams,
            repositories.markets,
            BookStream(self._books, repositories.books),
            tokens,
        )

    async def _require_market(self, ticker: str) -> None:
        if await self._markets.get_market(ticker) is None:
            raise NotFound("market", ticker)

    async def ListMarkets(
        self, request: pb.ListMarketsRequest, context: Context
    ) -> pb.ListMarketsResponse:
        limit = MARKETS_PAGE.resolve(request.page_size)
        event_ticker = optional_ticker(request.event_ticker, "event_ticker")
        series_ticker = optional_ticker(request.series_ticker, "series_ticker")
        statuses = enum_values(request.statuses, MarketStatus, "statuses")
        query = ("ListMarkets", event_ticker, series_ticker, tuple(sorted(statuses)))
        cursor = self._tokens.decode_page_token(request.page_token, query, shape=(str,))
        page = await self._markets.list_markets(
            limit=limit,
            after_ticker=str(cursor[0]) if cursor else None,
            event_ticker=event_ticker,
            series_ticker=series_ticker,
            statuses=statuses,
        )
        return pb.ListMarketsResponse(
            markets=[market_to_proto(m) for m in page.items],
            next_page_token=self._tokens.encode_page_token(page.next_cursor, query),
        )

    async def GetMarket(
        self, request: pb.GetMarketRequest, context: Context
    ) -> pb.GetMarketResponse:
        ticker = require_ticker(request.ticker)
        market = await self._markets.get_market(ticker)
        if market is None:
            raise NotFound("market", ticker)
        return pb.GetMarketResponse(market=market_to_proto(market))

    async def GetLatestSnapshot(
        self, request: pb.GetLatestSnapshotRequest, context: Context
    ) -> pb.GetLatestSnapshotResponse:
        ticker = require_ticker(request.ticker)
        snapshot = await self._snapshots.latest(ticker)
        if snapshot is None:
            await self._require_market(ticker)
            raise NotFound("snapshot", ticker)
        return pb.GetLatestSnapshotResponse(snapshot=snapshot_to_proto(snapshot))

    async def _list_time_range(
        self,
        method: str,
        request: pb.ListSnapshotsRequest | pb.ListTradesRequest,
        limits: PageSizeLimits,
        id_type: type,
        list_range: Callable[..., Awaitable[Page[R]]],
    ) -> tuple[list[R], str]:
        """One page of a market's rows in the request's time window, keyset-paged by
        (time, ``id_type``), and the next page token."""
        ticker = require_ticker(request.ticker)
        limit = limits.resolve(request.page_size)
        start, end = time_window(request)
        query = (method, ticker, start, end)
        cursor = self._tokens.decode_page_token(
            request.page_token, query, shape=(datetime, id_type)
        )
        await self._require_market(ticker)
        page = await list_range(ticker, start=start, end=end, limit=limit, after=cursor)
        return page.items, self._tokens.encode_page_token(page.next_cursor, query)

    async def ListSnapshots(
        self, request: pb.ListSnapshotsRequest, context: Context
    ) -> pb.ListSnapshotsResponse:
        snapshots, next_page_token = await self._list_time_range(
            "ListSnapshots", request, SNAPSHOTS_PAGE, int, self._snapshots.list_range
        )
        response = pb.ListSnapshotsResponse(next_page_token=next_page_token)
        add = response.snapshots.add  # built in place: no per-message copy
        for snapshot in snapshots:
            add(**snapshot_fields(snapshot))
        return response

    async def ListTrades(
        self, request: pb.ListTradesRequest, context: Context
    ) -> pb.ListTradesResponse:
        trades, next_page_token = await self._list_time_range(
            "ListTrades", request, TRADES_PAGE, str, self._trades.list_range
        )
        return pb.ListTradesResponse(
            trades=[trade_to_proto(t) for t in trades], next_page_token=next_page_token
        )

    async def ListFeedGaps(
        self, request: pb.ListFeedGapsRequest, context: Context
    ) -> pb.ListFeedGapsResponse:
        tickers = sorted(set(ticker_list(request.tickers, MAX_FEED_GAP_TICKERS)))
        limit = FEED_GAPS_PAGE.resolve(request.page_size)
        start, end = time_window(request)
        query = ("ListFeedGaps", tuple(tickers), start, end)
        cursor = self._tokens.decode_page_token(request.page_token, query, shape=(datetime, int))
        known = await self._markets.existing_tickers(tickers)
        for ticker in tickers:
            if ticker not in known:
                raise NotFound("market", ticker)
        page = await self._feed_gaps.list_newest_first(
            tickers=tickers or None,
            start=start,
            end=end,
            limit=limit,
            # decode_page_token checked the cursor's shape.
            before=cast(tuple[datetime, int] | None, cursor),
        )
        return pb.ListFeedGapsResponse(
            feed_gaps=[feed_gap_to_proto(g) for g in page.items],
            next_page_token=self._tokens.encode_page_token(page.next_cursor, query),
        )

    # Yields responses encoded once and shared by subscribers (bytes, see stream_frames) rather
    # than the messages the stubs describe.
    async def StreamSnapshots(  # type: ignore[override]
        self, request: pb.StreamSnapshotsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        async for response in self._streams.responses(request, context):
            yield response

    async def StreamTrades(  # type: ignore[override]
        self, request: pb.StreamTradesRequest, context: Context
    ) -> AsyncIterator[bytes]:
        async for response in self._trade_streams.responses(request, context):
            yield response

    async def StreamOrderBooks(  # type: ignore[override]
        self, request: pb.StreamOrderBooksRequest, context: Context
    ) -> AsyncIterator[bytes]:
        async for response in self._book_streams.responses(request, context):
            yield response

    async def ListEvents(
        self, request: pb.ListEventsRequest, context: Context
    ) -> pb.ListEventsResponse:
        return await market_structure.list_events(self._markets, self._tokens, request)

    async def GetEvent(self, request: pb.GetEventRequest, context: Context) -> pb.GetEventResponse:
        return await market_structure.get_event(self._markets, request)

    async def ListSeries(
        self, request: pb.ListSeriesRequest, context: Context
    ) -> pb.ListSeriesResponse:
        return await market_structure.list_series(self._markets, self._tokens, request)

    async def GetSeries(
        self, request: pb.GetSeriesRequest, context: Context
    ) -> pb.GetSeriesResponse:
        return await market_structure.get_series(self._markets, request)

    async def ListCandles(
        self, request: pb.ListCandlesRequest, context: Context
    ) -> pb.ListCandlesResponse:
        return await candles.list_candles(
            self._markets, self._candle_sources, self._tokens, request
        )

    async def GetOrderBook(
        self, request: pb.GetOrderBookRequest, context: Context
    ) -> pb.GetOrderBookResponse:
        return await order_books.get_order_book(self._books, request)

    async def ExportSnapshots(
        self, request: pb.ExportSnapshotsRequest, context: Context
    ) -> AsyncIterator[pb.ExportSnapshotsResponse]:
        async for message in export.export_snapshots(self._markets, self._exports, request):
            yield message

    async def ExportTrades(
        self, request: pb.ExportTradesRequest, context: Context
    ) -> AsyncIterator[pb.ExportTradesResponse]:
        async for message in export.export_trades(self._markets, self._exports, request):
            yield message

    async def ExportOrderBookChanges(
        self, request: pb.ExportOrderBookChangesRequest, context: Context
    ) -> AsyncIterator[pb.ExportOrderBookChangesResponse]:
        markets, exports = self._markets, self._exports
        async for message in export.export_order_book_changes(markets, exports, request):
            yield message
