"""Typed views of Kalshi's JSON responses.

Every model ignores unknown fields and treats every field it does not strictly need as optional:
Kalshi adds and removes fields often (the integer-cent fields went away on 2026-03-12). Money
stays a string here; :mod:`kfeed_ingest.kalshi.normalise` turns it into exact fixed point.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict


def _blank_to_none(value: Any) -> Any:
    """Kalshi sends "" (and sometimes 0) for a time it does not know yet."""
    if value in ("", 0, "0"):
        return None
    return value


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def from_epoch_ms(milliseconds: int) -> datetime:
    """Milliseconds since the epoch as an exact UTC datetime (no float rounding)."""
    return _EPOCH + timedelta(milliseconds=milliseconds)


OptionalTime = Annotated[datetime | None, BeforeValidator(_blank_to_none)]
"""An RFC 3339 or unix-seconds time; blank means unknown."""


class KalshiModel(BaseModel):
    """Base of every response model: unknown fields are ignored, instances are read-only."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class KalshiSeries(KalshiModel):
    """``/series/{ticker}`` → ``series``."""

    ticker: str
    title: str = ""
    category: str = ""
    frequency: str = ""
    tags: list[str] | None = None
    fee_type: str = ""
    fee_multiplier: float | str | None = None


class KalshiMarket(KalshiModel):
    """One market from ``/markets``, ``/markets/{ticker}`` or the historical tier."""

    ticker: str
    event_ticker: str = ""
    # Absent on the real API (take it from the event); present on some clients' fixtures.
    series_ticker: str | None = None
    market_type: str = ""
    title: str = ""
    subtitle: str = ""
    yes_sub_title: str = ""
    no_sub_title: str = ""
    open_time: OptionalTime = None
    close_time: OptionalTime = None
    expiration_time: OptionalTime = None
    expected_expiration_time: OptionalTime = None
    latest_expiration_time: OptionalTime = None
    settlement_ts: OptionalTime = None
    created_time: OptionalTime = None
    updated_time: OptionalTime = None
    status: str = ""
    result: str | None = None
    settlement_value_dollars: str | None = None
    yes_bid_dollars: str | None = None
    yes_ask_dollars: str | None = None
    no_bid_dollars: str | None = None
    no_ask_dollars: str | None = None
    last_price_dollars: str | None = None
    liquidity_dollars: str | None = None
    volume_fp: str | None = None
    volume_24h_fp: str | None = None
    open_interest_fp: str | None = None
    yes_bid_size_fp: str | None = None
    yes_ask_size_fp: str | None = None
    price_level_structure: str = ""
    fractional_trading_enabled: bool = False
    rules_primary: str = ""
    # Legacy integer fields (cents / whole contracts), read only when the string form is absent.
    settlement_value: int | None = None
    yes_bid: int | None = None
    yes_ask: int | None = None
    no_bid: int | None = None
    no_ask: int | None = None
    last_price: int | None = None
    liquidity: int | None = None
    volume: int | None = None
    volume_24h: int | None = None
    open_interest: int | None = None


class KalshiEvent(KalshiModel):
    """One event from ``/events`` or ``/events/{event_ticker}``."""

    event_ticker: str
    series_ticker: str = ""
    title: str = ""
    sub_title: str = ""
    category: str = ""
    mutually_exclusive: bool = False
    strike_date: OptionalTime = None
    strike_period: str | None = None
    markets: list[KalshiMarket] | None = None
    # Event-level fee overrides (Kalshi's fee rules; absent on most events).
    fee_type_override: str | None = None
    fee_multiplier_override: float | str | None = None


class KalshiTrade(KalshiModel):
    """One public trade from ``/markets/trades`` (REST) or the ``trade`` channel (WebSocket)."""

    trade_id: str
    # REST says ``ticker``; the WebSocket channel says ``market_ticker``.
    ticker: str = ""
    market_ticker: str = ""
    count_fp: str | None = None
    yes_price_dollars: str | None = None
    no_price_dollars: str | None = None
    taker_outcome_side: str | None = None
    taker_side: str | None = None
    taker_book_side: str | None = None
    is_block_trade: bool = False
    created_time: OptionalTime = None
    # WebSocket: seconds since the epoch (``ts``) or milliseconds (``ts_ms``).
    ts: int | None = None
    ts_ms: int | None = None
    count: int | None = None
    yes_price: int | None = None
    no_price: int | None = None

    @property
    def market(self) -> str:
        """The market ticker, whichever name the source used."""
        return self.ticker or self.market_ticker

    @property
    def time(self) -> datetime | None:
        """When the trade happened, in UTC."""
        if self.created_time is not None:
            return _utc(self.created_time)
        if self.ts_ms is not None:
            return from_epoch_ms(self.ts_ms)
        if self.ts is not None:
            return from_epoch_ms(self.ts * 1000)
        return None


PriceLevel = tuple[str, str]
"""``[price_dollars, count_fp]`` as Kalshi sends it."""


class KalshiOrderbookLevels(KalshiModel):
    """Both sides of a bids-only order book."""

    yes_dollars: list[PriceLevel] | None = None
    no_dollars: list[PriceLevel] | None = None
    # Legacy: [[price_cents, count], ...].
    yes: list[tuple[int, int]] | None = None
    no: list[tuple[int, int]] | None = None


class KalshiOrderbookResponse(KalshiModel):
    """``/markets/{ticker}/orderbook``; older responses used the key ``orderbook``."""

    orderbook_fp: KalshiOrderbookLevels | None = None
    orderbook: KalshiOrderbookLevels | None = None

    @property
    def levels(self) -> KalshiOrderbookLevels:
        """Whichever book the response carried (an empty one when neither)."""
        return self.orderbook_fp or self.orderbook or KalshiOrderbookLevels()


class KalshiCandlePrice(KalshiModel):
    """Trade-price OHLC of one candlestick (every field may be null for a quiet period)."""

    open_dollars: str | None = None
    high_dollars: str | None = None
    low_dollars: str | None = None
    close_dollars: str | None = None
    mean_dollars: str | None = None
    previous_dollars: str | None = None


class KalshiCandleQuote(KalshiModel):
    """Bid or ask OHLC of one candlestick."""

    open_dollars: str | None = None
    high_dollars: str | None = None
    low_dollars: str | None = None
    close_dollars: str | None = None


class KalshiCandlestick(KalshiModel):
    """One period of ``/series/{s}/markets/{t}/candlesticks``."""

    end_period_ts: int
    volume_fp: str | None = None
    open_interest_fp: str | None = None
    price: KalshiCandlePrice | None = None
    yes_bid: KalshiCandleQuote | None = None
    yes_ask: KalshiCandleQuote | None = None
    volume: int | None = None
    open_interest: int | None = None

    @property
    def end_time(self) -> datetime:
        """The end of the period, in UTC."""
        return from_epoch_ms(self.end_period_ts * 1000)


class KalshiCandlesticks(KalshiModel):
    """A market's candlesticks response."""

    market_ticker: str = ""
    candlesticks: list[KalshiCandlestick] = []


class KalshiHistoricalCutoff(KalshiModel):
    """``/historical/cutoff``: data older than these times lives in the historical tier."""

    market_settled_ts: OptionalTime = None
    trades_created_ts: OptionalTime = None
    orders_updated_ts: OptionalTime = None


class KalshiExchangeStatus(KalshiModel):
    """``/exchange/status``."""

    exchange_active: bool = False
    trading_active: bool = False


def utc(value: datetime | None) -> datetime | None:
    """``value`` as an aware UTC datetime (a naive one is taken to be UTC already)."""
    return _utc(value)
