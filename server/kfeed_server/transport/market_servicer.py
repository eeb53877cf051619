"""kfeed.v1.MarketService: queries over the repositories and the live snapshot stream."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import grpc

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_server.db.repositories import Repositories
from kfeed_server.records import MarketStatus, Page
from kfeed_server.streaming.feed import (
    CaughtUpEvent,
    Delivery,
    FeedGapEvent,
    FeedRequest,
    HeartbeatEvent,
    OverflowPolicy,
    SnapshotEvent,
    SubscriberGapEvent,
    SubscriberOverflowError,
    snapshot_feed,
)
from kfeed_server.streaming.hub import MarketSelector, SnapshotHub
from kfeed_server.transport import candles, market_structure
from kfeed_server.transport.convert import (
    feed_gap_to_proto,
    market_to_proto,
    snapshot_fields,
    snapshot_to_proto,
    timestamp,
    trade_to_proto,
)
from kfeed_server.transport.errors import InvalidArgument, NotFound, ResourceExhausted
from kfeed_server.transport.requests import (
    PageSizeLimits,
    RequestTokens,
    duration_seconds,
    enum_values,
    optional_ticker,
    optional_time,
    require_ticker,
    time_window,
)

MARKETS_PAGE = PageSizeLimits(default=100, maximum=1000)
SNAPSHOTS_PAGE = PageSizeLimits(default=1000, maximum=10_000)
TRADES_PAGE = PageSizeLimits(default=1000, maximum=10_000)

MAX_STREAM_TICKERS = 10_000
# Streamed snapshot messages are identical for every subscriber: build each once.
_MESSAGE_CACHE_SIZE = 8192

Context = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R")


class MarketServicer(pb_grpc.MarketServiceServicer):
    """Serves MarketService from the repositories. Holds no SQL."""

    def __init__(self, repositories: Repositories, hub: SnapshotHub, tokens: RequestTokens) -> None:
        self._markets = repositories.markets
        self._snapshots = repositories.snapshots
        self._trades = repositories.trades
        self._candle_sources = repositories.candle_sources
        self._hub = hub
        self._tokens = tokens
        self._snapshot_messages: OrderedDict[int, pb.StreamSnapshotsResponse] = OrderedDict()

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

    async def _feed_request(self, request: pb.StreamSnapshotsRequest) -> FeedRequest:
        if len(request.tickers) > MAX_STREAM_TICKERS:
            raise InvalidArgument.field("tickers", f"at most {MAX_STREAM_TICKERS} tickers")
        tickers = [require_ticker(t, f"tickers[{i}]") for i, t in enumerate(request.tickers)]
        event_ticker = optional_ticker(request.event_ticker, "event_ticker")
        series_ticker = optional_ticker(request.series_ticker, "series_ticker")
        resume_after_id = (
            self._tokens.decode_resume_token(request.resume_token) if request.resume_token else None
        )
        start_time = optional_time(request, "start_time")
        heartbeat = duration_seconds(
            request, "heartbeat_interval", default=5.0, minimum=0.1, maximum=60.0
        )
        conflation = duration_seconds(
            request, "conflation_interval", default=None, minimum=0.01, maximum=60.0
        )
        policy = (
            OverflowPolicy.RESOURCE_EXHAUSTED
            if request.overflow_policy == pb.OVERFLOW_POLICY_RESOURCE_EXHAUSTED
            else OverflowPolicy.GAP_MARKER
        )
        known = await self._markets.existing_tickers(tickers)
        for ticker in tickers:
            if ticker not in known:
                raise NotFound("market", ticker)
        selected = set(tickers)
        if event_ticker or series_ticker:
            # Markets that exist now; ones created later match through the hub's directory.
            selected.update(
                await self._markets.tickers_matching(
                    event_ticker=event_ticker, series_ticker=series_ticker
                )
            )
        selector = MarketSelector(frozenset(selected), event_ticker, series_ticker)
        return FeedRequest(
            selector=selector,
            start_time=start_time,
            resume_after_id=resume_after_id,
            include_latest=request.include_latest,
            heartbeat_interval=heartbeat or 5.0,
            conflation_interval=conflation,
            overflow_policy=policy,
            history_tickers=None if selector.selects_all else sorted(selected),
        )

    def _snapshot_message(self, event: SnapshotEvent, token: str) -> pb.StreamSnapshotsResponse:
        if event.coalesced_count:
            return pb.StreamSnapshotsResponse(
                resume_token=token,
                snapshot=pb.SnapshotUpdate(
                    snapshot=snapshot_to_proto(event.snapshot),
                    coalesced_count=event.coalesced_count,
                ),
            )
        cache = self._snapshot_messages
        message = cache.get(event.snapshot.snapshot_id)
        if message is None or message.resume_token != token:
            message = pb.StreamSnapshotsResponse(
                resume_token=token,
                snapshot=pb.SnapshotUpdate(snapshot=snapshot_to_proto(event.snapshot)),
            )
            cache[event.snapshot.snapshot_id] = message
            if len(cache) > _MESSAGE_CACHE_SIZE:
                cache.popitem(last=False)
        return message

    def _to_message(self, delivery: Delivery) -> pb.StreamSnapshotsResponse:
        token = self._tokens.encode_resume_token(delivery.resume_after_id)
        event = delivery.event
        if isinstance(event, SnapshotEvent):
            return self._snapshot_message(event, token)
        if isinstance(event, CaughtUpEvent):
            return pb.StreamSnapshotsResponse(
                resume_token=token, caught_up=pb.CaughtUp(replayed_count=event.replayed_count)
            )
        if isinstance(event, HeartbeatEvent):
            return pb.StreamSnapshotsResponse(
                resume_token=token,
                heartbeat=pb.Heartbeat(server_time=timestamp(event.server_time)),
            )
        if isinstance(event, SubscriberGapEvent):
            return pb.StreamSnapshotsResponse(
                resume_token=token,
                subscriber_gap=pb.SubscriberGap(dropped_count=event.dropped_count),
            )
        assert isinstance(event, FeedGapEvent)
        return pb.StreamSnapshotsResponse(resume_token=token, feed_gap=feed_gap_to_proto(event.gap))

    async def StreamSnapshots(
        self, request: pb.StreamSnapshotsRequest, context: Context
    ) -> AsyncIterator[pb.StreamSnapshotsResponse]:
        feed_request = await self._feed_request(request)
        feed = snapshot_feed(feed_request, self._hub, self._snapshots)
        try:
            async for delivery in feed:
                yield self._to_message(delivery)
        except SubscriberOverflowError as overflow:
            raise ResourceExhausted(
                f"{overflow}; resume with resume_token "
                f"{self._tokens.encode_resume_token(overflow.resume_after_id)!r}"
            ) from None
        finally:
            # Frees the subscription at once, also when the client cancels.
            await feed.aclose()

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
