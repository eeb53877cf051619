"""Kalshi JSON models → ``kfeed.v1`` protobuf messages, exactly.

Prices become integers in 1/10,000 USD and counts integers in 1/100 contract by parsing the
decimal string (never through float). The legacy integer fields (cents, whole contracts) are read
only when the string field is absent. Times become UTC; a snapshot's exchange time (when the
exchange produced it) is kept apart from its receive time (when ingest read it).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Literal

from google.protobuf.timestamp_pb2 import Timestamp

from kfeed.v1 import types_pb2
from kfeed_ingest.kalshi.models import (
    KalshiCandlestick,
    KalshiEvent,
    KalshiMarket,
    KalshiOrderbookLevels,
    KalshiSeries,
    KalshiTrade,
    utc,
)

logger = logging.getLogger(__name__)

PRICE_SCALE = 10_000
"""Fixed-point units per dollar."""
COUNT_SCALE = 100
"""Fixed-point units per contract."""
ONE_DOLLAR = PRICE_SCALE
_CENT = PRICE_SCALE // 100
_PARSED_KEPT = 65_536  # distinct strings remembered by parse_price and parse_count each


class FixedPointError(ValueError):
    """A decimal string that does not fit the fixed-point scale exactly (or is not a number)."""


def _parse_fixed(text: str, scale: int, what: str) -> int:
    try:
        value = Decimal(text.strip())
    except (InvalidOperation, AttributeError):
        raise FixedPointError(f"{what} {text!r} is not a decimal number") from None
    if not value.is_finite():
        raise FixedPointError(f"{what} {text!r} is not a finite number")
    scaled = value * scale
    if scaled != scaled.to_integral_value():
        places = len(str(scale)) - 1
        raise FixedPointError(f"{what} {text!r} has more than {places} decimal places")
    return int(scaled)


# The WebSocket parses two of these per book change, mostly the same few strings again: a
# bounded memo makes that a dictionary lookup (a refused string is parsed, and refused, again).
@functools.lru_cache(maxsize=_PARSED_KEPT)
def parse_price(text: str) -> int:
    """``"0.4200"`` → ``4200``: a dollar string in 1/10,000 USD, rejecting a finer fraction."""
    return _parse_fixed(text, PRICE_SCALE, "price")


@functools.lru_cache(maxsize=_PARSED_KEPT)
def parse_count(text: str) -> int:
    """``"1500.00"`` → ``150000``: a contract count in 1/100 contract, rejecting a finer one."""
    return _parse_fixed(text, COUNT_SCALE, "count")


def format_price(ten_thousandths: int) -> str:
    """The inverse of :func:`parse_price`: ``4200`` → ``"0.4200"``."""
    return f"{Decimal(ten_thousandths) / PRICE_SCALE:.4f}"


def price_or_legacy(dollars: str | None, legacy_cents: int | None) -> int | None:
    """The price from the dollar string, else from the legacy cents, else ``None``."""
    if dollars is not None and dollars != "":
        return parse_price(dollars)
    if legacy_cents is not None:
        return legacy_cents * _CENT
    return None


def count_or_legacy(fixed_point: str | None, legacy_count: int | None) -> int | None:
    """The count from the ``*_fp`` string, else from the legacy whole count, else ``None``."""
    if fixed_point is not None and fixed_point != "":
        return parse_count(fixed_point)
    if legacy_count is not None:
        return legacy_count * COUNT_SCALE
    return None


def dollars(value: int | None) -> types_pb2.Dollars | None:
    """A ``Dollars`` message, or ``None`` (field left absent) for an unknown amount."""
    return None if value is None else types_pb2.Dollars(ten_thousandths=value)


def contracts(value: int | None) -> types_pb2.Contracts | None:
    """A ``Contracts`` message, or ``None`` (field left absent) for an unknown count."""
    return None if value is None else types_pb2.Contracts(hundredths=value)


def timestamp(value: datetime | None) -> Timestamp | None:
    """A protobuf ``Timestamp`` in UTC, or ``None`` for an unknown time."""
    aware = utc(value)
    if aware is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(aware)
    return stamp


def now_utc() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


_STATUS_BY_NAME: dict[str, types_pb2.MarketStatus.ValueType] = {
    # lifecycle values of the `status` field
    "initialized": types_pb2.MARKET_STATUS_UNOPENED,
    "active": types_pb2.MARKET_STATUS_OPEN,
    "inactive": types_pb2.MARKET_STATUS_PAUSED,
    "closed": types_pb2.MARKET_STATUS_CLOSED,
    "determined": types_pb2.MARKET_STATUS_DETERMINED,
    "disputed": types_pb2.MARKET_STATUS_DISPUTED,
    "amended": types_pb2.MARKET_STATUS_AMENDED,
    "finalized": types_pb2.MARKET_STATUS_FINALIZED,
    # values of the `status` filter (and older field names)
    "unopened": types_pb2.MARKET_STATUS_UNOPENED,
    "open": types_pb2.MARKET_STATUS_OPEN,
    "paused": types_pb2.MARKET_STATUS_PAUSED,
    "settled": types_pb2.MARKET_STATUS_FINALIZED,
}

_RESULT_BY_NAME: dict[str, types_pb2.MarketResult.ValueType] = {
    "yes": types_pb2.MARKET_RESULT_YES,
    "no": types_pb2.MARKET_RESULT_NO,
    "scalar": types_pb2.MARKET_RESULT_SCALAR,
}

_SIDE_BY_NAME: dict[str, types_pb2.Side.ValueType] = {
    "yes": types_pb2.SIDE_YES,
    "no": types_pb2.SIDE_NO,
}


def market_status(name: str | None) -> types_pb2.MarketStatus.ValueType:
    """A Kalshi status (field or filter vocabulary) as ``MarketStatus``; unknown → UNSPECIFIED."""
    status = _STATUS_BY_NAME.get((name or "").strip().lower())
    if status is None:
        if name:
            logger.warning("unknown Kalshi market status %r", name)
        return types_pb2.MARKET_STATUS_UNSPECIFIED
    return status


def market_result(name: str | None) -> types_pb2.MarketResult.ValueType:
    """``"yes"``/``"no"``/``"scalar"`` as ``MarketResult``; empty or unknown → UNSPECIFIED."""
    return _RESULT_BY_NAME.get((name or "").strip().lower(), types_pb2.MARKET_RESULT_UNSPECIFIED)


def _fee_multiplier(value: float | str | None) -> int:
    if value is None or value == "":
        return PRICE_SCALE  # Kalshi's default multiplier is 1.0
    # str() of a JSON float is its shortest exact decimal form, so no binary noise leaks in.
    return _parse_fixed(str(value), PRICE_SCALE, "fee multiplier")


def series_message(series: KalshiSeries) -> types_pb2.Series:
    """A Kalshi series as ``kfeed.v1.Series``."""
    return types_pb2.Series(
        ticker=series.ticker,
        title=series.title,
        category=series.category,
        frequency=series.frequency,
        tags=series.tags or [],
        fee_type=series.fee_type,
        fee_multiplier_ten_thousandths=_fee_multiplier(series.fee_multiplier),
    )


def event_message(event: KalshiEvent) -> types_pb2.Event:
    """A Kalshi event as ``kfeed.v1.Event``."""
    return types_pb2.Event(
        event_ticker=event.event_ticker,
        series_ticker=event.series_ticker,
        title=event.title,
        sub_title=event.sub_title,
        category=event.category,
        mutually_exclusive=event.mutually_exclusive,
        strike_time=timestamp(event.strike_date),
        fee_type_override=event.fee_type_override or "",
        fee_multiplier_override_ten_thousandths=(
            None
            if event.fee_multiplier_override in (None, "")
            else _fee_multiplier(event.fee_multiplier_override)
        ),
    )


def market_message(market: KalshiMarket, series_ticker: str = "") -> types_pb2.Market:
    """A Kalshi market as ``kfeed.v1.Market``.

    The market object has no series ticker on the real API: pass the one from its event.
    """
    settlement_value = price_or_legacy(market.settlement_value_dollars, market.settlement_value)
    return types_pb2.Market(
        ticker=market.ticker,
        event_ticker=market.event_ticker,
        series_ticker=series_ticker or market.series_ticker or "",
        title=market.title,
        subtitle=market.subtitle,
        yes_sub_title=market.yes_sub_title,
        no_sub_title=market.no_sub_title,
        market_type=market.market_type,
        status=market_status(market.status),
        result=market_result(market.result),
        open_time=timestamp(market.open_time),
        close_time=timestamp(market.close_time),
        expiration_time=timestamp(market.expiration_time),
        settlement_time=timestamp(market.settlement_ts),
        settlement_value=dollars(settlement_value),
        price_level_structure=market.price_level_structure,
        fractional_trading_enabled=market.fractional_trading_enabled,
        rules_primary=market.rules_primary,
    )


def complement(price: int | None) -> int | None:
    """The other side's price: a YES bid at X is a NO ask at 1 − X."""
    return None if price is None else ONE_DOLLAR - price


def _bid(price: int | None) -> int | None:
    """Kalshi shows an empty bid side as a bid of 0; kfeed leaves the price absent."""
    return None if price == 0 else price


def _ask(price: int | None) -> int | None:
    """Kalshi shows an empty ask side as an ask of 1.00; kfeed leaves the price absent."""
    return None if price == ONE_DOLLAR else price


def snapshot_from_market(
    market: KalshiMarket,
    receive_time: datetime,
    source: types_pb2.DataSource.ValueType = types_pb2.DATA_SOURCE_POLL,
) -> types_pb2.MarketSnapshot:
    """A REST market's quote and activity as a snapshot.

    The exchange time is the market's ``updated_time`` (when the exchange last changed it), or
    the receive time when the exchange did not say.
    """
    yes_bid = _bid(price_or_legacy(market.yes_bid_dollars, market.yes_bid))
    yes_ask = _ask(price_or_legacy(market.yes_ask_dollars, market.yes_ask))
    no_bid = _bid(price_or_legacy(market.no_bid_dollars, market.no_bid))
    no_ask = _ask(price_or_legacy(market.no_ask_dollars, market.no_ask))
    return types_pb2.MarketSnapshot(
        ticker=market.ticker,
        exchange_time=timestamp(market.updated_time or receive_time),
        receive_time=timestamp(receive_time),
        source=source,
        yes_bid=dollars(yes_bid),
        yes_ask=dollars(yes_ask if yes_ask is not None else complement(no_bid)),
        no_bid=dollars(no_bid if no_bid is not None else complement(yes_ask)),
        no_ask=dollars(no_ask if no_ask is not None else complement(yes_bid)),
        yes_bid_size=contracts(count_or_legacy(market.yes_bid_size_fp, None)),
        yes_ask_size=contracts(count_or_legacy(market.yes_ask_size_fp, None)),
        last_price=dollars(price_or_legacy(market.last_price_dollars, market.last_price)),
        volume=contracts(count_or_legacy(market.volume_fp, market.volume)),
        volume_24h=contracts(count_or_legacy(market.volume_24h_fp, market.volume_24h)),
        open_interest=contracts(count_or_legacy(market.open_interest_fp, market.open_interest)),
        liquidity=dollars(price_or_legacy(market.liquidity_dollars, market.liquidity)),
        status=market_status(market.status),
    )


def _best_bid(side: dict[int, int]) -> int | None:
    """The highest price with a size (the highest price of all, in C, when it has one: books
    hold no empty levels, so this is the usual case)."""
    best = max(side, default=None)
    if best is None or side[best] > 0:
        return best
    return max((price for price, count in side.items() if count > 0), default=None)


_PriceField = Literal["yes_bid", "yes_ask", "no_bid", "no_ask"]
_SizeField = Literal["yes_bid_size", "yes_ask_size"]


@dataclass(frozen=True, slots=True)
class TopOfBook:
    """Best bid on each side of a bids-only book, with the size resting there.

    Kalshi's books hold bids only: a NO bid at X is a YES ask at 1 − X. Best levels are found
    with ``max`` rather than by trusting the array order. An empty side has no price and no size,
    so two tops compare equal exactly when they show the same quote.
    """

    yes_bid: int | None
    yes_bid_size: int | None
    no_bid: int | None
    no_bid_size: int | None

    @classmethod
    def from_levels(cls, yes: dict[int, int], no: dict[int, int]) -> TopOfBook:
        """From ``{price: count}`` maps of each side's bids (levels with no size are ignored)."""
        yes_bid, no_bid = _best_bid(yes), _best_bid(no)
        return cls(
            yes_bid=yes_bid,
            yes_bid_size=None if yes_bid is None else yes[yes_bid],
            no_bid=no_bid,
            no_bid_size=None if no_bid is None else no[no_bid],
        )

    @classmethod
    def from_quote(
        cls,
        yes_bid: int | None,
        yes_bid_size: int | None,
        yes_ask: int | None,
        yes_ask_size: int | None,
    ) -> TopOfBook:
        """From a YES quote as the ticker channel and REST show it, placeholders included (a bid
        of 0 or an ask of 1.00 is an empty side)."""
        bid, ask = _bid(yes_bid), _ask(yes_ask)
        return cls(
            yes_bid=bid,
            yes_bid_size=None if bid is None else yes_bid_size,
            no_bid=complement(ask),
            no_bid_size=None if ask is None else yes_ask_size,
        )

    @property
    def yes_ask(self) -> int | None:
        """Best YES ask = 1 − best NO bid."""
        return complement(self.no_bid)

    @property
    def no_ask(self) -> int | None:
        """Best NO ask = 1 − best YES bid."""
        return complement(self.yes_bid)

    def apply_to(self, snapshot: types_pb2.MarketSnapshot) -> None:
        """Write the four prices and the two YES-side sizes into ``snapshot``."""
        prices: tuple[tuple[_PriceField, int | None], ...] = (
            ("yes_bid", self.yes_bid),
            ("yes_ask", self.yes_ask),
            ("no_bid", self.no_bid),
            ("no_ask", self.no_ask),
        )
        sizes: tuple[tuple[_SizeField, int | None], ...] = (
            ("yes_bid_size", self.yes_bid_size),
            ("yes_ask_size", self.no_bid_size),
        )
        for name, value in prices:
            if value is None:
                snapshot.ClearField(name)
            else:
                getattr(snapshot, name).ten_thousandths = value
        for size_name, size in sizes:
            if size is None:
                snapshot.ClearField(size_name)
            else:
                getattr(snapshot, size_name).hundredths = size


def book_side(levels: Iterable[Sequence[str]]) -> dict[int, int]:
    """``[[price_dollars, count_fp], …]`` as ``{price: count}`` in fixed point (sizes summed)."""
    side: dict[int, int] = {}
    for level in levels:
        price, count = parse_price(level[0]), parse_count(level[1])
        side[price] = side.get(price, 0) + count
    return side


def _legacy_book_side(levels: Iterable[Sequence[int]]) -> dict[int, int]:
    side: dict[int, int] = {}
    for cents, count in levels:
        side[cents * _CENT] = side.get(cents * _CENT, 0) + count * COUNT_SCALE
    return side


def orderbook_sides(levels: KalshiOrderbookLevels) -> tuple[dict[int, int], dict[int, int]]:
    """The YES and NO bid maps of a REST order book (legacy integer levels as a fallback)."""
    yes = book_side(levels.yes_dollars) if levels.yes_dollars is not None else None
    no = book_side(levels.no_dollars) if levels.no_dollars is not None else None
    if yes is None:
        yes = _legacy_book_side(levels.yes or [])
    if no is None:
        no = _legacy_book_side(levels.no or [])
    return yes, no


def trade_message(trade: KalshiTrade) -> types_pb2.Trade:
    """A public trade as ``kfeed.v1.Trade``."""
    yes_price = price_or_legacy(trade.yes_price_dollars, trade.yes_price)
    no_price = price_or_legacy(trade.no_price_dollars, trade.no_price)
    side_name = (trade.taker_outcome_side or trade.taker_side or "").lower()
    return types_pb2.Trade(
        trade_id=trade.trade_id,
        ticker=trade.market,
        yes_price=dollars(yes_price if yes_price is not None else complement(no_price)),
        no_price=dollars(no_price if no_price is not None else complement(yes_price)),
        count=contracts(count_or_legacy(trade.count_fp, trade.count)),
        taker_side=_SIDE_BY_NAME.get(side_name, types_pb2.SIDE_UNSPECIFIED),
        create_time=timestamp(trade.time),
    )


def _close(quote: object) -> str | None:
    return getattr(quote, "close_dollars", None)


def snapshot_from_candlestick(
    ticker: str, candle: KalshiCandlestick, receive_time: datetime
) -> types_pb2.MarketSnapshot:
    """A candlestick's closing quote as a BACKFILL snapshot at the end of its period.

    A candle's volume is the period's, not the running total a snapshot carries, so volume is
    left absent; open interest is a level and is kept.
    """
    yes_bid = parse_price(close) if (close := _close(candle.yes_bid)) else None
    yes_ask = parse_price(close) if (close := _close(candle.yes_ask)) else None
    last = parse_price(close) if (close := _close(candle.price)) else None
    return types_pb2.MarketSnapshot(
        ticker=ticker,
        exchange_time=timestamp(candle.end_time),
        receive_time=timestamp(receive_time),
        source=types_pb2.DATA_SOURCE_BACKFILL,
        yes_bid=dollars(yes_bid),
        yes_ask=dollars(yes_ask),
        no_bid=dollars(complement(yes_ask)),
        no_ask=dollars(complement(yes_bid)),
        last_price=dollars(last),
        open_interest=contracts(count_or_legacy(candle.open_interest_fp, candle.open_interest)),
    )


# Fields that say when/how a snapshot was observed rather than what the market looked like.
_OBSERVATION_FIELDS: tuple[
    Literal["snapshot_id", "exchange_time", "receive_time", "source", "exchange_sequence"], ...
] = ("snapshot_id", "exchange_time", "receive_time", "source", "exchange_sequence")


class SnapshotDeduper:
    """Suppresses a snapshot identical (book and activity) to the last one sent for its market,
    and one of an exchange instant no later than that one's: one snapshot per market and
    instant, whichever source (a REST read of a quiet market shows the instant the socket
    already showed, with 24 h volume and liquidity as REST has them)."""

    def __init__(self) -> None:
        self._last: dict[str, bytes] = {}
        self._last_time: dict[str, int] = {}  # exchange time (µs) of the last one sent

    @staticmethod
    def _content(snapshot: types_pb2.MarketSnapshot) -> bytes:
        content = types_pb2.MarketSnapshot()
        content.CopyFrom(snapshot)
        for name in _OBSERVATION_FIELDS:
            content.ClearField(name)
        return content.SerializeToString(deterministic=True)

    def admit(self, snapshot: types_pb2.MarketSnapshot) -> bool:
        """True (and remembered) when the snapshot differs from the previous one for its market."""
        content = self._content(snapshot)
        if self._last.get(snapshot.ticker) == content:
            return False
        if snapshot.HasField("exchange_time"):
            instant = snapshot.exchange_time.ToMicroseconds()
            if instant <= self._last_time.get(snapshot.ticker, instant - 1):
                return False
            self.shown(snapshot.ticker, instant)
        self._last[snapshot.ticker] = content
        return True

    def shown(self, ticker: str, instant_micros: int) -> None:
        """The server already holds a snapshot of ``ticker`` at this exchange instant."""
        self._last_time[ticker] = max(self._last_time.get(ticker, instant_micros), instant_micros)
