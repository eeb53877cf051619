"""The REST API under ``/trade-api/v2``: Kalshi's paths, query parameters, pagination and errors."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kfeed_sim.fixed_point import rfc3339
from kfeed_sim.market_model import STATUS_FILTERS, Event, Exchange, Market, MarketStatus, Trade
from kfeed_sim.shapes import Renderer, candlesticks

REST_PREFIX = "/trade-api/v2"
MARKETS_PAGE_CAP = 1_000
TRADES_PAGE_CAP = 1_000
EVENTS_PAGE_CAP = 200
DEFAULT_PAGE = 100
CANDLE_PERIODS = (1, 60, 1440)

T = TypeVar("T")


class ApiError(Exception):
    """An error answered with Kalshi's body ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str) -> JSONResponse:
    """Kalshi's error body."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def api_error_handler(_: Request, exc: Exception) -> Response:
    """Renders :class:`ApiError` (and starlette's own 404/405) in Kalshi's shape."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message)
    if isinstance(exc, HTTPException):
        code = "not_found" if exc.status_code == 404 else "bad_request"
        return error_response(exc.status_code, code, str(exc.detail))
    raise exc


def not_found(what: str) -> ApiError:
    """404 in Kalshi's shape."""
    return ApiError(404, "not_found", f"{what} not found")


def bad_request(message: str) -> ApiError:
    """400 in Kalshi's shape."""
    return ApiError(400, "bad_request", message)


# -- query parameters --------------------------------------------------------------------------


def int_param(request: Request, name: str, default: int | None = None) -> int | None:
    """An optional integer query parameter (400 when not an integer)."""
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise bad_request(f"{name} must be an integer") from None


def required_int(request: Request, name: str) -> int:
    """A required integer query parameter."""
    value = int_param(request, name)
    if value is None:
        raise bad_request(f"{name} is required")
    return value


def page_limit(request: Request, default: int, cap: int) -> int:
    """``limit``, capped server-side as Kalshi does (values above the cap get the cap)."""
    limit = int_param(request, "limit", default)
    assert limit is not None
    if limit < 1:
        raise bad_request("limit must be positive")
    return min(limit, cap)


def encode_cursor(position: int) -> str:
    """An opaque cursor for a position in a stable ordering."""
    return base64.urlsafe_b64encode(json.dumps({"p": position}).encode()).decode().rstrip("=")


def decode_cursor(request: Request) -> int | None:
    """The position a ``cursor`` parameter stands for (400 when it is not one of ours)."""
    raw = request.query_params.get("cursor")
    if not raw:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        position = payload["p"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise bad_request("invalid cursor") from None
    if not isinstance(position, int):
        raise bad_request("invalid cursor")
    return position


def paginate(
    request: Request, items: Iterable[T], position_of: Callable[[T], int], cap: int, default: int
) -> tuple[list[T], str]:
    """One page of ``items`` (ordered by ``position_of``) after the cursor, and the next cursor.

    Positions never change (markets and events are append-only, trades are numbered), so pages
    stay consistent while the exchange keeps moving.
    """
    limit = page_limit(request, default, cap)
    after = decode_cursor(request)
    page: list[T] = []
    more = False
    for item in items:
        if after is not None and position_of(item) <= after:
            continue
        if len(page) == limit:
            more = True
            break
        page.append(item)
    return page, encode_cursor(position_of(page[-1])) if more else ""


def statuses(request: Request) -> frozenset[MarketStatus] | None:
    """The ``status`` filter (comma-separated filter vocabulary) as lifecycle values."""
    raw = request.query_params.get("status")
    if not raw:
        return None
    wanted: set[MarketStatus] = set()
    for name in raw.split(","):
        if name.strip() not in STATUS_FILTERS:
            raise bad_request(f"invalid status {name!r}; use one of {', '.join(STATUS_FILTERS)}")
        wanted |= STATUS_FILTERS[name.strip()]
    return frozenset(wanted)


# -- the API ------------------------------------------------------------------------------------


class RestApi:
    """Route handlers over one live :class:`Exchange`."""

    def __init__(self, exchange: Exchange, renderer: Renderer) -> None:
        self.exchange = exchange
        self.render = renderer

    def routes(self) -> list[Route]:
        """The routes, mounted under ``/trade-api/v2``."""
        paths: Sequence[tuple[str, Callable[[Request], Any]]] = (
            ("/exchange/status", self.exchange_status),
            ("/exchange/schedule", self.exchange_schedule),
            ("/series", self.list_series),
            ("/series/{series_ticker}", self.get_series),
            ("/series/{series_ticker}/markets/{ticker}/candlesticks", self.candlesticks),
            ("/events", self.list_events),
            ("/events/{event_ticker}", self.get_event),
            ("/markets", self.list_markets),
            ("/markets/trades", self.list_trades),
            ("/markets/{ticker}", self.get_market),
            ("/markets/{ticker}/orderbook", self.orderbook),
            ("/historical/cutoff", self.historical_cutoff),
            ("/historical/markets", self.list_historical_markets),
            ("/historical/markets/{ticker}", self.get_historical_market),
            ("/historical/markets/{ticker}/candlesticks", self.historical_candlesticks),
            ("/historical/trades", self.list_historical_trades),
        )
        return [Route(REST_PREFIX + path, endpoint, methods=["GET"]) for path, endpoint in paths]

    # exchange and series

    async def exchange_status(self, _: Request) -> Response:
        """Always open: the sim never halts trading."""
        return JSONResponse({"exchange_active": True, "trading_active": True})

    async def exchange_schedule(self, _: Request) -> Response:
        """Open around the clock, no maintenance windows."""
        all_day = [{"open_time": "00:00", "close_time": "24:00"}]
        days = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
        hours: dict[str, object] = {day: all_day for day in days}
        hours |= {"start_time": "2020-01-01T00:00:00Z", "end_time": "2100-01-01T00:00:00Z"}
        return JSONResponse({"schedule": {"standard_hours": [hours], "maintenance_windows": []}})

    async def list_series(self, _: Request) -> Response:
        """Every series."""
        return JSONResponse(
            {"series": [self.render.series(s) for s in self.exchange.series.values()]}
        )

    async def get_series(self, request: Request) -> Response:
        """One series."""
        spec = self.exchange.series.get(request.path_params["series_ticker"])
        if spec is None:
            raise not_found("series")
        return JSONResponse({"series": self.render.series(spec)})

    # events

    def _event_status(self, event: Event) -> frozenset[MarketStatus]:
        return frozenset(self.exchange.markets[t].status for t in event.market_tickers)

    async def list_events(self, request: Request) -> Response:
        """``/events`` with ``status``, ``series_ticker``, ``with_nested_markets``."""
        wanted = statuses(request)
        series = request.query_params.get("series_ticker")
        nested = request.query_params.get("with_nested_markets", "").lower() == "true"
        order = {ticker: index for index, ticker in enumerate(self.exchange.events)}
        events = (
            event
            for event in self.exchange.events.values()
            if (series is None or event.series_ticker == series)
            and (wanted is None or self._event_status(event) & wanted)
        )
        page, cursor = paginate(
            request, events, lambda e: order[e.event_ticker], EVENTS_PAGE_CAP, EVENTS_PAGE_CAP
        )
        body = [self.render.event(event, self.exchange, nested) for event in page]
        return JSONResponse({"events": body, "cursor": cursor})

    async def get_event(self, request: Request) -> Response:
        """``{event, markets}``."""
        event = self.exchange.events.get(request.path_params["event_ticker"])
        if event is None:
            raise not_found("event")
        markets = [self.render.market(self.exchange.markets[t]) for t in event.market_tickers]
        return JSONResponse({"event": self.render.event(event, self.exchange), "markets": markets})

    # markets

    def _market_page(self, request: Request, historical: bool) -> Response:
        wanted = statuses(request)
        params = request.query_params
        event_ticker = params.get("event_ticker")
        series_ticker = params.get("series_ticker")
        tickers = {t for t in params.get("tickers", "").split(",") if t} or None
        min_close = int_param(request, "min_close_ts")
        max_close = int_param(request, "max_close_ts")
        order = {ticker: index for index, ticker in enumerate(self.exchange.markets)}

        def selected(market: Market) -> bool:
            close_s = market.close_us // 1_000_000
            return (
                self.exchange.is_historical_market(market) == historical
                and (wanted is None or market.status in wanted)
                and (event_ticker is None or market.event_ticker == event_ticker)
                and (series_ticker is None or market.series_ticker == series_ticker)
                and (tickers is None or market.ticker in tickers)
                and (min_close is None or close_s >= min_close)
                and (max_close is None or close_s <= max_close)
            )

        markets = filter(selected, self.exchange.markets.values())
        page, cursor = paginate(
            request, markets, lambda m: order[m.ticker], MARKETS_PAGE_CAP, DEFAULT_PAGE
        )
        return JSONResponse({"markets": [self.render.market(m) for m in page], "cursor": cursor})

    def _market(self, request: Request, historical: bool) -> Market:
        market = self.exchange.markets.get(request.path_params["ticker"])
        if market is None or self.exchange.is_historical_market(market) != historical:
            raise not_found("market")
        return market

    async def list_markets(self, request: Request) -> Response:
        """``/markets``: live-tier markets with Kalshi's filters."""
        return self._market_page(request, historical=False)

    async def list_historical_markets(self, request: Request) -> Response:
        """``/historical/markets``: markets settled before the cutoff."""
        return self._market_page(request, historical=True)

    async def get_market(self, request: Request) -> Response:
        """``{market}``."""
        return JSONResponse({"market": self.render.market(self._market(request, False))})

    async def get_historical_market(self, request: Request) -> Response:
        """``{market}`` from the historical tier."""
        return JSONResponse({"market": self.render.market(self._market(request, True))})

    async def orderbook(self, request: Request) -> Response:
        """``{orderbook_fp: {yes_dollars, no_dollars}}``: bids only."""
        depth = int_param(request, "depth")
        if depth is not None and depth < 0:
            raise bad_request("depth must not be negative")
        return JSONResponse(self.render.orderbook(self._market(request, False), depth))

    # trades

    def _trade_page(self, request: Request, historical: bool) -> Response:
        ticker = request.query_params.get("ticker")
        min_ts = int_param(request, "min_ts")
        max_ts = int_param(request, "max_ts")
        cutoff = self.exchange.historical_cutoff_us
        if ticker is not None:
            market = self.exchange.markets.get(ticker)
            source: Sequence[Trade] = market.trades if market else ()
        else:
            source = sorted(
                (t for m in self.exchange.markets.values() for t in m.trades),
                key=lambda t: t.seq,
            )

        def selected(trade: Trade) -> bool:
            seconds = trade.ts_us // 1_000_000
            return (
                (trade.ts_us < cutoff) == historical
                and (min_ts is None or seconds >= min_ts)
                and (max_ts is None or seconds <= max_ts)
            )

        # newest first, as Kalshi lists trades; the position is the negated trade number
        trades = filter(selected, reversed(source))
        page, cursor = paginate(request, trades, lambda t: -t.seq, TRADES_PAGE_CAP, DEFAULT_PAGE)
        return JSONResponse({"trades": [self.render.trade(t) for t in page], "cursor": cursor})

    async def list_trades(self, request: Request) -> Response:
        """``/markets/trades``: trades since the historical cutoff, newest first."""
        return self._trade_page(request, historical=False)

    async def list_historical_trades(self, request: Request) -> Response:
        """``/historical/trades``: trades before the cutoff."""
        return self._trade_page(request, historical=True)

    # candlesticks

    def _candles(self, request: Request, market: Market) -> Response:
        start_ts, end_ts = required_int(request, "start_ts"), required_int(request, "end_ts")
        period = required_int(request, "period_interval")
        if period not in CANDLE_PERIODS:
            raise bad_request("period_interval must be 1, 60 or 1440")
        if end_ts < start_ts:
            raise bad_request("end_ts must not be before start_ts")
        candles = candlesticks(self.render, market, start_ts, end_ts, period, self.exchange.now_us)
        return JSONResponse({"market_ticker": market.ticker, "candlesticks": candles})

    async def candlesticks(self, request: Request) -> Response:
        """``/series/{s}/markets/{t}/candlesticks`` (live tier)."""
        market = self._market(request, historical=False)
        if market.series_ticker != request.path_params["series_ticker"]:
            raise not_found("market")
        return self._candles(request, market)

    async def historical_candlesticks(self, request: Request) -> Response:
        """``/historical/markets/{t}/candlesticks``."""
        return self._candles(request, self._market(request, historical=True))

    async def historical_cutoff(self, _: Request) -> Response:
        """Where the historical tier ends (fixed for a sim run)."""
        cutoff = rfc3339(self.exchange.historical_cutoff_us)
        return JSONResponse(
            {"market_settled_ts": cutoff, "trades_created_ts": cutoff, "orders_updated_ts": cutoff}
        )
