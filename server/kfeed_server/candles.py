"""Candles: OHLC of a market's top of book and of its trades over fixed UTC intervals.

The definition (docs/CANDLES.md) in short. Candle k of interval I covers [a, a + I) with a an
integer multiple of I after the Unix epoch. The top of book is a step function of time: the
state at instant t is the last snapshot with exchange_time <= t in (exchange_time, id) order.
A candle's bid (ask) values are that function's values on [a, a + I): the state in force at a,
then the last snapshot of each distinct exchange_time strictly inside (several snapshots at one
instant were never in force but the last). Open = first, close = last, high/low = extremes of the
values that show a level; absent when none does. Open interest is the close state's. Trades are
those with a <= create_time < a + I in (create_time, trade_id) order; the count-weighted mean
price is rounded to the nearest 1/10,000 USD, halves up. All integer arithmetic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from kfeed_server.db.repositories.candles import CandleSourceRepository
from kfeed_server.records import BookPoint, CandleRecord, PriceOhlc, TradePoint

T = TypeVar("T")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_INTERVAL = timedelta(seconds=1)
MAX_INTERVAL = timedelta(days=1)


def align_down(time: datetime, interval: timedelta) -> datetime:
    """The start of the candle of ``interval`` that contains ``time``."""
    return EPOCH + (time - EPOCH) // interval * interval


@dataclass(frozen=True, slots=True)
class CandleGrid:
    """``count`` consecutive candles of ``interval`` from ``first_start`` (aligned)."""

    first_start: datetime
    interval: timedelta
    count: int

    @property
    def end(self) -> datetime:
        return self.first_start + self.count * self.interval

    def index(self, time: datetime) -> int:
        return (time - self.first_start) // self.interval

    def start_of(self, index: int) -> datetime:
        return self.first_start + index * self.interval


class _Ohlc:
    """A price's open/high/low/close as values arrive; ``None`` values show no level."""

    __slots__ = ("close", "high", "low", "open")

    def __init__(self) -> None:
        self.open: int | None = None
        self.high = self.low = self.close = 0

    def add(self, value: int | None) -> None:
        if value is None:
            return
        if self.open is None:
            self.open = self.high = self.low = value
        elif value > self.high:
            self.high = value
        elif value < self.low:
            self.low = value
        self.close = value

    def result(self) -> PriceOhlc | None:
        return None if self.open is None else PriceOhlc(self.open, self.high, self.low, self.close)


@dataclass(frozen=True, slots=True)
class _BookCandle:
    yes_bid: PriceOhlc | None
    yes_ask: PriceOhlc | None
    open_interest: int | None


_NO_BOOK = _BookCandle(None, None, None)


class BookAggregator:
    """The bid/ask part of a grid's candles from the state in force at the grid's start and
    the snapshots after it, fed in (exchange_time, id) order in any number of chunks."""

    def __init__(self, grid: CandleGrid, opening: BookPoint | None) -> None:
        self._grid = grid
        self.candles: list[_BookCandle] = []
        self._state = opening
        self._bid, self._ask = _Ohlc(), _Ohlc()
        self._open_with(opening)
        # The latest snapshot, held back until the next shows another instant (or the end):
        # only the last of several at one instant was ever in force.
        self._pending: BookPoint | None = None

    def _open_with(self, state: BookPoint | None) -> None:
        self._bid, self._ask = _Ohlc(), _Ohlc()
        if state is not None:
            self._bid.add(state.yes_bid)
            self._ask.add(state.yes_ask)

    def _close_current(self) -> None:
        state = self._state
        self.candles.append(
            _BookCandle(
                self._bid.result(),
                self._ask.result(),
                None if state is None else state.open_interest,
            )
        )

    def _flat_candles_until(self, index: int) -> None:
        """Candles before ``index`` after the current one: no snapshot, the state held."""
        state = self._state
        flat = (
            _NO_BOOK
            if state is None
            else _BookCandle(_flat(state.yes_bid), _flat(state.yes_ask), state.open_interest)
        )
        missing = index - len(self.candles)
        if missing > 0:
            self.candles.extend([flat] * missing)

    def _apply(self, point: BookPoint) -> None:
        grid = self._grid
        index = grid.index(point.exchange_time)
        current = len(self.candles)
        if index != current:
            self._close_current()
            self._flat_candles_until(index)
            if point.exchange_time == grid.start_of(index):
                self._state = point  # in force at the candle's start: its open
                self._open_with(point)
                return
            self._open_with(self._state)
        self._state = point
        self._bid.add(point.yes_bid)
        self._ask.add(point.yes_ask)

    def add(self, points: Iterable[BookPoint]) -> None:
        pending = self._pending
        for point in points:
            if pending is not None and pending.exchange_time != point.exchange_time:
                self._apply(pending)
            pending = point
        self._pending = pending

    def finish(self) -> list[_BookCandle]:
        if self._pending is not None:
            self._apply(self._pending)
            self._pending = None
        self._close_current()
        self._flat_candles_until(self._grid.count)
        return self.candles


def _flat(value: int | None) -> PriceOhlc | None:
    return None if value is None else PriceOhlc(value, value, value, value)


@dataclass(frozen=True, slots=True)
class _TradeCandle:
    price: PriceOhlc | None
    mean_price: int | None
    volume: int
    trade_count: int


_NO_TRADES = _TradeCandle(None, None, 0, 0)


def rounded_mean(weighted_sum: int, weight: int) -> int:
    """``weighted_sum / weight`` to the nearest integer, halves up (``weight`` > 0)."""
    return (2 * weighted_sum + weight) // (2 * weight)


class TradeAggregator:
    """The trade part of a grid's candles, fed trades in (create_time, trade_id) order."""

    def __init__(self, grid: CandleGrid) -> None:
        self._grid = grid
        self._by_index: dict[int, tuple[_Ohlc, list[int]]] = {}

    def add(self, trades: Iterable[TradePoint]) -> None:
        index_of: Callable[[datetime], int] = self._grid.index
        by_index = self._by_index
        for trade in trades:
            index = index_of(trade.create_time)
            entry = by_index.get(index)
            if entry is None:
                entry = by_index[index] = (_Ohlc(), [0, 0, 0])  # Σ price×count, Σ count, n
            entry[0].add(trade.yes_price)
            sums = entry[1]
            sums[0] += trade.yes_price * trade.size
            sums[1] += trade.size
            sums[2] += 1

    def finish(self) -> list[_TradeCandle]:
        candles = [_NO_TRADES] * self._grid.count
        for index, (ohlc, (weighted, volume, count)) in self._by_index.items():
            mean = rounded_mean(weighted, volume) if volume > 0 else None
            candles[index] = _TradeCandle(ohlc.result(), mean, volume, count)
        return candles


async def build_candles(
    sources: CandleSourceRepository, ticker: str, grid: CandleGrid
) -> list[CandleRecord]:
    """The grid's candles of ``ticker`` from its stored snapshots and trades."""
    book = BookAggregator(grid, await sources.book_state_at(ticker, grid.first_start))
    await _feed(book.add, sources.book_points(ticker, after=grid.first_start, before=grid.end))
    trades = TradeAggregator(grid)
    await _feed(trades.add, sources.trade_points(ticker, start=grid.first_start, before=grid.end))
    return [
        CandleRecord(
            start_time=grid.start_of(index),
            end_time=grid.start_of(index + 1),
            yes_bid=b.yes_bid,
            yes_ask=b.yes_ask,
            price=t.price,
            mean_price=t.mean_price,
            volume=t.volume,
            trade_count=t.trade_count,
            open_interest=b.open_interest,
        )
        for index, (b, t) in enumerate(zip(book.finish(), trades.finish(), strict=True))
    ]


async def _feed(add: Callable[[list[T]], None], chunks: AsyncIterator[list[T]]) -> None:
    async for chunk in chunks:
        add(chunk)
