"""ListCandles: request validation and paging; the candles come from kfeed_server.candles.

A window longer than one page is paged (``next_page_token`` holds the next candle's start), never
refused: each page reads only its own candles' rows.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2

from kfeed.v1 import market_service_pb2 as pb
from kfeed_server.candles import (
    MAX_INTERVAL,
    MIN_INTERVAL,
    CandleGrid,
    align_down,
    build_candles,
)
from kfeed_server.db.repositories import CandleSourceRepository, MarketRepository
from kfeed_server.transport.convert import candle_to_proto
from kfeed_server.transport.errors import InvalidArgument, NotFound
from kfeed_server.transport.requests import (
    PageSizeLimits,
    RequestTokens,
    require_ticker,
    time_window,
)

CANDLES_PAGE = PageSizeLimits(default=1000, maximum=10_000)


def candle_interval(request: pb.ListCandlesRequest) -> timedelta:
    """The request's interval: a whole number of seconds from 1 s to 1 day."""
    if not request.HasField("interval"):
        raise InvalidArgument.field("interval", "is required")
    value: duration_pb2.Duration = request.interval
    if value.nanos != 0:
        raise InvalidArgument.field("interval", "must be a whole number of seconds")
    if value.seconds < MIN_INTERVAL.total_seconds():
        raise InvalidArgument.field("interval", "must be positive")
    if value.seconds > MAX_INTERVAL.total_seconds():
        raise InvalidArgument.field("interval", "must be at most 1 day (86400 s)")
    return timedelta(seconds=value.seconds)


def _grid(
    first: datetime, end: datetime | None, interval: timedelta, limit: int
) -> tuple[CandleGrid, bool]:
    """The page's candles from ``first`` and whether more follow before ``end`` (None: now)."""
    window_end = end if end is not None else datetime.now(UTC)
    remaining = max(0, -((first - window_end) // interval))  # ceil((end - first) / interval)
    count = min(limit, remaining)
    grid = CandleGrid(first, interval, count)
    try:
        grid.start_of(count)  # the last candle's end is a representable time
    except OverflowError:
        raise InvalidArgument.field("end_time", "is too late for this interval") from None
    return grid, remaining > count


async def list_candles(
    markets: MarketRepository,
    sources: CandleSourceRepository,
    tokens: RequestTokens,
    request: pb.ListCandlesRequest,
) -> pb.ListCandlesResponse:
    ticker = require_ticker(request.ticker)
    interval = candle_interval(request)
    limit = CANDLES_PAGE.resolve(request.page_size)
    start, end = time_window(request)
    if start is None:
        raise InvalidArgument.field("start_time", "is required")
    try:
        first = align_down(start, interval)
    except OverflowError:
        raise InvalidArgument.field("start_time", "is too early for this interval") from None
    query = ("ListCandles", ticker, start, end, int(interval.total_seconds()))
    cursor = tokens.decode_page_token(request.page_token, query, shape=(datetime,))
    if cursor is not None:
        after = cursor[0]
        assert isinstance(after, datetime)
        if after.tzinfo is None or after < first or align_down(after, interval) != after:
            raise InvalidArgument.field("page_token", "is not a valid page token")
        first = after
    if await markets.get_market(ticker) is None:
        raise NotFound("market", ticker)
    grid, more = _grid(first, end, interval, limit)
    candles = await build_candles(sources, ticker, grid) if grid.count else []
    return pb.ListCandlesResponse(
        candles=[candle_to_proto(c) for c in candles],
        next_page_token=tokens.encode_page_token((grid.end,) if more else None, query),
    )
