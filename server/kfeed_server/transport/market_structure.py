"""ListEvents, GetEvent, ListSeries, GetSeries: the market structure Kalshi users navigate by.

Events and series are stored by ingest as it sees them (IngestService.Publish upserts them by
ticker); these RPCs read them back, keyset-paged by ticker like ListMarkets.
"""

from __future__ import annotations

from kfeed.v1 import market_service_pb2 as pb
from kfeed_server.db.repositories import MarketRepository
from kfeed_server.transport.convert import event_to_proto, market_to_proto, series_to_proto
from kfeed_server.transport.errors import InvalidArgument, NotFound
from kfeed_server.transport.requests import (
    PageSizeLimits,
    RequestTokens,
    optional_ticker,
    require_ticker,
)

EVENTS_PAGE = PageSizeLimits(default=100, maximum=1000)
SERIES_PAGE = PageSizeLimits(default=100, maximum=1000)
MAX_CATEGORY_LENGTH = 128


def _optional_category(value: str) -> str | None:
    if not value:
        return None
    if len(value) > MAX_CATEGORY_LENGTH or not value.isprintable():
        raise InvalidArgument.field("category", "is not a valid category")
    return value


async def list_events(
    markets: MarketRepository, tokens: RequestTokens, request: pb.ListEventsRequest
) -> pb.ListEventsResponse:
    limit = EVENTS_PAGE.resolve(request.page_size)
    series_ticker = optional_ticker(request.series_ticker, "series_ticker")
    query = ("ListEvents", series_ticker)
    cursor = tokens.decode_page_token(request.page_token, query, shape=(str,))
    page = await markets.list_events(
        limit=limit,
        after_event_ticker=str(cursor[0]) if cursor else None,
        series_ticker=series_ticker,
    )
    return pb.ListEventsResponse(
        events=[event_to_proto(e) for e in page.items],
        next_page_token=tokens.encode_page_token(page.next_cursor, query),
    )


async def get_event(markets: MarketRepository, request: pb.GetEventRequest) -> pb.GetEventResponse:
    event_ticker = require_ticker(request.event_ticker, "event_ticker")
    event = await markets.get_event(event_ticker)
    if event is None:
        raise NotFound("event", event_ticker)
    event_markets = await markets.markets_of_event(event_ticker)
    return pb.GetEventResponse(
        event=event_to_proto(event), markets=[market_to_proto(m) for m in event_markets]
    )


async def list_series(
    markets: MarketRepository, tokens: RequestTokens, request: pb.ListSeriesRequest
) -> pb.ListSeriesResponse:
    limit = SERIES_PAGE.resolve(request.page_size)
    category = _optional_category(request.category)
    query = ("ListSeries", category)
    cursor = tokens.decode_page_token(request.page_token, query, shape=(str,))
    page = await markets.list_series(
        limit=limit, after_ticker=str(cursor[0]) if cursor else None, category=category
    )
    return pb.ListSeriesResponse(
        series=[series_to_proto(s) for s in page.items],
        next_page_token=tokens.encode_page_token(page.next_cursor, query),
    )


async def get_series(
    markets: MarketRepository, request: pb.GetSeriesRequest
) -> pb.GetSeriesResponse:
    series_ticker = require_ticker(request.series_ticker, "series_ticker")
    series = await markets.get_series(series_ticker)
    if series is None:
        raise NotFound("series", series_ticker)
    return pb.GetSeriesResponse(series=series_to_proto(series))
