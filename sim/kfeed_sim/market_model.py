"""The deterministic exchange: series → events → binary markets, order books, trades, lifecycles.

Everything is driven by :meth:`Exchange.step`, never by the wall clock: step ``k`` happens at sim
time ``origin + k × step`` (past steps, generated at start as history, use a longer step), and
every random choice comes from one ``random.Random(seed)`` consumed in step order. So the same
config gives the same sequence of states and trades no matter how fast the steps are taken.

Units: prices are integers in 1/10,000 USD, counts integers in 1/100 contract, times integers in
microseconds since the epoch (whole milliseconds, so ``ts_ms`` on the WebSocket is exact).
"""

from __future__ import annotations

import bisect
import random
import uuid
from array import array
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from kfeed_sim.config import SimConfig
from kfeed_sim.fixed_point import COUNT_SCALE, ONE_DOLLAR, micros_from_datetime

Side = Literal["yes", "no"]
BookSide = Literal["bid", "ask"]

BOOK_DEPTH = 5
FIREHOSE_LIFETIME_FACTOR = 100
"""Firehose markets live this many times longer (a load test wants few market changes)."""
FIREHOSE_PRICE_MOVE = 0.01
"""Firehose: chance per step that the fair price walks and the book is rebuilt around it."""
_TRADE_COUNTS = (0, 0, 1, 1, 2)
_FIREHOSE_TRADE_COUNTS = (0, 0, 0, 0, 0, 0, 0, 0, 0, 1)
DAY_US = 86_400 * 1_000_000
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")


class MarketStatus(StrEnum):
    """Lifecycle values of the market ``status`` field (not the filter vocabulary)."""

    INITIALIZED = "initialized"
    INACTIVE = "inactive"
    ACTIVE = "active"
    CLOSED = "closed"
    DETERMINED = "determined"
    FINALIZED = "finalized"


STATUS_FILTERS: dict[str, frozenset[MarketStatus]] = {
    "unopened": frozenset({MarketStatus.INITIALIZED}),
    "open": frozenset({MarketStatus.ACTIVE}),
    "paused": frozenset({MarketStatus.INACTIVE}),
    "closed": frozenset({MarketStatus.CLOSED, MarketStatus.DETERMINED}),
    "settled": frozenset({MarketStatus.FINALIZED}),
}
"""The ``status`` query filter vocabulary mapped onto lifecycle values."""


@dataclass(frozen=True)
class PriceRange:
    """One tick band: prices from ``start`` to ``end`` move in steps of ``step`` (price units)."""

    start: int
    end: int
    step: int


PRICE_STRUCTURES: dict[str, tuple[PriceRange, ...]] = {
    "linear_cent": (PriceRange(0, ONE_DOLLAR, 100),),
    "deci_cent": (PriceRange(0, ONE_DOLLAR, 10),),
    "tapered_deci_cent": (
        PriceRange(0, 1_000, 10),
        PriceRange(1_000, 9_000, 100),
        PriceRange(9_000, ONE_DOLLAR, 10),
    ),
}


def price_levels(ranges: Iterable[PriceRange]) -> list[int]:
    """Every valid price strictly between 0 and 1 USD on the grid the ranges describe."""
    levels = {
        price
        for band in ranges
        for price in range(band.start, band.end + 1, band.step)
        if 0 < price < ONE_DOLLAR
    }
    return sorted(levels)


@dataclass(frozen=True)
class SeriesSpec:
    """A series and how its events and strikes are drawn."""

    ticker: str
    title: str
    category: str
    frequency: str
    tags: tuple[str, ...]
    price_level_structure: str
    strike_base: int
    strike_step: int
    strike_unit: str


SERIES: tuple[SeriesSpec, ...] = (
    SeriesSpec("KXSIMHIGH", "Highest temperature in Sim City", "Climate and Weather", "daily",
               ("Weather",), "linear_cent", 50, 5, "°"),
    SeriesSpec("KXSIMBTC", "Sim Bitcoin price", "Crypto", "hourly",
               ("BTC",), "tapered_deci_cent", 95_000, 2_500, " USD"),
    SeriesSpec("KXSIMRAIN", "Rain in Sim City", "Climate and Weather", "daily",
               ("Weather",), "deci_cent", 1, 1, " in"),
)  # fmt: skip


@dataclass
class Event:
    """An event: markets on one question with different strikes, sharing a close time."""

    event_ticker: str
    series_ticker: str
    title: str
    sub_title: str
    category: str
    strike_date_us: int
    market_tickers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MarketState:
    """One published state of a market: what REST shows between two changes.

    ``ts_us`` is the exchange time of the change (``updated_time``; ``ts_ms`` on the ticker
    channel). Prices in 1/10,000 USD, counts in 1/100 contract; ``result`` is "" until determined.
    """

    ts_us: int
    status: MarketStatus
    yes_bid: int
    yes_ask: int
    no_bid: int
    no_ask: int
    yes_bid_size: int
    yes_ask_size: int
    last_price: int
    previous_yes_bid: int
    previous_yes_ask: int
    previous_price: int
    volume: int
    volume_24h: int
    open_interest: int
    liquidity: int
    dollar_volume: int
    last_trade_size: int
    result: str
    settlement_value: int | None

    def ticker_fields(self) -> tuple[int, ...]:
        """The fields the ``ticker`` channel carries; a change in any of them sends a message."""
        return (self.last_price, self.yes_bid, self.yes_ask, self.yes_bid_size,
                self.yes_ask_size, self.volume, self.open_interest)  # fmt: skip


@dataclass(frozen=True)
class Trade:
    """A public trade. ``seq`` orders all trades of the exchange (used by cursors)."""

    seq: int
    trade_id: str
    ticker: str
    ts_us: int
    count: int
    yes_price: int
    taker_outcome_side: Side
    taker_book_side: BookSide

    @property
    def no_price(self) -> int:
        """The NO side of the same trade."""
        return ONE_DOLLAR - self.yes_price


@dataclass(frozen=True)
class BookDelta:
    """A change of the resting size at one bid level (``delta`` signed, in count units)."""

    ticker: str
    side: Side
    price: int
    delta: int
    ts_us: int


class BookHistory:
    """Every change of one market's book: the level's new size after each change, columnar
    (arrays of machine integers: a firehose run records millions of changes).

    Changes of one step share its time and are in the order the WebSocket sends them, so the book
    in force at an instant is the replay of every change at or before it."""

    __slots__ = ("prices", "sides", "sizes", "times")

    def __init__(self) -> None:
        self.times = array("q")
        self.sides = array("b")  # 1 = YES bids, 0 = NO bids
        self.prices = array("q")
        self.sizes = array("q")

    def __len__(self) -> int:
        return len(self.times)

    def record(self, delta: BookDelta, new_size: int) -> None:
        """Remember that ``delta`` left its level at ``new_size`` (0: the level is gone)."""
        self.times.append(delta.ts_us)
        self.sides.append(1 if delta.side == "yes" else 0)
        self.prices.append(delta.price)
        self.sizes.append(new_size)

    def book_at(self, ts_us: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(YES bids, NO bids) in force at ``ts_us`` as ``(price, size)``, best (highest) first."""
        end = bisect.bisect_right(self.times, ts_us)
        books: tuple[dict[int, int], dict[int, int]] = ({}, {})
        for index in range(end):
            book = books[0] if self.sides[index] else books[1]
            if self.sizes[index]:
                book[self.prices[index]] = self.sizes[index]
            else:
                book.pop(self.prices[index], None)
        yes, no = books
        return sorted(yes.items(), reverse=True), sorted(no.items(), reverse=True)

    def rows(self) -> list[tuple[int, str, int, int]]:
        """Every change as ``(ts_us, side, price, new size)``, in order."""
        return [
            (t, "yes" if side else "no", price, size)
            for t, side, price, size in zip(
                self.times, self.sides, self.prices, self.sizes, strict=True
            )
        ]


LifecycleType = Literal["created", "activated", "determined", "settled"]


@dataclass(frozen=True)
class LifecycleEvent:
    """A ``market_lifecycle_v2`` event."""

    ticker: str
    event_type: LifecycleType
    ts_us: int


@dataclass
class StepEvents:
    """What one step published, in the order the WebSocket sends it."""

    step: int
    ts_us: int
    lifecycle: list[LifecycleEvent] = field(default_factory=list)
    book_deltas: list[BookDelta] = field(default_factory=list)
    trades: list[Trade] = field(default_factory=list)
    tickers: list[MarketState] = field(default_factory=list)
    ticker_markets: list[str] = field(default_factory=list)


@dataclass
class Market:
    """A binary market: its fixed terms, its lifecycle plan and its live book and state."""

    ticker: str
    event_ticker: str
    series_ticker: str
    title: str
    yes_sub_title: str
    no_sub_title: str
    floor_strike: int
    price_level_structure: str
    price_ranges: tuple[PriceRange, ...]
    levels: list[int]
    open_step: int
    close_step: int
    determine_step: int
    settle_step: int
    created_us: int
    open_us: int
    close_us: int
    determine_us: int
    settle_us: int
    fair_index: int
    open_interest: int = 0
    notional_traded: int = 0
    yes_book: dict[int, int] = field(default_factory=dict)
    no_book: dict[int, int] = field(default_factory=dict)
    states: list[MarketState] = field(default_factory=list)
    trades: list[Trade] = field(default_factory=list)
    recent_trades: deque[Trade] = field(default_factory=deque)
    recent_volume: int = 0
    book_history: BookHistory = field(default_factory=BookHistory)

    @property
    def state(self) -> MarketState:
        """The latest published state."""
        return self.states[-1]

    @property
    def status(self) -> MarketStatus:
        """The current lifecycle status."""
        return self.state.status

    def orderbook(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(yes bids, no bids) as ``(price, count)`` lists ascending by price."""
        return sorted(self.yes_book.items()), sorted(self.no_book.items())


@dataclass(frozen=True)
class MarketTruth:
    """Ground truth for one market: every state and trade the sim published, in order."""

    ticker: str
    event_ticker: str
    series_ticker: str
    states: tuple[MarketState, ...]
    trades: tuple[Trade, ...]
    book_changes: tuple[tuple[int, str, int, int], ...] = ()
    """Every change of the book: ``(ts_us, side, price, new size)`` (see :class:`BookHistory`)."""


class Exchange:
    """The simulated exchange. Construct it, then call :meth:`step` once per tick.

    Construction runs ``history_steps`` past steps, so settled markets, trades and candles
    exist before the first live step.
    """

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        start = config.start_time or datetime.now(UTC).replace(microsecond=0)
        self.origin_us = micros_from_datetime(start) // 1_000 * 1_000
        self.live_step_us = max(1, round(config.tick_interval * 1_000)) * 1_000
        self.history_step_us = config.history_step_seconds * 1_000_000
        self.series: dict[str, SeriesSpec] = {spec.ticker: spec for spec in SERIES}
        self.events: dict[str, Event] = {}
        self.markets: dict[str, Market] = {}
        self._unsettled: list[Market] = []
        self.trade_seq = 0
        self._event_numbers: dict[str, int] = {}
        # Tickers carry the run's start time, so two runs against one database never share a
        # ticker (a restarted demo's markets would otherwise mix into the old run's).
        self.run_code = run_code(self.origin_us)
        self.current_step = -config.history_steps - 1
        self.historical_cutoff_us = (
            self.time_of_step(-(config.history_steps // 2)) if config.history_steps else 0
        )
        for _ in range(config.history_steps):
            self.step()

    # -- time --------------------------------------------------------------------------------

    def time_of_step(self, step: int) -> int:
        """Sim time (µs) of a step: history steps are long, live steps are ``tick_interval``."""
        unit = self.live_step_us if step >= 0 else self.history_step_us
        return self.origin_us + step * unit

    @property
    def now_us(self) -> int:
        """Sim time of the last step taken."""
        return self.time_of_step(self.current_step)

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> StepEvents:
        """Advance one step: create, open, trade, close, determine and settle markets."""
        self.current_step += 1
        now = self.now_us
        events = StepEvents(step=self.current_step, ts_us=now)
        while len(self._unsettled) < self.config.markets:
            self._create_event(events)
        for market in self._unsettled:
            self._advance_market(market, events)
        self._unsettled = [m for m in self._unsettled if m.status is not MarketStatus.FINALIZED]
        return events

    def _create_event(self, events: StepEvents) -> None:
        rng = self._rng
        spec = self.series[rng.choice(list(self.series))]
        step = self.current_step
        open_step = step + rng.randint(1, 4)
        # lifetimes in steps: live markets live 30–120 ticks, past ones 15–60 (longer) steps
        shortest, longest = (15, 60) if step < 0 else (30, 120)
        if self.config.firehose:
            shortest, longest = (n * FIREHOSE_LIFETIME_FACTOR for n in (shortest, longest))
        close_step = open_step + rng.randint(shortest, longest)
        determine_step = close_step + rng.randint(1, 3)
        settle_step = determine_step + rng.randint(1, 3)
        close_us = self.time_of_step(close_step)
        number = self._event_numbers.get(spec.ticker, 0) + 1
        self._event_numbers[spec.ticker] = number
        day = datetime.fromtimestamp(close_us / 1e6, UTC)
        date_code = f"{day.year % 100:02d}{_MONTHS[day.month - 1]}{day.day:02d}"
        event = Event(
            event_ticker=f"{spec.ticker}-{date_code}{self.run_code}E{number}",
            series_ticker=spec.ticker,
            title=f"{spec.title} on {day:%b %d, %Y} (#{number})",
            sub_title=f"On {day:%b %d, %Y}",
            category=spec.category,
            strike_date_us=close_us,
        )
        self.events[event.event_ticker] = event
        ranges = PRICE_STRUCTURES[spec.price_level_structure]
        levels = price_levels(ranges)
        first_strike = spec.strike_base + spec.strike_step * rng.randint(0, 4)
        market_count = rng.randint(2, 4)
        for index in range(market_count):
            strike = first_strike + index * spec.strike_step
            ticker = f"{event.event_ticker}-T{strike}"
            market = Market(
                ticker=ticker,
                event_ticker=event.event_ticker,
                series_ticker=spec.ticker,
                title=f"{spec.title} above {strike}{spec.strike_unit}?",
                yes_sub_title=f"Above {strike}{spec.strike_unit}",
                no_sub_title=f"{strike}{spec.strike_unit} or below",
                floor_strike=strike,
                price_level_structure=spec.price_level_structure,
                price_ranges=ranges,
                levels=levels,
                open_step=open_step,
                close_step=close_step,
                determine_step=determine_step,
                settle_step=settle_step,
                created_us=self.time_of_step(step),
                open_us=self.time_of_step(open_step),
                close_us=close_us,
                determine_us=self.time_of_step(determine_step),
                settle_us=self.time_of_step(settle_step),
                # higher strikes are less likely: start the fair price lower for them
                fair_index=len(levels) * (70 - 15 * index + rng.randint(-10, 10)) // 100,
            )
            market.states.append(self._initial_state())
            self.markets[ticker] = market
            self._unsettled.append(market)
            event.market_tickers.append(ticker)
            events.lifecycle.append(LifecycleEvent(ticker, "created", self.now_us))

    def _initial_state(self) -> MarketState:
        return MarketState(
            ts_us=self.now_us, status=MarketStatus.INITIALIZED,
            yes_bid=0, yes_ask=ONE_DOLLAR, no_bid=0, no_ask=ONE_DOLLAR,
            yes_bid_size=0, yes_ask_size=0, last_price=0,
            previous_yes_bid=0, previous_yes_ask=0, previous_price=0,
            volume=0, volume_24h=0, open_interest=0, liquidity=0, dollar_volume=0,
            last_trade_size=0, result="", settlement_value=None,
        )  # fmt: skip

    def _advance_market(self, market: Market, events: StepEvents) -> None:
        step, now = self.current_step, self.now_us
        yes_before, no_before = dict(market.yes_book), dict(market.no_book)
        state = market.state
        status, result, settlement = state.status, state.result, state.settlement_value
        new_trades: list[Trade] = []
        if step == market.open_step:
            status = MarketStatus.ACTIVE
            self._reshape_book(market)
            events.lifecycle.append(LifecycleEvent(market.ticker, "activated", now))
        elif status is MarketStatus.ACTIVE and step < market.close_step:
            if self.config.firehose:
                new_trades = self._firehose_move(market)
            else:
                new_trades = self._trade(market, _TRADE_COUNTS)
                self._walk(market)
                self._reshape_book(market)
        elif step == market.close_step:
            status = MarketStatus.CLOSED
            market.yes_book.clear()  # resting orders are cancelled at close
            market.no_book.clear()
        elif step == market.determine_step:
            status = MarketStatus.DETERMINED
            yes_probability = market.levels[market.fair_index] / ONE_DOLLAR
            result = "yes" if self._rng.random() < yes_probability else "no"
            settlement = ONE_DOLLAR if result == "yes" else 0
            events.lifecycle.append(LifecycleEvent(market.ticker, "determined", now))
        elif step == market.settle_step:
            status = MarketStatus.FINALIZED
            events.lifecycle.append(LifecycleEvent(market.ticker, "settled", now))
        deltas = _book_diff(market.ticker, "yes", yes_before, market.yes_book, now)
        deltas += _book_diff(market.ticker, "no", no_before, market.no_book, now)
        for delta in deltas:
            book = market.yes_book if delta.side == "yes" else market.no_book
            market.book_history.record(delta, book.get(delta.price, 0))
        if step >= 0:  # nobody listens to the past: skip the deltas while generating history
            events.book_deltas += deltas
        events.trades.extend(new_trades)
        self._publish_state(market, status, result, settlement, new_trades, events)

    def _walk(self, market: Market) -> None:
        rng = self._rng
        scale = max(1, len(market.levels) // 100)
        move = round(rng.gauss(0.0, 1.2) * scale)
        margin = 3 * scale + BOOK_DEPTH
        market.fair_index = min(
            max(market.fair_index + move, margin), len(market.levels) - 1 - margin
        )

    def _reshape_book(self, market: Market) -> None:
        """Put the bids around the fair price, keep sizes of surviving levels, jiggle some."""
        rng = self._rng
        scale = max(1, len(market.levels) // 100)
        half_spread = rng.randint(1, 2) * scale
        best_bid = market.fair_index - half_spread
        best_ask = market.fair_index + half_spread
        # adjacent grid levels, so sub-penny markets show sub-penny prices in the book
        yes_prices = [market.levels[best_bid - i] for i in range(BOOK_DEPTH)]
        no_prices = [ONE_DOLLAR - market.levels[best_ask + i] for i in range(BOOK_DEPTH)]
        for book, prices in ((market.yes_book, yes_prices), (market.no_book, no_prices)):
            kept = {price: book[price] for price in prices if price in book}
            book.clear()
            for price in prices:
                size = kept.get(price)
                if size is None or rng.random() < 0.3:
                    size = rng.randint(1, 400) * COUNT_SCALE + rng.choice((0, 0, 0, 50, 25))
                book[price] = size

    def _firehose_move(self, market: Market) -> list[Trade]:
        """A cheap change that always shows on the ticker channel: seldom a trade or a price
        move, always a new size at the best bid of one side (usually the one book delta)."""
        rng = self._rng
        trades = self._trade(market, _FIREHOSE_TRADE_COUNTS)
        if rng.random() < FIREHOSE_PRICE_MOVE:
            self._walk(market)
            self._reshape_book(market)
        elif len(market.yes_book) < BOOK_DEPTH or len(market.no_book) < BOOK_DEPTH:
            self._reshape_book(market)  # a trade took a whole level: fill the book again
        yes_side = rng.random() < 0.5
        book = market.yes_book if yes_side else market.no_book
        shown = market.state.yes_bid_size if yes_side else market.state.yes_ask_size
        size = rng.randint(1, 400) * COUNT_SCALE
        book[max(book)] = size if size != shown else size + COUNT_SCALE
        if self.config.firehose_depth_changes:
            self._churn_depth(market, self.config.firehose_depth_changes)
        return trades

    def _churn_depth(self, market: Market, changes: int) -> None:
        """New sizes at ``changes`` distinct levels below the best bids (the top stays)."""
        rng = self._rng
        below_top = [
            (book, price)
            for book in (market.yes_book, market.no_book)
            for price in sorted(book)[:-1]
        ]
        for book, price in rng.sample(below_top, min(changes, len(below_top))):
            size = rng.randint(1, 400) * COUNT_SCALE
            book[price] = size if size != book[price] else size + COUNT_SCALE

    def _trade(self, market: Market, counts: tuple[int, ...]) -> list[Trade]:
        rng = self._rng
        trades: list[Trade] = []
        for _ in range(rng.choice(counts)):
            if not market.yes_book or not market.no_book:
                break
            outcome: Side = rng.choice(("yes", "no"))
            book_side: BookSide = rng.choice(("bid", "bid", "ask"))
            lifts_yes_ask = (outcome == "yes") == (book_side == "bid")
            # a taker buying YES (or selling NO) takes a NO bid, i.e. the YES ask
            book, price_key = (
                (market.no_book, max(market.no_book))
                if lifts_yes_ask
                else (market.yes_book, max(market.yes_book))
            )
            yes_price = ONE_DOLLAR - price_key if lifts_yes_ask else price_key
            count = min(book[price_key], rng.randint(1, 60) * COUNT_SCALE + rng.choice((0, 0, 50)))
            if count >= book[price_key]:
                del book[price_key]
            else:
                book[price_key] -= count
            self.trade_seq += 1
            trade = Trade(
                seq=self.trade_seq,
                trade_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                ticker=market.ticker,
                ts_us=self.now_us,
                count=count,
                yes_price=yes_price,
                taker_outcome_side=outcome,
                taker_book_side=book_side,
            )
            trades.append(trade)
            market.trades.append(trade)
            market.notional_traded += count * yes_price
            # new money opens positions more often than it closes them
            if rng.random() < 0.6:
                market.open_interest += count
            else:
                market.open_interest = max(0, market.open_interest - count)
            market.recent_trades.append(trade)
            market.recent_volume += count
        return trades

    def _publish_state(
        self,
        market: Market,
        status: MarketStatus,
        result: str,
        settlement: int | None,
        new_trades: list[Trade],
        events: StepEvents,
    ) -> None:
        now = self.now_us
        previous = market.state
        while market.recent_trades and market.recent_trades[0].ts_us <= now - DAY_US:
            market.recent_volume -= market.recent_trades.popleft().count
        yes_book, no_book = market.yes_book, market.no_book
        best_yes, best_no = max(yes_book, default=None), max(no_book, default=None)
        volume = previous.volume + sum(t.count for t in new_trades)
        last_trade = new_trades[-1] if new_trades else None
        yes_bid = 0 if best_yes is None else best_yes
        yes_ask = ONE_DOLLAR if best_no is None else ONE_DOLLAR - best_no
        first_quote = status is MarketStatus.ACTIVE and previous.status is MarketStatus.INITIALIZED
        # built with the old timestamp so that "nothing changed" is a plain equality test
        state = MarketState(
            ts_us=previous.ts_us,
            status=status,
            yes_bid=yes_bid,
            yes_ask=yes_ask,
            no_bid=ONE_DOLLAR - yes_ask,
            no_ask=ONE_DOLLAR - yes_bid,
            yes_bid_size=0 if best_yes is None else yes_book[best_yes],
            yes_ask_size=0 if best_no is None else no_book[best_no],
            last_price=last_trade.yes_price if last_trade else previous.last_price,
            # "previous" = the opening quote (Kalshi: 24 h ago; sim markets live far shorter)
            previous_yes_bid=yes_bid if first_quote else previous.previous_yes_bid,
            previous_yes_ask=yes_ask if first_quote else previous.previous_yes_ask,
            previous_price=previous.previous_price,
            volume=volume,
            volume_24h=market.recent_volume,
            open_interest=market.open_interest,
            liquidity=(
                sum(p * c for p, c in yes_book.items()) + sum(p * c for p, c in no_book.items())
            )
            // COUNT_SCALE,
            dollar_volume=market.notional_traded // (ONE_DOLLAR * COUNT_SCALE),
            last_trade_size=last_trade.count if last_trade else previous.last_trade_size,
            result=result,
            settlement_value=settlement,
        )
        if state == previous:
            return
        state = replace(state, ts_us=now)
        market.states.append(state)
        if state.ticker_fields() != previous.ticker_fields():
            events.tickers.append(state)
            events.ticker_markets.append(market.ticker)

    # -- queries -----------------------------------------------------------------------------

    def is_historical_market(self, market: Market) -> bool:
        """Settled before the historical cutoff: served only by ``/historical/markets``."""
        return (
            market.status is MarketStatus.FINALIZED and market.settle_us < self.historical_cutoff_us
        )

    def truth(self, books: bool = False) -> dict[str, MarketTruth]:
        """Every state and trade published so far, per market (a consistent copy); with
        ``books``, every change of every book too."""
        return {
            ticker: MarketTruth(
                ticker=ticker,
                event_ticker=market.event_ticker,
                series_ticker=market.series_ticker,
                states=tuple(market.states),
                trades=tuple(market.trades),
                book_changes=tuple(market.book_history.rows()) if books else (),
            )
            for ticker, market in self.markets.items()
        }


def run_code(origin_us: int) -> str:
    """``R`` and the run's start second in base 36 (``R`` + 6 characters until the year 2038)."""
    seconds, digits = max(origin_us // 1_000_000, 0), ""
    while True:
        seconds, digit = divmod(seconds, 36)
        digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"[digit] + digits
        if not seconds:
            return "R" + digits


def _book_diff(
    ticker: str, side: Side, before: dict[int, int], after: dict[int, int], ts_us: int
) -> list[BookDelta]:
    """The deltas from ``before`` to ``after`` (price → size), ascending by price."""
    if before == after:
        return []
    prices = sorted(before.keys() | after.keys())
    return [
        BookDelta(ticker, side, price, after.get(price, 0) - before.get(price, 0), ts_us)
        for price in prices
        if after.get(price, 0) != before.get(price, 0)
    ]
