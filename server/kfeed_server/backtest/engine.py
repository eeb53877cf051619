"""The backtest engine: replays snapshots through a strategy, fills at the touch, charges Kalshi's
taker fee, settles or marks what is left, and measures the run (docs/BACKTESTING.md).

Pure domain code: no I/O, no event loop, picklable inputs and outputs, so the service can run it in
a worker process. The same configuration over the same snapshots gives the same result, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from kfeed_server.backtest.config import EngineConfig, validate_config
from kfeed_server.backtest.fees import COUNT_SCALE, PRICE_SCALE, FeeRounding
from kfeed_server.backtest.fingerprint import DataFingerprint, Fingerprinter
from kfeed_server.backtest.metrics import (
    BacktestMetrics,
    brier_score,
    daily_returns,
    downsample,
    max_drawdown,
    round_trip_stats,
    sharpe_ratio,
    sortino_ratio,
)
from kfeed_server.backtest.params import Parameters
from kfeed_server.backtest.strategy import Order, StrategyRegistry, default_registry
from kfeed_server.records import (
    EquityPointRecord,
    ExecutionRecord,
    MarketRecord,
    MarketResult,
    OrderAction,
    Side,
    SnapshotRecord,
)

DEFAULT_MAX_EQUITY_POINTS = 10_000
"""Equity points a result keeps at most (metrics always use the full-resolution curve)."""
DEFAULT_PROGRESS_EVERY = 8_192
"""Snapshots between progress reports and cancellation checks."""

_ONE_DAY = timedelta(days=1)
# Enum members as module constants: attribute access on an Enum class is slow in Python 3.11.
_YES, _NO = Side.YES, Side.NO
_BUY, _SELL = OrderAction.BUY, OrderAction.SELL
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


class BacktestCancelled(Exception):
    """``should_stop`` returned True; the run stopped after ``snapshots_processed`` snapshots."""

    def __init__(self, snapshots_processed: int) -> None:
        super().__init__(snapshots_processed)
        self.snapshots_processed = snapshots_processed

    def __str__(self) -> str:
        return f"backtest cancelled after {self.snapshots_processed} snapshots"


class StrategyError(Exception):
    """The strategy returned a malformed order (a bug in the strategy, not a market condition)."""


class _Holding:
    """An open position in one market and side."""

    __slots__ = ("cost", "count", "mark", "trip_pnl")

    def __init__(self) -> None:
        self.count = 0  # 1/100 contract
        self.cost = 0  # cost basis of what is held: amounts paid plus buy fees
        self.mark = 0  # value at the latest bid, floor(count × bid / 100)
        self.trip_pnl = 0  # realised PnL of the round trip so far


def _yes_payout(market: MarketRecord) -> int | None:
    """What one YES contract pays at settlement (1/10,000 USD), None when it did not settle."""
    if market.result is MarketResult.YES:
        return PRICE_SCALE
    if market.result is MarketResult.NO:
        return 0
    if market.result is MarketResult.SCALAR and market.settlement_value is not None:
        return market.settlement_value
    return None


class _Run:
    """One run's state. It is also the ``MarketView`` and ``PortfolioView`` handed to the
    strategy (read-only by contract), so no view object is built per snapshot."""

    def __init__(self, config: EngineConfig, markets: Mapping[str, MarketRecord]) -> None:
        self.config = config
        self.time = _BEFORE_ALL
        self.cash = config.initial_cash
        self.initial_cash = config.initial_cash
        self.marked = 0  # sum of the open holdings' marks
        self._markets = markets
        self._latest: dict[str, SnapshotRecord] = {}
        self._yes: dict[str, _Holding] = {}
        self._no: dict[str, _Holding] = {}
        self._open_holdings = 0
        self._settled: set[str] = set()
        self._fee_rate = config.taker_fee_rate_ten_thousandths
        self._fee_unit = FeeRounding(config.fee_rounding).unit
        self._fee_denominator = PRICE_SCALE * COUNT_SCALE * PRICE_SCALE * self._fee_unit
        self._consumed: dict[tuple[str, bool], int] = {}
        self.executions: list[ExecutionRecord] = []
        self.fees_paid = 0
        self.trade_count = 0
        self.rejected_orders = 0
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

    def market(self, ticker: str) -> MarketRecord | None:
        """See ``MarketView.market``."""
        return self._markets.get(ticker)

    @property
    def equity(self) -> int:
        """See ``PortfolioView.equity``."""
        return self.cash + self.marked

    def position(self, ticker: str, side: Side) -> int:
        """See ``PortfolioView.position``."""
        holding = (self._yes if side is _YES else self._no).get(ticker)
        return holding.count if holding is not None else 0

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
        holdings = [
            (side, book, book[ticker])
            for side, book in ((Side.YES, self._yes), (Side.NO, self._no))
            if ticker in book
        ]
        if not holdings:
            return
        self.begin_event(when)
        for side, book, holding in holdings:
            payout = yes_payout if side is Side.YES else PRICE_SCALE - yes_payout
            amount = holding.count * payout // COUNT_SCALE
            self.cash += amount
            self.marked -= holding.mark
            realized = amount - holding.cost
            self._record(
                when, ticker, 0, side, OrderAction.SETTLE, holding.count, payout, 0, 0, realized
            )
            self._close(book, ticker, holding, realized, when)
        self.record_equity(when)

    def _set_mark(self, holding: _Holding, bid: int | None) -> None:
        # No bid: nobody would buy the position, so it is worth nothing.
        mark = holding.count * bid // COUNT_SCALE if bid is not None else 0
        self.marked += mark - holding.mark
        holding.mark = mark

    # --- orders ---------------------------------------------------------------------------------

    def execute(self, orders: Sequence[Order]) -> None:
        """Fills the strategy's orders, in the order given, against the latest snapshots."""
        self._consumed.clear()
        for order in orders:
            self._execute(order)

    def _execute(self, order: Order) -> None:
        side, action, count = order.side, order.action, order.count
        if side not in (_YES, _NO) or action not in (_BUY, _SELL):
            raise StrategyError(f"order must be YES/NO and BUY/SELL: {order!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            raise StrategyError(f"order count must be a positive int (1/100 contract): {order!r}")
        if order.probability is not None:
            if not 0.0 <= order.probability <= 1.0:
                raise StrategyError(f"order probability must be in [0, 1]: {order!r}")
            self.forecasts.append((order.ticker, order.probability))
        ticker = order.ticker
        snapshot = self._latest.get(ticker)
        if snapshot is None or ticker in self._settled:
            self.rejected_orders += 1
            return
        is_yes = side is _YES
        book = self._yes if is_yes else self._no
        holding = book.get(ticker)
        buying = action is _BUY
        # A NO ask is the complement of a YES bid (and a NO bid of a YES ask): buying NO takes the
        # YES bid level's displayed size, selling NO the YES ask level's.
        takes_yes_ask_level = buying == is_yes
        if buying:
            touch = snapshot.yes_ask if is_yes else snapshot.no_ask
        else:
            touch = snapshot.yes_bid if is_yes else snapshot.no_bid
            count = min(count, holding.count if holding is not None else 0)
        if touch is None or count <= 0:
            self.rejected_orders += 1
            return
        level = (ticker, takes_yes_ask_level)
        if self.config.cap_by_displayed_size:
            shown = snapshot.yes_ask_size if takes_yes_ask_level else snapshot.yes_bid_size
            if shown is not None:
                count = min(count, shown - self._consumed.get(level, 0))
        if buying and self.config.max_position:
            held = sum(h.count for h in (self._yes.get(ticker), self._no.get(ticker)) if h)
            count = min(count, self.config.max_position - held)
        if count <= 0:
            self.rejected_orders += 1
            return
        slippage = self.config.slippage
        if buying:
            price = min(touch + slippage, PRICE_SCALE)
            count = self._affordable(count, price, touch)
            if count <= 0:
                self.rejected_orders += 1
                return
            fee = self._fee(count, touch)
            total = -(-count * price // COUNT_SCALE) + fee
            self.cash -= total
            if holding is None:
                holding = book[ticker] = _Holding()
                self._opened(self.time)
            holding.count += count
            holding.cost += total
            realized = 0
        else:
            assert holding is not None  # count > 0 above means something is held
            price = max(touch - slippage, 0)
            fee = self._fee(count, touch)
            net = count * price // COUNT_SCALE - fee
            if self.cash + net < 0:
                # The fee exceeds cash plus proceeds (a tiny sale under cent rounding).
                self.rejected_orders += 1
                return
            self.cash += net
            released = holding.cost * count // holding.count
            holding.cost -= released
            holding.count -= count
            realized = net - released
        self._consumed[level] = self._consumed.get(level, 0) + count
        self.fees_paid += fee
        self.trade_count += 1
        self._set_mark(holding, snapshot.yes_bid if is_yes else snapshot.no_bid)
        self._record(
            self.time,
            ticker,
            snapshot.snapshot_id,
            side,
            action,
            count,
            price,
            fee,
            holding.count,
            realized,
        )
        if not buying:
            holding.trip_pnl += realized
            if holding.count == 0:
                self._close(book, ticker, holding, 0, self.time)

    def _fee(self, count: int, touch: int) -> int:
        numerator = self._fee_rate * count * touch * (PRICE_SCALE - touch)
        return -(-numerator // self._fee_denominator) * self._fee_unit

    def _affordable(self, count: int, price: int, touch: int) -> int:
        """The largest count up to ``count`` whose cost plus fee fits in cash (cost and fee grow
        with the count, so a binary search finds it)."""

        def total(n: int) -> int:
            return -(-n * price // COUNT_SCALE) + self._fee(n, touch)

        if total(count) <= self.cash:
            return count
        low, high = 0, count  # total(low) fits, total(high) does not
        while high - low > 1:
            middle = (low + high) // 2
            if total(middle) <= self.cash:
                low = middle
            else:
                high = middle
        return low

    def _record(
        self,
        when: datetime,
        ticker: str,
        snapshot_id: int,
        side: Side,
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
                side,
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
        if self._open_holdings == 0:
            self._open_since = when
        self._open_holdings += 1

    def _close(
        self,
        book: dict[str, _Holding],
        ticker: str,
        holding: _Holding,
        realized: int,
        when: datetime,
    ) -> None:
        """Ends a round trip: ``realized`` is what the closing event adds to its PnL."""
        self.trip_pnls.append(holding.trip_pnl + realized)
        del book[ticker]
        self._open_holdings -= 1
        if self._open_holdings == 0 and self._open_since is not None:
            self.exposed += when - self._open_since
            self._open_since = None

    # --- the replay -----------------------------------------------------------------------------

    def replay(
        self,
        snapshots: Iterable[SnapshotRecord],
        on_snapshot: Callable[[SnapshotRecord, _Run, _Run], Sequence[Order]],
        fingerprinter: Fingerprinter | None,
        total: int,
        progress: Callable[[Progress], None] | None,
        should_stop: Callable[[], bool] | None,
        progress_every: int,
    ) -> int:
        """The hot loop; returns the number of snapshots replayed. Per snapshot it only touches
        what changed, through local names. ``fingerprinter`` None: the caller fingerprints."""
        start = self.config.start_time or _BEFORE_ALL
        end = self.config.end_time or _AFTER_ALL
        # An open window (the service bounds the rows it reads anyway) skips two datetime
        # comparisons per snapshot.
        windowed = self.config.start_time is not None or self.config.end_time is not None
        tickers = frozenset(self.config.tickers)
        latest = self._latest
        hashing = fingerprinter is not None
        add_row = fingerprinter.add if fingerprinter is not None else None
        curve_times = self.curve_times
        curve_equity = self.curve_equity
        last_time: datetime | None = None
        next_day = _BEFORE_ALL  # forces begin_event on the first snapshot
        processed = 0
        next_report = progress_every
        yes_get = self._yes.get
        no_get = self._no.get
        for snapshot in snapshots:
            now = snapshot.exchange_time
            ticker = snapshot.ticker
            if ticker not in tickers or (windowed and (now < start or now >= end)):
                continue
            if now >= self.next_settlement:
                self.settle_due(now)
                last_time = curve_times[-1] if curve_times else None
            if now >= next_day:
                self.begin_event(now)
                assert self.day_end is not None
                next_day = self.day_end
            if hashing:
                add_row(snapshot)  # type: ignore[misc]  # set whenever hashing
            latest[ticker] = snapshot
            self.time = now
            if self._open_holdings:
                # Inlined remark(): this runs for nearly every snapshot while positions are open.
                holding = yes_get(ticker)
                if holding is not None:
                    bid = snapshot.yes_bid
                    mark = holding.count * bid // COUNT_SCALE if bid is not None else 0
                    self.marked += mark - holding.mark
                    holding.mark = mark
                holding = no_get(ticker)
                if holding is not None:
                    bid = snapshot.no_bid
                    mark = holding.count * bid // COUNT_SCALE if bid is not None else 0
                    self.marked += mark - holding.mark
                    holding.mark = mark
            orders = on_snapshot(snapshot, self, self)
            if orders:
                self.execute(orders)
            equity = self.cash + self.marked
            if now != last_time:
                curve_times.append(now)
                curve_equity.append(equity)
                last_time = now
            else:
                curve_equity[-1] = equity
            processed += 1
            if processed >= next_report:
                next_report += progress_every
                self.report(processed, total, progress, should_stop)
        if self.first_time is not None:
            self.last_time = max(self.last_time or self.first_time, self.time)
        return processed

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
        """Settles what settles inside the window, then marks the rest at the bid (MARK)."""
        self.settle_due(_AFTER_ALL)
        if self.first_time is None:
            return
        assert self.last_time is not None
        mark_time = self.config.end_time or self.last_time
        for ticker in sorted(set(self._yes) | set(self._no)):
            for side, book in ((Side.YES, self._yes), (Side.NO, self._no)):
                holding = book.get(ticker)
                if holding is None:
                    continue
                snapshot = self._latest[ticker]
                bid = snapshot.yes_bid if side is Side.YES else snapshot.no_bid
                self._record(
                    mark_time,
                    ticker,
                    snapshot.snapshot_id,
                    side,
                    OrderAction.MARK,
                    holding.count,
                    bid or 0,
                    0,
                    holding.count,
                    holding.mark - holding.cost,
                )
        if self._open_since is not None:
            self.exposed += self.last_time - self._open_since
        self.day_closes.append(self.cash + self.marked)


def run_backtest(
    config: EngineConfig,
    markets: Mapping[str, MarketRecord],
    snapshots: Iterable[SnapshotRecord],
    *,
    total: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    registry: StrategyRegistry = default_registry,
    max_equity_points: int = DEFAULT_MAX_EQUITY_POINTS,
    progress_every: int = DEFAULT_PROGRESS_EVERY,
    fingerprinter: Fingerprinter | None = None,
) -> BacktestResult:
    """Runs one backtest.

    ``snapshots`` must come in (exchange_time, snapshot_id) order; those outside the window or of
    other tickers are skipped (and not fingerprinted). ``markets`` gives each ticker's result and
    settlement time. ``total`` (the expected snapshot count) only scales ``fraction_done``.
    ``progress`` and ``should_stop`` are called every ``progress_every`` snapshots, so a cancel
    lands within that many; BacktestCancelled is raised then. Raises ConfigError for a bad
    configuration and StrategyError for a malformed order.

    By default the engine fingerprints the rows it replays. A caller that already hashes the rows
    as it produces them (the service hashes the encoded chunks it ships to the worker) passes its
    ``fingerprinter`` instead; the run then checks that it replayed exactly as many rows as were
    fingerprinted (ValueError otherwise), so provenance cannot drift from what ran.
    """
    config = validate_config(config, registry)
    if max_equity_points < 2 or progress_every < 1:
        raise ValueError("max_equity_points must be >= 2 and progress_every >= 1")
    strategy_class = registry.get(config.strategy)
    strategy = strategy_class(Parameters(config.parameters))
    run = _Run(config, markets)
    total_hint = total or 0
    run.report(0, total_hint, None, should_stop)
    strategy.on_start(run, run)
    caller_hashes = fingerprinter is not None
    fingerprinter = fingerprinter or Fingerprinter()
    processed = run.replay(
        snapshots,
        strategy.on_snapshot,
        None if caller_hashes else fingerprinter,
        total_hint,
        progress,
        should_stop,
        progress_every,
    )
    strategy.on_end(run, run)
    run.finish()
    run.report(processed, processed, progress, None, finished=True)
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
