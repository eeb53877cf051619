"""The backtest engine: replays market events through a strategy, fills its orders (at the touch
or through the book, resting limit orders by a queue model), nets YES against NO as Kalshi does,
charges the series' fees, settles or marks what is left, and measures the run
(docs/BACKTESTING.md).

Pure domain code: no I/O, no event loop, picklable inputs and outputs, so the service can run it in
a worker process. The same configuration over the same snapshots gives the same result, bit for bit.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from time import monotonic

from kfeed_server.backtest.books import (
    UNKNOWN_SIZE,
    BookState,
    Level,
    asks_to_take,
    top_of_book,
)
from kfeed_server.backtest.config import validate_config
from kfeed_server.backtest.fees import (
    COUNT_SCALE,
    DEFAULT_MARKET_FEES,
    PRICE_SCALE,
    FeeModel,
    MarketFees,
)
from kfeed_server.backtest.fingerprint import DataFingerprint, Fingerprinter
from kfeed_server.backtest.metrics import (
    brier_score,
    daily_returns,
    downsample,
    max_drawdown,
    round_trip_stats,
    sharpe_ratio,
    sortino_ratio,
)
from kfeed_server.backtest.orders import Cancel, Fill, Instruction, Order
from kfeed_server.backtest.params import Parameters
from kfeed_server.backtest.strategy import Strategy, StrategyRegistry, default_registry
from kfeed_server.records import (
    EquityPointRecord,
    ExecutionRecord,
    MarketRecord,
    MarketResult,
    MarketStatus,
    OrderAction,
    Side,
    SnapshotRecord,
    TradeRecord,
)
from kfeed_server.records.backtest import BacktestMetrics, EngineConfig, FeeRounding, FillModel

MarketEvent = SnapshotRecord | BookState | TradeRecord
"""What a run replays, in time order."""

DEFAULT_MAX_EQUITY_POINTS = 10_000
"""Equity points a result keeps at most (metrics always use the full-resolution curve)."""
DEFAULT_PROGRESS_EVERY = 8_192
"""Snapshots between progress reports (and cancellation checks, with the two below)."""

STOP_CHECK_EVERY = 64
"""Snapshots between looks at the clock: a slow strategy's stop request is also checked ..."""

STOP_CHECK_SECONDS = 0.1
"""... once this much wall time has passed since the last check, whichever comes first."""

_ONE_DAY = timedelta(days=1)
# Enum members as module constants: attribute access on an Enum class is slow in Python 3.11.
_YES, _NO = Side.YES, Side.NO
_BUY, _SELL, _SETTLE = OrderAction.BUY, OrderAction.SELL, OrderAction.SETTLE
_BEFORE_ALL = datetime.min.replace(tzinfo=UTC)
_AFTER_ALL = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a run has got; ``snapshots_total`` is 0 when the caller did not know it."""

    snapshots_processed: int
    snapshots_total: int
    fraction_done: float
    # Equity minus initial cash, positions marked at the bid.
    interim_pnl: int


@dataclass(frozen=True, slots=True)
class BacktestResult:
    """Everything a finished run produced. ``config`` is the validated configuration (defaults
    filled in), which is what provenance should store."""

    config: EngineConfig
    metrics: BacktestMetrics
    executions: list[ExecutionRecord]
    equity_curve: list[EquityPointRecord]
    fingerprint: DataFingerprint
    # Orders that could not fill at all: no price, no cash, a limit reached, unknown or settled.
    rejected_orders: int
    # Fills of resting orders (as a maker), and resting orders that expired unfilled.
    maker_fills: int = 0
    expired_orders: int = 0
    # The first and last event times replayed (settlements included); None when nothing was.
    replayed_from: datetime | None = None
    replayed_to: datetime | None = None


class BacktestCancelled(Exception):
    """``should_stop`` returned True; the run stopped after ``snapshots_processed`` snapshots."""

    def __init__(self, snapshots_processed: int) -> None:
        super().__init__(snapshots_processed)
        self.snapshots_processed = snapshots_processed

    def __str__(self) -> str:
        return f"backtest cancelled after {self.snapshots_processed} snapshots"


class StrategyError(Exception):
    """The strategy failed: it raised, or returned a malformed order (a bug in the strategy, not
    a market condition)."""


class _Position:
    """The open position in one market: YES or NO, never both (Kalshi nets them)."""

    __slots__ = ("cost", "count", "mark", "trip_pnl", "yes")

    def __init__(self, yes: bool) -> None:
        self.yes = yes
        self.count = 0  # 1/100 contract
        self.cost = 0  # cost basis of what is held: amounts paid plus buy fees
        self.mark = 0  # value at the latest bid, floor(count × bid / 100)
        self.trip_pnl = 0  # realised PnL of the round trip so far


class _Resting:
    """A resting limit order. It sits in the queue of bids of one book side (``queue_yes``) at
    ``queue_price``: a buy of YES at P in the YES bids at P, a sell of YES at P in the NO bids at
    1 − P (and likewise for NO). ``ahead`` is the size queued before it (None: not yet seen, the
    level was deeper than the data shows)."""

    __slots__ = (
        "ahead",
        "buying",
        "client_order_id",
        "expires",
        "last_size",
        "price",
        "queue_price",
        "queue_yes",
        "remaining",
        "traded",
        "yes",
    )

    def __init__(
        self,
        order: Order,
        remaining: int,
        ahead: int | None,
        expires: datetime | None,
    ) -> None:
        assert order.limit_price is not None
        self.yes = order.side is _YES
        self.buying = order.action is _BUY
        self.price = order.limit_price
        self.remaining = remaining
        self.client_order_id = order.client_order_id
        self.queue_yes = self.yes == self.buying
        self.queue_price = self.price if self.buying else PRICE_SCALE - self.price
        self.ahead = ahead
        self.last_size = ahead
        self.expires = expires
        self.traded = 0  # traded at the queue's price since the level was last seen


@dataclass(frozen=True, slots=True)
class RestingOrderView:
    """A resting order as ``PortfolioView.open_orders`` shows it."""

    ticker: str
    client_order_id: int
    side: Side
    action: OrderAction
    price: int
    remaining: int
    # Size queued before it (None until the level was seen).
    ahead: int | None


def _yes_payout(market: MarketRecord) -> int | None:
    """What one YES contract pays at settlement (1/10,000 USD), None when it did not settle."""
    if market.result is MarketResult.YES:
        return PRICE_SCALE
    if market.result is MarketResult.NO:
        return 0
    if market.result is MarketResult.SCALAR and market.settlement_value is not None:
        return market.settlement_value
    return None


def _before_settlement(market: MarketRecord) -> MarketRecord:
    """``market`` as a strategy may see it before it settles: no result, value or status."""
    return replace(
        market,
        status=MarketStatus.UNSPECIFIED,
        result=MarketResult.UNSPECIFIED,
        settlement_value=None,
        settlement_time=None,
    )


class _Run:
    """One run's state. It is also the ``MarketView`` and ``PortfolioView`` handed to the
    strategy (read-only by contract), so no view object is built per snapshot."""

    def __init__(
        self,
        config: EngineConfig,
        markets: Mapping[str, MarketRecord],
        fees: Mapping[str, MarketFees],
        strategy: Strategy,
    ) -> None:
        self.config = config
        self.time = _BEFORE_ALL
        self.cash = config.initial_cash
        self.initial_cash = config.initial_cash
        self.marked = 0  # sum of the open positions' marks
        self._markets = markets
        self._hidden = {t: _before_settlement(m) for t, m in markets.items()}
        self._latest: dict[str, SnapshotRecord] = {}
        self._books: dict[str, BookState] = {}
        self._positions: dict[str, _Position] = {}
        self._resting: dict[str, list[_Resting]] = {}
        self.resting_count = 0
        self._settled: set[str] = set()
        self._fees = fees
        self._fee_model = FeeModel(
            config.taker_fee_rate_ten_thousandths,
            config.maker_fee_rate_ten_thousandths,
            FeeRounding(config.fee_rounding),
        )
        self._depth = config.fill_model is FillModel.DEPTH
        self._latency = config.latency
        self.pending: list[tuple[datetime, int, Instruction]] = []
        self._pending_sequence = 0
        cls = type(strategy)
        self._on_fill = strategy.on_fill if cls.on_fill is not Strategy.on_fill else None
        self.on_book = strategy.on_book if cls.on_book is not Strategy.on_book else None
        self.on_trade = strategy.on_trade if cls.on_trade is not Strategy.on_trade else None
        self._fills: list[Fill] = []
        self._consumed: dict[tuple[str, bool, int], int] = {}
        self.executions: list[ExecutionRecord] = []
        self.fees_paid = 0
        self.trade_count = 0
        self.maker_fills = 0
        self.rejected_orders = 0
        self.expired_orders = 0
        self.trip_pnls: list[int] = []
        self.forecasts: list[tuple[str, float]] = []
        self.curve_times: list[datetime] = []
        self.curve_equity: list[int] = []
        self.day_closes: list[int] = []
        self.day_end: datetime | None = None  # the next UTC midnight once the first day started
        self.first_time: datetime | None = None
        self.last_time: datetime | None = None
        self._open_since: datetime | None = None
        self.exposed = timedelta(0)
        end = config.end_time
        due = []
        for ticker in config.tickers:
            market = markets.get(ticker)
            if market is None or market.settlement_time is None:
                continue
            payout = _yes_payout(market)
            if payout is not None and (end is None or market.settlement_time < end):
                due.append((market.settlement_time, ticker, payout))
        due.sort()
        self._due_settlements = due
        self._next_due = 0
        self.next_settlement = due[0][0] if due else _AFTER_ALL

    # --- MarketView / PortfolioView -------------------------------------------------------------

    def latest(self, ticker: str) -> SnapshotRecord | None:
        """See ``MarketView.latest``."""
        return self._latest.get(ticker)

    def book(self, ticker: str) -> BookState | None:
        """See ``MarketView.book``."""
        return self._books.get(ticker)

    def market(self, ticker: str) -> MarketRecord | None:
        """See ``MarketView.market``: the result only from its settlement time on."""
        market = self._markets.get(ticker)
        if market is None:
            return None
        settles = market.settlement_time
        if settles is not None and self.time >= settles:
            return market
        return self._hidden[ticker]

    @property
    def equity(self) -> int:
        """See ``PortfolioView.equity``."""
        return self.cash + self.marked

    def position(self, ticker: str, side: Side) -> int:
        """See ``PortfolioView.position``."""
        position = self._positions.get(ticker)
        if position is None or position.yes != (side is _YES):
            return 0
        return position.count

    def net_position(self, ticker: str) -> int:
        """See ``PortfolioView.net_position``."""
        position = self._positions.get(ticker)
        if position is None:
            return 0
        return position.count if position.yes else -position.count

    def open_orders(self, ticker: str) -> tuple[RestingOrderView, ...]:
        """See ``PortfolioView.open_orders``."""
        return tuple(
            RestingOrderView(
                ticker,
                r.client_order_id,
                _YES if r.yes else _NO,
                _BUY if r.buying else _SELL,
                r.price,
                r.remaining,
                r.ahead,
            )
            for r in self._resting.get(ticker, ())
        )

    # --- events ---------------------------------------------------------------------------------

    def begin_event(self, when: datetime) -> None:
        """Books the day closes that ``when`` passes and widens the replayed span."""
        if self.day_end is None:
            self.first_time = when
            midnight = when.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            self.day_end = midnight + _ONE_DAY
        while when >= self.day_end:
            self.day_closes.append(self.cash + self.marked)
            self.day_end += _ONE_DAY
        self.last_time = when

    def record_equity(self, when: datetime) -> None:
        """Equity after the events at ``when``: one curve point per distinct time."""
        equity = self.cash + self.marked
        if self.curve_times and self.curve_times[-1] == when:
            self.curve_equity[-1] = equity
        else:
            self.curve_times.append(when)
            self.curve_equity.append(equity)

    def settle_due(self, until: datetime) -> None:
        """Settles the markets whose settlement time is at or before ``until``."""
        due = self._due_settlements
        while self._next_due < len(due) and due[self._next_due][0] <= until:
            when, ticker, payout = due[self._next_due]
            self._next_due += 1
            self._settle(when, ticker, payout)
        self.next_settlement = due[self._next_due][0] if self._next_due < len(due) else _AFTER_ALL

    def _settle(self, when: datetime, ticker: str, yes_payout: int) -> None:
        self._settled.add(ticker)
        self._drop_resting(ticker, 0)
        position = self._positions.get(ticker)
        if position is None:
            return
        self.begin_event(when)
        payout = yes_payout if position.yes else PRICE_SCALE - yes_payout
        amount = position.count * payout // COUNT_SCALE
        self.cash += amount
        realized = amount - position.cost
        count = position.count
        position.trip_pnl += realized
        self._record(when, ticker, 0, position.yes, _SETTLE, count, payout, 0, 0, realized)
        self._close(ticker, position, when)
        self.record_equity(when)

    def _set_mark(self, ticker: str, position: _Position) -> None:
        snapshot = self._latest.get(ticker)
        bid = None if snapshot is None else snapshot.yes_bid if position.yes else snapshot.no_bid
        # No bid: nobody would buy the position, so it is worth nothing.
        mark = position.count * bid // COUNT_SCALE if bid is not None else 0
        self.marked += mark - position.mark
        position.mark = mark

    def market_event(self, ticker: str) -> None:
        """New market data for ``ticker``: displayed sizes are fresh again, resting orders see
        the new book."""
        if self._consumed:
            self._consumed.clear()
        if ticker in self._resting:
            self._update_resting(ticker)
            self._notify_fills()

    def add_book(self, book: BookState) -> None:
        """A new book for its market."""
        self._books[book.ticker] = book
        self.market_event(book.ticker)

    # --- instructions ---------------------------------------------------------------------------

    def submit(self, instructions: Sequence[Instruction]) -> None:
        """Takes a strategy's instructions: at once, or after the configured latency."""
        if self._latency:
            arrival = self.time + self._latency
            for instruction in instructions:
                self._pending_sequence += 1
                heapq.heappush(self.pending, (arrival, self._pending_sequence, instruction))
            return
        for instruction in instructions:
            self._instruct(instruction)
        self._notify_fills()

    def arrive(self, until: datetime, *, inclusive: bool) -> None:
        """Instructions whose arrival time is before ``until`` (or at it) reach the exchange."""
        pending = self.pending
        while pending and (pending[0][0] < until or (inclusive and pending[0][0] == until)):
            arrival, _, instruction = heapq.heappop(pending)
            decided = self.time
            self.time = arrival
            self._instruct(instruction)
            self.time = decided
        self._notify_fills()

    def _instruct(self, instruction: Instruction) -> None:
        if isinstance(instruction, Cancel):
            self._drop_resting(instruction.ticker, instruction.client_order_id)
        elif isinstance(instruction, Order):
            self._place(instruction)
        else:
            raise StrategyError(f"not an Order or a Cancel: {instruction!r}")

    def _drop_resting(self, ticker: str, client_order_id: int) -> None:
        orders = self._resting.get(ticker)
        if not orders:
            return
        kept = [r for r in orders if client_order_id and r.client_order_id != client_order_id]
        self.resting_count -= len(orders) - len(kept)
        if kept:
            self._resting[ticker] = kept
        else:
            del self._resting[ticker]

    def _place(self, order: Order) -> None:
        side, action, count = order.side, order.action, order.count
        if side not in (_YES, _NO) or action not in (_BUY, _SELL):
            raise StrategyError(f"order must be YES/NO and BUY/SELL: {order!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            raise StrategyError(f"order count must be a positive int (1/100 contract): {order!r}")
        limit = order.limit_price
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit < PRICE_SCALE
        ):
            raise StrategyError(f"limit_price must be an int in 1..9999: {order!r}")
        if order.expire_after is not None and order.expire_after <= timedelta(0):
            raise StrategyError(f"expire_after must be positive: {order!r}")
        if order.probability is not None:
            if not 0.0 <= order.probability <= 1.0:
                raise StrategyError(f"order probability must be in [0, 1]: {order!r}")
            self.forecasts.append((order.ticker, order.probability))
        ticker = order.ticker
        snapshot = self._latest.get(ticker)
        if snapshot is None or ticker in self._settled:
            self.rejected_orders += 1
            return
        filled = self._take(order, snapshot)
        remaining = count - filled
        if limit is None or remaining <= 0:
            if filled == 0:
                self.rejected_orders += 1
            return
        if action is _SELL and self.position(ticker, side) <= 0:
            if filled == 0:
                self.rejected_orders += 1
            return
        expires = None if order.expire_after is None else self.time + order.expire_after
        resting = _Resting(order, remaining, None, expires)
        size = self._queue_size(ticker, resting.queue_yes, resting.queue_price)
        resting.ahead = resting.last_size = size
        self._resting.setdefault(ticker, []).append(resting)
        self.resting_count += 1

    # --- taking liquidity -----------------------------------------------------------------------

    def _levels(self, snapshot: SnapshotRecord, yes: bool, buying: bool) -> list[Level]:
        """What an order of this side and action can take, best price first."""
        ticker = snapshot.ticker
        if self._depth:
            book = self._books.get(ticker) or top_of_book(snapshot)
            return asks_to_take(book, yes) if buying else list(book.bids(yes))
        if buying:
            price = snapshot.yes_ask if yes else snapshot.no_ask
            size = snapshot.yes_ask_size if yes else snapshot.yes_bid_size
        else:
            price = snapshot.yes_bid if yes else snapshot.no_bid
            size = snapshot.yes_bid_size if yes else snapshot.yes_ask_size
        if price is None:
            return []
        capped = self.config.cap_by_displayed_size and size is not None
        return [(price, size if capped and size is not None else UNKNOWN_SIZE)]

    def _take(self, order: Order, snapshot: SnapshotRecord) -> int:
        """Fills what ``order`` can take now (as a taker); returns the count filled."""
        ticker = order.ticker
        yes = order.side is _YES
        buying = order.action is _BUY
        limit = order.limit_price
        position = self._positions.get(ticker)
        held_same = position.count if position is not None and position.yes == yes else 0
        held_other = position.count if position is not None and position.yes != yes else 0
        want = order.count
        if not buying:
            want = min(want, held_same)
        elif self.config.max_position:
            want = min(want, held_other + self.config.max_position - held_same)
        if want <= 0:
            return 0
        # The book side an order takes from: a buy of YES takes the NO bids, and so on.
        taken_side_yes = yes != buying
        takes: list[tuple[int, int, int]] = []  # (price, count, level price on its book side)
        left = want
        for price, size in self._levels(snapshot, yes, buying):
            if limit is not None and (price > limit if buying else price < limit):
                break
            level_price = PRICE_SCALE - price if buying else price
            key = (ticker, taken_side_yes, level_price)
            available = size - self._consumed.get(key, 0)
            if available <= 0:
                continue
            count = min(left, available)
            takes.append((price, count, level_price))
            left -= count
            if not left:
                break
        if not takes:
            return 0
        slippage = self.config.slippage
        terms = self._fees.get(ticker, DEFAULT_MARKET_FEES)
        if buying:
            takes = self._affordable(takes, terms, held_other)
            if not takes:
                return 0
        count = sum(c for _, c, _ in takes)
        gross_numerator = 0
        fee_numerator = 0
        for price, c, _ in takes:
            paid = min(price + slippage, PRICE_SCALE) if buying else max(price - slippage, 0)
            gross_numerator += c * paid
            fee_numerator += c * price * (PRICE_SCALE - price)
        fee = self._fee_model.fee_of(terms, fee_numerator, count, maker=False)
        if buying:
            gross = -(-gross_numerator // COUNT_SCALE)
        else:
            gross = gross_numerator // COUNT_SCALE
            if self.cash + gross - fee < 0:
                # The fee exceeds cash plus proceeds (a tiny sale under cent rounding).
                return 0
        for _, c, level_price in takes:
            key = (ticker, taken_side_yes, level_price)
            self._consumed[key] = self._consumed.get(key, 0) + c
        average = -(-gross_numerator // count) if buying else gross_numerator // count
        self._fill(
            ticker,
            yes,
            buying,
            count,
            gross,
            fee,
            average,
            snapshot.snapshot_id,
            maker=False,
            client_order_id=order.client_order_id,
        )
        return count

    def _cash_needed(
        self,
        takes: Sequence[tuple[int, int, int]],
        terms: MarketFees,
        held_other: int,
        maker: bool,
    ) -> int:
        """Cash a buy of ``takes`` costs, less what closing the other side pays back. Slippage
        is a taker's cost: a maker pays its own price."""
        slippage = 0 if maker else self.config.slippage
        count = sum(c for _, c, _ in takes)
        gross = -(-sum(c * min(p + slippage, PRICE_SCALE) for p, c, _ in takes) // COUNT_SCALE)
        fee = self._fee_model.fee_of(
            terms, sum(c * p * (PRICE_SCALE - p) for p, c, _ in takes), count, maker=maker
        )
        # Each YES + NO pair closed pays $1 back.
        return gross + fee - min(count, held_other) * PRICE_SCALE // COUNT_SCALE

    def _affordable(
        self,
        takes: list[tuple[int, int, int]],
        terms: MarketFees,
        held_other: int,
        *,
        maker: bool = False,
    ) -> list[tuple[int, int, int]]:
        """The largest prefix of ``takes`` (by count) whose cash fits: cost grows with the
        count once nothing is left to close, so a binary search finds it."""
        if self._cash_needed(takes, terms, held_other, maker) <= self.cash:
            return takes

        def prefix(n: int) -> list[tuple[int, int, int]]:
            out = []
            for price, c, level in takes:
                if n <= 0:
                    break
                out.append((price, min(c, n), level))
                n -= c
            return out

        low, high = 0, sum(c for _, c, _ in takes)  # prefix(low) fits, prefix(high) does not
        while high - low > 1:
            middle = (low + high) // 2
            if self._cash_needed(prefix(middle), terms, held_other, maker) <= self.cash:
                low = middle
            else:
                high = middle
        return prefix(low)

    # --- positions ------------------------------------------------------------------------------

    def _fill(
        self,
        ticker: str,
        yes: bool,
        buying: bool,
        count: int,
        gross: int,
        fee: int,
        price: int,
        snapshot_id: int,
        *,
        maker: bool,
        client_order_id: int,
    ) -> None:
        """Books a fill of ``count`` at ``gross`` (amount paid or received) plus ``fee``,
        netting YES against NO: buying one side first closes the other side held."""
        positions = self._positions
        position = positions.get(ticker)
        now = self.time
        realized = 0
        if buying:
            if position is not None and position.yes != yes:
                closing = min(count, position.count)
                gross_close = gross * closing // count
                fee_close = fee * closing // count
                # The closed pairs pay $1 each.
                redeemed = closing * PRICE_SCALE // COUNT_SCALE
                released = position.cost * closing // position.count
                realized = redeemed - gross_close - fee_close - released
                self.cash += redeemed - gross_close - fee_close
                position.cost -= released
                position.count -= closing
                position.trip_pnl += realized
                self._set_mark(ticker, position)
                if position.count == 0:
                    self._close(ticker, position, now)
                    position = None
                opening = count - closing
                gross_open, fee_open = gross - gross_close, fee - fee_close
            else:
                opening, gross_open, fee_open = count, gross, fee
            if opening:
                if position is None:
                    position = positions[ticker] = _Position(yes)
                    self._opened(now)
                self.cash -= gross_open + fee_open
                position.count += opening
                position.cost += gross_open + fee_open
                self._set_mark(ticker, position)
        else:
            # Callers cap sells to the side held.
            assert position is not None
            assert position.yes == yes
            net = gross - fee
            released = position.cost * count // position.count
            realized = net - released
            self.cash += net
            position.cost -= released
            position.count -= count
            position.trip_pnl += realized
            self._set_mark(ticker, position)
            if position.count == 0:
                self._close(ticker, position, now)
        self.fees_paid += fee
        self.trade_count += 1
        if maker:
            self.maker_fills += 1
        after = self.net_position(ticker)
        action = _BUY if buying else _SELL
        self._record(now, ticker, snapshot_id, yes, action, count, price, fee, after, realized)
        if self._on_fill is not None:
            self._fills.append(
                Fill(
                    ticker,
                    now,
                    _YES if yes else _NO,
                    action,
                    count,
                    price,
                    fee,
                    maker,
                    client_order_id,
                    after,
                )
            )

    def _notify_fills(self) -> None:
        """Tells the strategy its fills (its answers are instructions like any other)."""
        on_fill = self._on_fill
        while self._fills and on_fill is not None:
            fills, self._fills = self._fills, []
            for fill in fills:
                answer = on_fill(fill, self, self)
                if answer:
                    self.submit(answer)

    def _record(
        self,
        when: datetime,
        ticker: str,
        snapshot_id: int,
        yes: bool,
        action: OrderAction,
        count: int,
        price: int,
        fee: int,
        position_after: int,
        realized: int,
    ) -> None:
        self.executions.append(
            ExecutionRecord(
                len(self.executions) + 1,
                ticker,
                when,
                snapshot_id,
                _YES if yes else _NO,
                action,
                count,
                price,
                fee,
                self.cash,
                position_after,
                realized,
            )
        )

    def _opened(self, when: datetime) -> None:
        if self._open_since is None:
            self._open_since = when

    def _close(self, ticker: str, position: _Position, when: datetime) -> None:
        """Ends a round trip (its PnL is ``position.trip_pnl``)."""
        self.trip_pnls.append(position.trip_pnl)
        self.marked -= position.mark
        del self._positions[ticker]
        if not self._positions and self._open_since is not None:
            self.exposed += when - self._open_since
            self._open_since = None

    # --- resting orders -------------------------------------------------------------------------

    def _queue_size(self, ticker: str, queue_yes: bool, price: int) -> int | None:
        """The size bid at ``price`` on one side now; None when the data does not show it (a
        level below the top when only the top of book is known)."""
        book = self._books.get(ticker)
        if book is not None:
            return book.size_at(queue_yes, price)
        snapshot = self._latest[ticker]
        top = snapshot.yes_bid if queue_yes else snapshot.no_bid
        if top is None or top < price:
            return 0  # a better price than anyone bids: nobody is ahead
        if top > price:
            return None
        size = snapshot.yes_bid_size if queue_yes else snapshot.yes_ask_size
        return size

    def _crossed(self, ticker: str, resting: _Resting) -> bool:
        """Whether the other side now bids at or above the complement of the order's queue price:
        a counterparty rests at the order's price or better, so the order has been filled."""
        book = self._books.get(ticker)
        if book is not None:
            other = book.bids(not resting.queue_yes)
            best = other[0][0] if other else None
        else:
            snapshot = self._latest[ticker]
            best = snapshot.no_bid if resting.queue_yes else snapshot.yes_bid
        return best is not None and best >= PRICE_SCALE - resting.queue_price

    def _update_resting(self, ticker: str) -> None:
        """Expiry, price-through fills and queue progress of the market's resting orders."""
        now = self.time
        share = self.config.queue_cancel_share_ten_thousandths
        for resting in list(self._resting.get(ticker, ())):
            if resting.expires is not None and resting.expires <= now:
                self.expired_orders += 1
                self._remove(ticker, resting)
                continue
            if self._crossed(ticker, resting):
                self._maker_fill(ticker, resting, resting.remaining)
                continue
            size = self._queue_size(ticker, resting.queue_yes, resting.queue_price)
            if size is None:
                continue
            if resting.ahead is None:
                resting.ahead = size  # the level came into view: all of it is ahead
            elif resting.last_size is not None:
                cancelled = max(0, resting.last_size - size - resting.traded)
                resting.ahead = max(0, resting.ahead - cancelled * share // PRICE_SCALE)
            resting.ahead = min(resting.ahead, size)
            resting.last_size = size
            resting.traded = 0

    def add_trade(self, trade: TradeRecord) -> None:
        """A public trade: it consumes the queue at its price on the side it hit."""
        ticker = trade.ticker
        if ticker not in self._resting:
            return
        # A taker buying YES sells into the NO bids (at the NO price), and vice versa.
        hit_yes = trade.taker_side is _NO
        traded_at = trade.yes_price if hit_yes else trade.no_price
        for resting in list(self._resting.get(ticker, ())):
            if resting.queue_yes != hit_yes:
                continue
            if traded_at < resting.queue_price:
                # It traded through the order's price: the order's level was used up first.
                self._maker_fill(ticker, resting, resting.remaining)
            elif traded_at == resting.queue_price:
                resting.traded += trade.count
                if resting.ahead is None:
                    continue  # the queue is unknown: only a trade through the price fills it
                used = min(resting.ahead, trade.count)
                resting.ahead -= used
                if trade.count > used:
                    self._maker_fill(ticker, resting, min(resting.remaining, trade.count - used))
        self._notify_fills()

    def _maker_fill(self, ticker: str, resting: _Resting, count: int) -> None:
        """Fills up to ``count`` of a resting order at its price, as a maker. An order that
        cannot fill (no cash for a buy, nothing left to sell) is removed."""
        position = self._positions.get(ticker)
        price = resting.price
        terms = self._fees.get(ticker, DEFAULT_MARKET_FEES)
        same = position is not None and position.yes == resting.yes
        held = position.count if position is not None else 0
        if resting.buying:
            fitting = self._affordable([(price, count, 0)], terms, 0 if same else held, maker=True)
            count = sum(c for _, c, _ in fitting)
        else:
            count = min(count, held if same else 0)
        fee = self._fee_model.fee(terms, count, price, maker=True) if count > 0 else 0
        gross = -(-count * price // COUNT_SCALE) if resting.buying else count * price // COUNT_SCALE
        if count <= 0 or (not resting.buying and self.cash + gross - fee < 0):
            self._remove(ticker, resting)
            return
        self._fill(
            ticker,
            resting.yes,
            resting.buying,
            count,
            gross,
            fee,
            price,
            self._latest[ticker].snapshot_id,
            maker=True,
            client_order_id=resting.client_order_id,
        )
        resting.remaining -= count
        if resting.remaining <= 0:
            self._remove(ticker, resting)

    def _remove(self, ticker: str, resting: _Resting) -> None:
        orders = self._resting.get(ticker)
        if orders is None or resting not in orders:
            return
        orders.remove(resting)
        self.resting_count -= 1
        if not orders:
            del self._resting[ticker]

    # --- the replay -----------------------------------------------------------------------------

    def replay(
        self,
        events: Iterable[MarketEvent],
        on_snapshot: Callable[[SnapshotRecord, _Run, _Run], Sequence[Instruction]],
        fingerprinter: Fingerprinter,
        hash_snapshots: bool,
        total: int,
        progress: Callable[[Progress], None] | None,
        should_stop: Callable[[], bool] | None,
        progress_every: int,
    ) -> int:
        """The hot loop; returns the number of snapshots replayed. Per snapshot it only touches
        what changed, through local names. Books and trades are always fingerprinted here;
        snapshots only with ``hash_snapshots`` (else the caller hashed them)."""
        start = self.config.start_time or _BEFORE_ALL
        end = self.config.end_time or _AFTER_ALL
        # An open window (the service bounds the rows it reads anyway) skips two datetime
        # comparisons per snapshot.
        windowed = self.config.start_time is not None or self.config.end_time is not None
        tickers = frozenset(self.config.tickers)
        latest = self._latest
        hashing = hash_snapshots
        add_row = fingerprinter.add
        curve_times = self.curve_times
        curve_equity = self.curve_equity
        consumed = self._consumed
        pending = self.pending
        last_time: datetime | None = None
        next_day = _BEFORE_ALL  # forces begin_event on the first snapshot
        processed = 0
        next_report = progress_every
        # One comparison per snapshot, as before: the clock is read every STOP_CHECK_EVERY.
        next_check = min(STOP_CHECK_EVERY, next_report)
        last_check = monotonic()
        positions_get = self._positions.get
        snapshot_type = SnapshotRecord
        for snapshot in events:
            if snapshot.__class__ is not snapshot_type:
                self._other_event(snapshot, tickers, start, end, fingerprinter)
                # A settlement it brought due may have added a curve point: one point per time.
                last_time = curve_times[-1] if curve_times else None
                continue
            now = snapshot.exchange_time
            ticker = snapshot.ticker
            if ticker not in tickers or (windowed and (now < start or now >= end)):
                continue
            if now >= self.next_settlement:
                self.settle_due(now)
                last_time = curve_times[-1] if curve_times else None
            if pending and pending[0][0] < now:
                self.arrive(now, inclusive=False)
            if now >= next_day:
                self.begin_event(now)
                assert self.day_end is not None
                next_day = self.day_end
            if hashing:
                add_row(snapshot)
            latest[ticker] = snapshot
            self.time = now
            if consumed:
                consumed.clear()
            if self.resting_count:
                self.market_event(ticker)
            position = positions_get(ticker)
            if position is not None:
                # Inlined _set_mark: this runs for nearly every snapshot while positions are open.
                bid = snapshot.yes_bid if position.yes else snapshot.no_bid
                mark = position.count * bid // COUNT_SCALE if bid is not None else 0
                self.marked += mark - position.mark
                position.mark = mark
            orders = on_snapshot(snapshot, self, self)
            if orders:
                self.submit(orders)
            if pending and pending[0][0] <= now:
                self.arrive(now, inclusive=True)
            equity = self.cash + self.marked
            if now != last_time:
                curve_times.append(now)
                curve_equity.append(equity)
                last_time = now
            else:
                curve_equity[-1] = equity
            processed += 1
            if processed >= next_check:
                if processed >= next_report:
                    next_report += progress_every
                    self.report(processed, total, progress, should_stop)
                    last_check = monotonic()
                elif should_stop is not None and monotonic() - last_check >= STOP_CHECK_SECONDS:
                    last_check = monotonic()
                    if should_stop():
                        raise BacktestCancelled(processed)
                next_check = min(processed + STOP_CHECK_EVERY, next_report)
        if self.first_time is not None:
            self.last_time = max(self.last_time or self.first_time, self.time)
        return processed

    def _other_event(
        self,
        event: MarketEvent,
        tickers: frozenset[str],
        start: datetime,
        end: datetime,
        fingerprinter: Fingerprinter,
    ) -> None:
        """A book or a trade: fingerprinted, then given to the resting orders and the strategy."""
        if isinstance(event, BookState):
            now = event.exchange_time
        elif isinstance(event, TradeRecord):
            now = event.create_time
        else:
            raise TypeError(f"not a market event: {type(event).__name__}")
        if event.ticker not in tickers or now < start or now >= end:
            return
        if now >= self.next_settlement:
            self.settle_due(now)
        if self.pending and self.pending[0][0] < now:
            self.arrive(now, inclusive=False)
        fingerprinter.add_event(event)
        self.time = max(self.time, now)
        if isinstance(event, BookState):
            self.add_book(event)
            if self.on_book is not None:
                answer = self.on_book(event, self, self)
                if answer:
                    self.submit(answer)
        else:
            self.add_trade(event)
            if self.on_trade is not None:
                answer = self.on_trade(event, self, self)
                if answer:
                    self.submit(answer)

    def report(
        self,
        processed: int,
        total: int,
        progress: Callable[[Progress], None] | None,
        should_stop: Callable[[], bool] | None,
        finished: bool = False,
    ) -> None:
        """Calls ``progress``, then raises BacktestCancelled when ``should_stop`` says so."""
        if progress is not None:
            fraction = 1.0 if finished else min(processed / total, 1.0) if total > 0 else 0.0
            progress(
                Progress(processed, total, fraction, self.cash + self.marked - self.initial_cash)
            )
        if should_stop is not None and should_stop():
            raise BacktestCancelled(processed)

    def finish(self) -> None:
        """Lets arrived instructions act, settles what settles inside the window, then marks the
        rest at the bid (MARK). Orders still resting or travelling at the end are dropped."""
        end = self.config.end_time
        if self.pending:
            self.arrive(end or _AFTER_ALL, inclusive=False)
        self.settle_due(_AFTER_ALL)
        if self.first_time is None:
            return
        assert self.last_time is not None
        mark_time = end or self.last_time
        for ticker in sorted(self._positions):
            position = self._positions[ticker]
            snapshot = self._latest[ticker]
            bid = snapshot.yes_bid if position.yes else snapshot.no_bid
            self._record(
                mark_time,
                ticker,
                snapshot.snapshot_id,
                position.yes,
                OrderAction.MARK,
                position.count,
                bid or 0,
                0,
                self.net_position(ticker),
                position.mark - position.cost,
            )
        if self._open_since is not None:
            self.exposed += self.last_time - self._open_since
        self.day_closes.append(self.cash + self.marked)


# Exceptions a run lets through as they are: cancellation, its own errors, and a limit
# (``BaseException`` subclasses such as KeyboardInterrupt are never caught).
_PASSED_THROUGH: tuple[type[Exception], ...] = (BacktestCancelled, StrategyError, TimeoutError)


def run_backtest(
    config: EngineConfig,
    markets: Mapping[str, MarketRecord],
    snapshots: Iterable[MarketEvent],
    *,
    fees: Mapping[str, MarketFees] | None = None,
    total: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    registry: StrategyRegistry = default_registry,
    max_equity_points: int = DEFAULT_MAX_EQUITY_POINTS,
    progress_every: int = DEFAULT_PROGRESS_EVERY,
    fingerprinter: Fingerprinter | None = None,
) -> BacktestResult:
    """Runs one backtest.

    ``snapshots`` are market events in time order: snapshots in (exchange_time, snapshot_id)
    order, optionally interleaved with books (``BookState``, for the DEPTH model, the queue model
    and ``on_book``) and public trades (``TradeRecord``, for the queue model and ``on_trade``).
    Events outside the window or of other tickers are skipped (and not fingerprinted).
    ``markets`` gives each ticker's result and settlement time; ``fees`` each ticker's fee terms
    (series fee type and multiplier; absent: quadratic × 1). ``total`` (the expected snapshot
    count) only scales ``fraction_done``. ``progress`` and ``should_stop`` are called every
    ``progress_every`` snapshots; ``should_stop`` also every ``STOP_CHECK_EVERY`` snapshots once
    ``STOP_CHECK_SECONDS`` of wall time have passed since the last check, so a cancel lands
    promptly however slow the strategy; BacktestCancelled is raised then. Raises ConfigError for
    a bad configuration and StrategyError for a malformed order.

    By default the engine fingerprints the events it replays. A caller that already hashes the
    snapshot rows as it produces them (the service's worker hashes the Arrow batches it receives)
    passes its ``fingerprinter`` instead; the run then checks that it replayed exactly as
    many snapshots as were fingerprinted (ValueError otherwise), so provenance cannot drift from
    what ran. The fingerprint also covers each market's result, settlement time and value and its
    fee terms, so a rerun after a market settles gives a different fingerprint.
    """
    config = validate_config(config, registry)
    if max_equity_points < 2 or progress_every < 1:
        raise ValueError("max_equity_points must be >= 2 and progress_every >= 1")
    fees = fees or {}
    strategy_class = registry.get(config.strategy)
    caller_hashes = fingerprinter is not None
    fingerprinter = fingerprinter or Fingerprinter()
    total_hint = total or 0
    run: _Run | None = None
    try:
        strategy = strategy_class(Parameters(config.parameters))
        run = _Run(config, markets, fees, strategy)
        run.report(0, total_hint, None, should_stop)
        strategy.on_start(run, run)
        processed = run.replay(
            snapshots,
            strategy.on_snapshot,
            fingerprinter,
            not caller_hashes,
            total_hint,
            progress,
            should_stop,
            progress_every,
        )
        strategy.on_end(run, run)
    except _PASSED_THROUGH:
        raise
    except Exception as error:
        # A strategy's own failure: its message, and where it happened, but never its
        # exception object (a user class may not unpickle in the server process).
        when = "" if run is None or run.time == _BEFORE_ALL else f" at {run.time.isoformat()}"
        raise StrategyError(
            f"strategy {config.strategy!r} raised {type(error).__name__}: {error}{when}"
        ) from None
    assert run is not None
    run.finish()
    run.report(processed, processed, progress, None, finished=True)
    fingerprinter.add_terms(config.tickers, markets, fees, config.fee_schedule_version)
    data_fingerprint = fingerprinter.result()
    if data_fingerprint.row_count != processed:
        raise ValueError(
            f"{data_fingerprint.row_count} rows were fingerprinted but {processed} replayed: "
            "the rows given must all lie in the window and belong to the tickers"
        )
    return BacktestResult(
        config=config,
        metrics=_metrics(run, markets),
        executions=run.executions,
        equity_curve=[
            EquityPointRecord(when, equity)
            for when, equity in zip(
                *downsample(run.curve_times, run.curve_equity, max_equity_points), strict=True
            )
        ],
        fingerprint=data_fingerprint,
        rejected_orders=run.rejected_orders,
        maker_fills=run.maker_fills,
        expired_orders=run.expired_orders,
        replayed_from=run.first_time,
        replayed_to=run.last_time,
    )


def _metrics(run: _Run, markets: Mapping[str, MarketRecord]) -> BacktestMetrics:
    final_equity = run.cash + run.marked
    total_pnl = final_equity - run.initial_cash
    returns = daily_returns(run.initial_cash, run.day_closes)
    if run.curve_times:
        # Drawdowns are measured from the initial cash too.
        drawdown = max_drawdown(
            [run.curve_times[0], *run.curve_times], [run.initial_cash, *run.curve_equity]
        )
    else:
        drawdown = max_drawdown([], [])
    win_rate, profit_factor, expectancy = round_trip_stats(run.trip_pnls)
    span = (
        run.last_time - run.first_time
        if run.first_time is not None and run.last_time is not None
        else timedelta(0)
    )
    exposure = run.exposed / span if span > timedelta(0) else 0.0
    outcomes = {MarketResult.YES: 1, MarketResult.NO: 0}
    graded = []
    for ticker, probability in run.forecasts:
        market = markets.get(ticker)
        if market is not None and market.result in outcomes:
            graded.append((probability, outcomes[market.result]))
    return BacktestMetrics(
        total_pnl=total_pnl,
        total_return=total_pnl / run.initial_cash,
        sharpe_ratio=sharpe_ratio(returns),
        sortino_ratio=sortino_ratio(returns),
        max_drawdown=drawdown.depth,
        max_drawdown_fraction=drawdown.fraction,
        max_drawdown_duration=drawdown.duration,
        win_rate=win_rate,
        profit_factor=profit_factor,
        expectancy=expectancy,
        trade_count=run.trade_count,
        fees_paid=run.fees_paid,
        exposure=exposure,
        brier_score=brier_score(graded),
    )
