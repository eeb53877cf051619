"""The compiled path: the threshold, mean-reversion, momentum and favourite-hold rules over
snapshot columns, in one numba kernel, and the spread maker over snapshots and trades in another
(``maker_kernel``).

It gives exactly what ``run_backtest`` gives for the same configuration and snapshots (the tests
compare both on random data, fills, fees, settlements, marks, curve and metrics), at column speed:
the rows become numpy columns once (``SnapshotColumns``), the kernel replays them in compiled
code, and only the executions and at most ``max_equity_points`` curve points become Python
objects. A sweep reads the columns once and runs the kernel per grid point.

Eligible runs (``fast_path_applies``): a ``FAST_STRATEGIES`` strategy, the TOUCH fill model, no
latency; no books, and trades only for ``COMPILED_WITH_TRADES`` (the spread maker's queues).
Everything else goes through the event engine.
The kernel is compiled on first use and cached on disk (numba ``cache=True``), so a worker pays
the compile cost once, not per run.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit

from kfeed_server.backtest import maker_kernel
from kfeed_server.backtest.config import (
    COMPILED_WITH_TRADES,
    fast_path_applies,
    validate_config,
)
from kfeed_server.backtest.engine import (
    DEFAULT_MAX_EQUITY_POINTS,
    BacktestResult,
    StrategyError,
    _yes_payout,
)
from kfeed_server.backtest.fees import DEFAULT_MARKET_FEES, FeeType, MarketFees
from kfeed_server.backtest.fingerprint import Fingerprinter
from kfeed_server.backtest.kernel_parts import kernel_fee, write_execution
from kfeed_server.backtest.metrics import (
    Drawdown,
    brier_score,
    daily_returns,
    round_trip_stats,
    sharpe_ratio,
    sortino_ratio,
)
from kfeed_server.backtest.orders import Order
from kfeed_server.backtest.strategy import StrategyRegistry, default_registry
from kfeed_server.records import (
    DataSource,
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
from kfeed_server.records.backtest import BacktestMetrics, EngineConfig, FeeRounding

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_DAY_US = 86_400_000_000
_NONE = -1  # a missing value in an int64 column (prices and sizes are never negative)
_GET = {name: operator.attrgetter(name) for name in SnapshotRecord._fields}
_INT_COLUMNS = ("yes_bid", "yes_ask", "no_bid", "no_ask", "yes_bid_size", "yes_ask_size")
_COLUMN_NAMES = ("code", "time_us", "snapshot_id", *_INT_COLUMNS)


@dataclass(frozen=True, slots=True)
class SnapshotColumns:
    """Snapshots as columns: ``code`` indexes ``tickers`` (-1: another market), times in µs
    since the epoch, prices and sizes as int64 with -1 for None."""

    tickers: tuple[str, ...]
    code: np.ndarray
    time_us: np.ndarray
    snapshot_id: np.ndarray
    yes_bid: np.ndarray
    yes_ask: np.ndarray
    no_bid: np.ndarray
    no_ask: np.ndarray
    yes_bid_size: np.ndarray
    yes_ask_size: np.ndarray

    def __len__(self) -> int:
        return int(self.code.size)


def _int_column(values: Sequence[int | None]) -> np.ndarray:
    # None becomes NaN in C, then -1: no per-value Python code. Exact below 2^53.
    floats = np.array(values, dtype=np.float64)
    return np.where(np.isnan(floats), _NONE, floats).astype(np.int64)


def columns_from_records(
    records: Sequence[SnapshotRecord], tickers: Sequence[str]
) -> SnapshotColumns:
    """``records`` as columns (one C-level map per field)."""
    tickers = tuple(tickers)
    n = len(records)
    code_of = {ticker: code for code, ticker in enumerate(tickers)}
    codes = np.fromiter(
        (code_of.get(t, _NONE) for t in map(_GET["ticker"], records)), dtype=np.int64, count=n
    )
    seconds = np.fromiter(
        map(datetime.timestamp, map(_GET["exchange_time"], records)), dtype=np.float64, count=n
    )
    # A float64 second count is within 0.25 µs of the truth: rounding recovers the microsecond.
    time_us = np.rint(seconds * 1e6).astype(np.int64)
    ids = np.fromiter(map(_GET["snapshot_id"], records), dtype=np.int64, count=n)
    ints = [_int_column(list(map(_GET[name], records))).reshape(n) for name in _INT_COLUMNS]
    return SnapshotColumns(tickers, codes, time_us, ids, *ints)


def _picks(n: int, max_points: int) -> np.ndarray:
    """``metrics.downsample_picks`` in numpy."""
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    k = np.arange(max_points, dtype=np.int64)
    return ((k + 1) * n + max_points - 1) // max_points - 1


def _datetimes(values: np.ndarray) -> list[datetime]:
    """Microseconds since the epoch as UTC datetimes (converted in C, then given the zone)."""
    naive = values.astype("datetime64[us]").astype(object)
    return [moment.replace(tzinfo=UTC) for moment in naive]


class ColumnCollector:
    """Builds ``SnapshotColumns`` from consecutive replay batches (``replay_batches``): each
    batch's columns become numpy arrays in C as it arrives (views where Arrow's layout is
    numpy's), joined once at the end."""

    def __init__(self, tickers: Sequence[str]) -> None:
        self.tickers = tuple(tickers)
        self._ticker_set = pa.array(self.tickers, pa.string())
        self._parts: dict[str, list[np.ndarray]] = {name: [] for name in _COLUMN_NAMES}
        self._rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        """Adds one replay batch's rows."""
        column = batch.column
        parts = self._parts
        codes = pc.index_in(column("ticker"), value_set=self._ticker_set)
        parts["code"].append(_filled(codes).astype(np.int64))
        parts["time_us"].append(column("exchange_time").cast(pa.int64()).to_numpy())
        parts["snapshot_id"].append(column("snapshot_id").to_numpy())
        for name in _INT_COLUMNS:
            parts[name].append(_filled(column(name)))
        self._rows += batch.num_rows

    def __len__(self) -> int:
        return self._rows

    def columns(self) -> SnapshotColumns:
        """The columns collected so far."""
        arrays = [
            np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
            for parts in self._parts.values()
        ]
        return SnapshotColumns(self.tickers, *arrays)


def _filled(column: pa.Array[Any]) -> np.ndarray:
    """An integer column as numpy, -1 (``_NONE``) where null."""
    if column.null_count:
        column = column.fill_null(_NONE)
    return column.to_numpy()


def concatenate(parts: Sequence[SnapshotColumns]) -> SnapshotColumns:
    """One set of columns from consecutive parts (same tickers)."""
    if len(parts) == 1:
        return parts[0]
    arrays = [np.concatenate([getattr(p, name) for p in parts]) for name in _COLUMN_NAMES]
    return SnapshotColumns(parts[0].tickers, *arrays)


# --- the kernel ----------------------------------------------------------------------------------

# The rules the kernel runs (``strategy``), by strategy name.
_THRESHOLD = 0
_FAVOURITE = 1
_MEAN_REVERSION = 2
_MOMENTUM = 3
_RULES = {
    "threshold": _THRESHOLD,
    "favourite_hold": _FAVOURITE,
    "mean_reversion": _MEAN_REVERSION,
    "momentum": _MOMENTUM,
}
_BOUNDS = {"threshold": ("buy_below", "sell_above"), "favourite_hold": ("min_price", "max_price")}


# Bounds-checked: an index error raises instead of corrupting memory (and with unchecked indexing
# LLVM's optimiser has produced a crashing build of this loop here).
@njit(cache=True, boundscheck=True)
def _taker_kernel(
    code: np.ndarray,
    time_us: np.ndarray,
    sid: np.ndarray,
    yes_bid: np.ndarray,
    yes_ask: np.ndarray,
    no_bid: np.ndarray,
    no_ask: np.ndarray,
    yes_bid_size: np.ndarray,
    yes_ask_size: np.ndarray,
    strategy: int,
    lower: int,
    upper: int,
    window: int,
    entry_z: float,
    exit_z: float,
    order_count: int,
    initial_cash: int,
    rate: int,
    multipliers: np.ndarray,
    flats: np.ndarray,
    unit: int,
    slippage: int,
    max_position: int,
    capped: bool,
    start_us: int,
    end_us: int,
    due_time: np.ndarray,
    due_code: np.ndarray,
    due_payout: np.ndarray,
    first_day_us: int,
    ex: np.ndarray,
    curve: np.ndarray,
    closes: np.ndarray,
    trips: np.ndarray,
    held: np.ndarray,
    cost: np.ndarray,
    mark: np.ndarray,
    latest_bid: np.ndarray,
    latest_no_bid: np.ndarray,
    latest_sid: np.ndarray,
    yes_side: np.ndarray,
    forecast_p: np.ndarray,
    forecast_code: np.ndarray,
    scalars: np.ndarray,
) -> None:
    """Replays the rows; fills the output arrays and ``scalars`` (see ``_run_kernel``).

    ``strategy`` picks the rule: _THRESHOLD (buy YES at an ask <= ``lower``, sell at a bid >=
    ``upper``), _FAVOURITE (flat: buy YES at an ask in [``lower``, ``upper``], else NO at a NO
    ask in it, stating the price as the forecast; hold to settlement), _MEAN_REVERSION (the
    rolling z-score of the YES mid over ``window`` mids: enter at ``entry_z``, exit at
    ``exit_z``) or _MOMENTUM (the doubled mid's change over the market's last ``window`` mids,
    the lookback plus one: flat, buy YES at a change >= ``lower``, NO at <= −``lower``; sell
    YES on a fall, NO on a rise). ``yes_side`` is each position's side (1 YES, 0 NO): a NO
    position is bought at the NO ask, marked and sold at the NO bid, and settles at $1 − the YES
    payout."""
    cash = initial_cash
    marked = 0
    n_ex = 0
    n_curve = 0
    n_closes = 0
    n_trips = 0
    fees_paid = 0
    trades = 0
    rejected = 0
    processed = 0
    open_positions = 0
    open_since = -1
    exposed = 0
    first_time = -1
    last_time = -1
    day_end = -1
    now = -1
    next_due = 0
    n_due = due_time.size
    n_forecasts = 0
    link = np.zeros(code.size, dtype=np.int64)
    window_tail = np.zeros(held.size, dtype=np.int64)
    window_head = np.zeros(held.size, dtype=np.int64)
    window_count = np.zeros(held.size, dtype=np.int64)
    mid_sum = np.zeros(held.size, dtype=np.int64)
    mid_squares = np.zeros(held.size, dtype=np.int64)
    trip_pnl = np.zeros(held.size, dtype=np.int64)
    for i in range(code.size):
        c = code[i]
        t = time_us[i]
        if c < 0 or t < start_us or t >= end_us:
            continue
        # Settlements due at or before this snapshot.
        while next_due < n_due and due_time[next_due] <= t:
            when = due_time[next_due]
            dc = due_code[next_due]
            payout = due_payout[next_due]
            next_due += 1
            latest_sid[dc] = -2  # settled: no more orders
            if held[dc] > 0:
                if yes_side[dc] == 0:
                    payout = 10_000 - payout
                # begin_event(when)
                if day_end < 0:
                    first_time = when
                    day_end = first_day_us + ((when - first_day_us) // 86_400_000_000 + 1) * (
                        86_400_000_000
                    )
                while when >= day_end:
                    closes[n_closes] = cash + marked
                    n_closes += 1
                    day_end += 86_400_000_000
                last_time = when
                amount = held[dc] * payout // 100
                cash += amount
                realized = amount - cost[dc]
                trip_pnl[dc] += realized
                n_ex = write_execution(
                    ex, n_ex, when, dc, 0, 3, held[dc], payout, 0, cash, 0, realized, yes_side[dc]
                )
                trips[n_trips] = trip_pnl[dc]
                n_trips += 1
                trip_pnl[dc] = 0
                marked -= mark[dc]
                mark[dc] = 0
                held[dc] = 0
                cost[dc] = 0
                open_positions -= 1
                if open_positions == 0:
                    exposed += when - open_since
                    open_since = -1
                # record_equity(when)
                if n_curve > 0 and curve[n_curve - 1, 0] == when:
                    curve[n_curve - 1, 1] = cash + marked
                else:
                    curve[n_curve, 0] = when
                    curve[n_curve, 1] = cash + marked
                    n_curve += 1
        if t >= day_end:
            if day_end < 0:
                first_time = t
                day_end = first_day_us + ((t - first_day_us) // 86_400_000_000 + 1) * (
                    86_400_000_000
                )
            while t >= day_end:
                closes[n_closes] = cash + marked
                n_closes += 1
                day_end += 86_400_000_000
            last_time = t
        now = t
        bid = yes_bid[i]
        ask = yes_ask[i]
        if latest_sid[c] != -2:
            latest_sid[c] = sid[i]
        latest_bid[c] = bid
        latest_no_bid[c] = no_bid[i]
        if held[c] > 0:
            held_bid = bid if yes_side[c] else no_bid[i]
            m = held[c] * held_bid // 100 if held_bid >= 0 else 0
            marked += m - mark[c]
            mark[c] = m
        settled = latest_sid[c] == -2
        # The buy a flat market gets: its side (1 YES, 0 NO, -1 none).
        buy_yes = -1
        sell = False
        if strategy in (_MEAN_REVERSION, _MOMENTUM):
            if bid >= 0 and ask >= 0:
                # The market's window of doubled mids: rows chained by ``link``, oldest first.
                mid = bid + ask
                if window_count[c] == 0:
                    window_tail[c] = i
                else:
                    link[window_head[c]] = i
                window_head[c] = i
                window_count[c] += 1
                mid_sum[c] += mid
                mid_squares[c] += mid * mid
                if window_count[c] > window:
                    gone = yes_bid[window_tail[c]] + yes_ask[window_tail[c]]
                    mid_sum[c] -= gone
                    mid_squares[c] -= gone * gone
                    window_tail[c] = link[window_tail[c]]
                    window_count[c] -= 1
                k = window_count[c]
                if strategy == _MOMENTUM:
                    if k >= window:
                        # The window's oldest mid is the one ``lookback`` mids ago.
                        change = mid - (yes_bid[window_tail[c]] + yes_ask[window_tail[c]])
                        if held[c] > 0:
                            sell = change < 0 if yes_side[c] else change > 0
                        elif change >= lower:
                            buy_yes = 1
                        elif change <= -lower:
                            buy_yes = 0
                else:
                    # The strategy's z_score: n² × variance = n × Σx² − (Σx)², exact.
                    scaled_variance = k * mid_squares[c] - mid_sum[c] * mid_sum[c]
                    if k >= window and scaled_variance > 0:
                        z = (k * mid - mid_sum[c]) / math.sqrt(scaled_variance)
                        if held[c] > 0:
                            sell = z >= -exit_z if yes_side[c] else z <= exit_z
                        elif z <= -entry_z:
                            buy_yes = 1
                        elif z >= entry_z:
                            buy_yes = 0
        elif held[c] > 0:
            sell = strategy == _THRESHOLD and bid >= 0 and bid >= upper
        elif strategy == _THRESHOLD:
            if ask >= 0 and ask <= lower:
                buy_yes = 1
        elif ask >= 0 and lower <= ask <= upper:
            buy_yes = 1
            # Forecasts count whether or not the order fills (as the engine's do).
            forecast_p[n_forecasts] = ask / 10_000
            forecast_code[n_forecasts] = c
            n_forecasts += 1
        elif no_ask[i] >= 0 and lower <= no_ask[i] <= upper:
            buy_yes = 0
            forecast_p[n_forecasts] = 1.0 - no_ask[i] / 10_000
            forecast_code[n_forecasts] = c
            n_forecasts += 1
        if sell:
            # SELL the whole position at its side's bid (a NO sale takes the YES asks' size).
            yes = yes_side[c]
            held_bid = bid if yes else no_bid[i]
            size = yes_bid_size[i] if yes else yes_ask_size[i]
            n = held[c]
            if capped and size >= 0:
                n = min(n, size)
            if settled or n <= 0 or held_bid < 0:
                rejected += 1
            else:
                price = max(held_bid - slippage, 0)
                fee = kernel_fee(n, held_bid, rate, multipliers[c], flats[c], unit)
                gross = n * price // 100
                if cash + gross - fee < 0:
                    rejected += 1
                else:
                    cash += gross - fee
                    released = cost[c] * n // held[c]
                    realized = gross - fee - released
                    cost[c] -= released
                    held[c] -= n
                    trip_pnl[c] += realized
                    m = held[c] * held_bid // 100
                    marked += m - mark[c]
                    mark[c] = m
                    fees_paid += fee
                    trades += 1
                    n_ex = write_execution(
                        ex,
                        n_ex,
                        t,
                        c,
                        sid[i],
                        2,
                        n,
                        price,
                        fee,
                        cash,
                        held[c] if yes else -held[c],
                        realized,
                        yes,
                    )
                    if held[c] == 0:
                        trips[n_trips] = trip_pnl[c]
                        n_trips += 1
                        trip_pnl[c] = 0
                        marked -= mark[c]
                        mark[c] = 0
                        cost[c] = 0
                        open_positions -= 1
                        if open_positions == 0:
                            exposed += t - open_since
                            open_since = -1
        if buy_yes >= 0:
            # BUY order_count at the side's ask (a NO buy takes the YES bids' size).
            take = ask if buy_yes else no_ask[i]
            size = yes_ask_size[i] if buy_yes else yes_bid_size[i]
            n = order_count
            if settled or take < 0:
                n = 0
            if capped and size >= 0:
                n = min(n, size)
            if max_position > 0:
                n = min(n, max_position)
            price = min(take + slippage, 10_000)
            if n > 0:
                total = -(-n * price // 100) + kernel_fee(
                    n, take, rate, multipliers[c], flats[c], unit
                )
                if total > cash:
                    low = 0
                    high = n
                    while high - low > 1:
                        middle = (low + high) // 2
                        need = -(-middle * price // 100) + kernel_fee(
                            middle, take, rate, multipliers[c], flats[c], unit
                        )
                        if need <= cash:
                            low = middle
                        else:
                            high = middle
                    n = low
            if n <= 0:
                rejected += 1
            else:
                fee = kernel_fee(n, take, rate, multipliers[c], flats[c], unit)
                total = -(-n * price // 100) + fee
                cash -= total
                if open_positions == 0 and open_since < 0:
                    open_since = t
                open_positions += 1
                held[c] = n
                cost[c] = total
                yes_side[c] = buy_yes
                held_bid = bid if buy_yes else no_bid[i]
                m = n * held_bid // 100 if held_bid >= 0 else 0
                marked += m - mark[c]
                mark[c] = m
                fees_paid += fee
                trades += 1
                n_ex = write_execution(
                    ex, n_ex, t, c, sid[i], 1, n, price, fee, cash, n if buy_yes else -n, 0, buy_yes
                )
        equity = cash + marked
        if n_curve > 0 and curve[n_curve - 1, 0] == t:
            curve[n_curve - 1, 1] = equity
        else:
            curve[n_curve, 0] = t
            curve[n_curve, 1] = equity
            n_curve += 1
        processed += 1
    if first_time >= 0:
        last_time = max(last_time, now)
    # finish(): the settlements left inside the window.
    while next_due < n_due:
        when = due_time[next_due]
        dc = due_code[next_due]
        payout = due_payout[next_due]
        next_due += 1
        if held[dc] > 0:
            if yes_side[dc] == 0:
                payout = 10_000 - payout
            if day_end < 0:
                first_time = when
                day_end = first_day_us + ((when - first_day_us) // 86_400_000_000 + 1) * (
                    86_400_000_000
                )
            while when >= day_end:
                closes[n_closes] = cash + marked
                n_closes += 1
                day_end += 86_400_000_000
            last_time = when
            amount = held[dc] * payout // 100
            cash += amount
            realized = amount - cost[dc]
            trip_pnl[dc] += realized
            n_ex = write_execution(
                ex, n_ex, when, dc, 0, 3, held[dc], payout, 0, cash, 0, realized, yes_side[dc]
            )
            trips[n_trips] = trip_pnl[dc]
            n_trips += 1
            trip_pnl[dc] = 0
            marked -= mark[dc]
            mark[dc] = 0
            held[dc] = 0
            cost[dc] = 0
            open_positions -= 1
            if open_positions == 0:
                exposed += when - open_since
                open_since = -1
            if n_curve > 0 and curve[n_curve - 1, 0] == when:
                curve[n_curve - 1, 1] = cash + marked
            else:
                curve[n_curve, 0] = when
                curve[n_curve, 1] = cash + marked
                n_curve += 1
    if first_time >= 0:
        if open_since >= 0:
            exposed += last_time - open_since
        closes[n_closes] = cash + marked
        n_closes += 1
    scalars[0] = cash
    scalars[1] = marked
    scalars[2] = n_ex
    scalars[3] = n_curve
    scalars[4] = n_closes
    scalars[5] = n_trips
    scalars[6] = fees_paid
    scalars[7] = trades
    scalars[8] = rejected
    scalars[9] = processed
    scalars[10] = exposed
    scalars[11] = first_time
    scalars[12] = last_time
    scalars[13] = n_forecasts


@njit(cache=True, boundscheck=True)
def _drawdown(times: np.ndarray, equity: np.ndarray, initial: int) -> tuple[int, float, int]:
    """``metrics.max_drawdown`` of the curve ``initial`` then ``equity`` (the first point at the
    curve's first time), compiled: (depth, fraction, longest duration in µs)."""
    n = equity.size + 1
    peak = initial
    depth = 0
    fraction = 0.0
    longest = 0
    run_start = -1
    for i in range(n):
        value = initial if i == 0 else equity[i - 1]
        if value > peak:
            peak = value
        fall = peak - value
        if fall > depth:
            depth = fall
        if peak > 0:
            share = fall / peak
            if share > fraction:
                fraction = share
        if fall > 0:
            if run_start < 0:
                run_start = i
        elif run_start >= 0:
            # Point i is back at the peak; the run began after point run_start - 1.
            began = times[max(run_start - 1, 0) - 1] if run_start >= 2 else times[0]
            longest = max(longest, times[i - 1] - began)
            run_start = -1
    if run_start >= 0:
        began = times[max(run_start - 1, 0) - 1] if run_start >= 2 else times[0]
        longest = max(longest, times[n - 2] - began)
    return depth, fraction, longest


# --- around the kernel ---------------------------------------------------------------------------


def _to_us(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(value))


@dataclass(frozen=True, slots=True)
class _Prepared:
    """What every grid point of one data set shares: the columns and the market terms."""

    columns: SnapshotColumns
    multipliers: np.ndarray
    flats: np.ndarray
    due_time: np.ndarray
    due_code: np.ndarray
    due_payout: np.ndarray
    first_day_us: int
    makers_pay: np.ndarray
    # The public trades given (all of them: each run keeps those of its window).
    trades: tuple[TradeRecord, ...]
    trade_columns: TradeColumns


@dataclass(frozen=True, slots=True)
class TradeColumns:
    """Public trades as columns: ``code`` indexes the tickers (-1: another market), times in µs
    since the epoch, ``hits_yes`` 1 when the taker bought NO (it sold into the YES bids)."""

    code: np.ndarray
    time_us: np.ndarray
    yes_price: np.ndarray
    no_price: np.ndarray
    count: np.ndarray
    hits_yes: np.ndarray


def trade_columns(trades: Sequence[TradeRecord], tickers: Sequence[str]) -> TradeColumns:
    """``trades`` as columns."""
    code_of = {ticker: code for code, ticker in enumerate(tickers)}
    return TradeColumns(
        np.array([code_of.get(t.ticker, _NONE) for t in trades], dtype=np.int64),
        np.array([_to_us(t.create_time) for t in trades], dtype=np.int64),
        np.array([t.yes_price for t in trades], dtype=np.int64),
        np.array([t.no_price for t in trades], dtype=np.int64),
        np.array([t.count for t in trades], dtype=np.int64),
        np.array([t.taker_side is Side.NO for t in trades], dtype=np.int64),
    )


def _prepare(
    config: EngineConfig,
    markets: Mapping[str, MarketRecord],
    fees: Mapping[str, MarketFees],
    columns: SnapshotColumns,
    trades: Sequence[TradeRecord],
) -> _Prepared:
    tickers = columns.tickers
    terms = [fees.get(t, DEFAULT_MARKET_FEES) for t in tickers]
    multipliers = np.array([f.multiplier for f in terms], dtype=np.int64)
    flats = np.array([f.fee_type is FeeType.FLAT for f in terms], dtype=np.bool_)
    makers_pay = np.array([f.charges_makers for f in terms], dtype=np.bool_)
    due = []
    for code, ticker in enumerate(tickers):
        market = markets.get(ticker)
        if market is None or market.settlement_time is None:
            continue
        payout = _yes_payout(market)
        if payout is not None and (
            config.end_time is None or market.settlement_time < config.end_time
        ):
            due.append((market.settlement_time, ticker, code, payout))
    due.sort()
    return _Prepared(
        columns,
        multipliers,
        flats,
        np.array([_to_us(d[0]) for d in due], dtype=np.int64),
        np.array([d[2] for d in due], dtype=np.int64),
        np.array([d[3] for d in due], dtype=np.int64),
        0,  # UTC midnights are whole days since the epoch
        makers_pay,
        tuple(trades),
        trade_columns(trades, tickers),
    )


class _KernelOutput(NamedTuple):
    """The kernel's output arrays (``_taker_kernel``'s arguments of the same names)."""

    ex: np.ndarray
    curve: np.ndarray
    closes: np.ndarray
    trips: np.ndarray
    held: np.ndarray
    cost: np.ndarray
    mark: np.ndarray
    latest_bid: np.ndarray
    latest_no_bid: np.ndarray
    latest_sid: np.ndarray
    yes_side: np.ndarray
    forecast_p: np.ndarray
    forecast_code: np.ndarray
    scalars: np.ndarray


def _run_kernel(config: EngineConfig, prepared: _Prepared) -> _KernelOutput:
    columns = prepared.columns
    n = len(columns)
    markets = len(columns.tickers)
    parameters = config.parameters
    start_us = _to_us(config.start_time) if config.start_time is not None else -(2**62)
    end_us = _to_us(config.end_time) if config.end_time is not None else 2**62
    first = int(columns.time_us.min()) if n else 0
    last = int(columns.time_us.max()) if n else 0
    due_last = int(prepared.due_time.max()) if prepared.due_time.size else last
    days = (max(last, due_last) - min(first, last)) // _DAY_US + 3
    ex = np.zeros((n + markets + 1, 11), dtype=np.int64)
    curve = np.zeros((n + markets + 1, 2), dtype=np.int64)
    closes = np.zeros(days + markets + 1, dtype=np.int64)
    trips = np.zeros(n + markets + 1, dtype=np.int64)
    held = np.zeros(markets, dtype=np.int64)
    cost = np.zeros(markets, dtype=np.int64)
    mark = np.zeros(markets, dtype=np.int64)
    latest_bid = np.full(markets, _NONE, dtype=np.int64)
    latest_no_bid = np.full(markets, _NONE, dtype=np.int64)
    latest_sid = np.full(markets, _NONE, dtype=np.int64)
    yes_side = np.ones(markets, dtype=np.int64)
    forecast_p = np.zeros(n, dtype=np.float64)
    forecast_code = np.zeros(n, dtype=np.int64)
    scalars = np.zeros(16, dtype=np.int64)
    low, high = _BOUNDS.get(config.strategy, ("", ""))
    lower, upper = int(parameters.get(low, 0)), int(parameters.get(high, 0))
    window = int(parameters.get("window", 0))
    if config.strategy == "momentum":
        # Doubled mids are compared: the threshold doubled, the window the lookback plus one.
        lower, window = 2 * int(parameters["threshold"]), int(parameters["lookback"]) + 1
    _taker_kernel(
        columns.code,
        columns.time_us,
        columns.snapshot_id,
        columns.yes_bid,
        columns.yes_ask,
        columns.no_bid,
        columns.no_ask,
        columns.yes_bid_size,
        columns.yes_ask_size,
        _RULES[config.strategy],
        lower,
        upper,
        window,
        float(parameters.get("entry_z", 0.0)),
        float(parameters.get("exit_z", 0.0)),
        int(parameters["count"]),
        config.initial_cash,
        config.taker_fee_rate_ten_thousandths,
        prepared.multipliers,
        prepared.flats,
        FeeRounding(config.fee_rounding).unit,
        config.slippage,
        config.max_position,
        config.cap_by_displayed_size,
        start_us,
        end_us,
        prepared.due_time,
        prepared.due_code,
        prepared.due_payout,
        prepared.first_day_us,
        ex,
        curve,
        closes,
        trips,
        held,
        cost,
        mark,
        latest_bid,
        latest_no_bid,
        latest_sid,
        yes_side,
        forecast_p,
        forecast_code,
        scalars,
    )
    return _KernelOutput(
        ex, curve, closes, trips, held, cost, mark, latest_bid, latest_no_bid, latest_sid,
        yes_side, forecast_p, forecast_code, scalars,
    )  # fmt: skip


def _run_maker(config: EngineConfig, prepared: _Prepared) -> _KernelOutput:
    """The spread maker's kernel (``maker_kernel``) over the prepared columns and trades, its
    output in ``_taker_kernel``'s shape (YES positions only, no forecasts)."""
    columns = prepared.columns
    trades = prepared.trade_columns
    n, markets = len(columns), len(columns.tickers)
    parameters = config.parameters
    first = int(columns.time_us.min()) if n else 0
    last = int(columns.time_us.max()) if n else 0
    due_last = int(prepared.due_time.max()) if prepared.due_time.size else last
    days = (max(last, due_last) - min(first, last)) // _DAY_US + 3
    # At most: a taker and two maker fills a snapshot, two maker fills a trade, a settlement each.
    ex = np.zeros((3 * n + 2 * trades.code.size + markets + 1, 11), dtype=np.int64)
    state = np.zeros((markets, maker_kernel.MARKET_FIELDS), dtype=np.int64)
    state[:, maker_kernel.MARKET_ROW] = _NONE
    scalars = np.zeros(maker_kernel.MAKER_SCALARS, dtype=np.int64)
    out = _KernelOutput(
        ex,
        np.zeros((n + markets + 1, 2), dtype=np.int64),
        np.zeros(days + markets + 1, dtype=np.int64),
        np.zeros(ex.shape[0], dtype=np.int64),
        state[:, maker_kernel.MARKET_HELD],
        state[:, maker_kernel.MARKET_COST],
        state[:, maker_kernel.MARKET_MARK],
        np.zeros(0, dtype=np.int64),  # filled below
        np.zeros(0, dtype=np.int64),
        np.zeros(0, dtype=np.int64),
        np.ones(markets, dtype=np.int64),
        np.zeros(0, dtype=np.float64),
        np.zeros(0, dtype=np.int64),
        scalars,
    )
    maker_kernel.maker_kernel(
        columns.code, columns.time_us, columns.snapshot_id, columns.yes_bid, columns.yes_ask,
        columns.no_bid, columns.yes_bid_size, columns.yes_ask_size,
        trades.code, trades.time_us, trades.yes_price, trades.no_price, trades.count,
        trades.hits_yes,
        int(parameters["min_spread"]), int(parameters["max_inventory"]), int(parameters["count"]),
        config.initial_cash, config.taker_fee_rate_ten_thousandths,
        config.maker_fee_rate_ten_thousandths, prepared.multipliers, prepared.flats,
        prepared.makers_pay, FeeRounding(config.fee_rounding).unit, config.slippage,
        config.cap_by_displayed_size, config.queue_cancel_share_ten_thousandths,
        _to_us(config.start_time) if config.start_time is not None else -(2**62),
        _to_us(config.end_time) if config.end_time is not None else 2**62,
        prepared.due_time, prepared.due_code, prepared.due_payout,
        out.ex, out.curve, out.closes, out.trips, state, scalars,
    )  # fmt: skip
    error_row = int(scalars[maker_kernel.ERROR_ROW])
    if error_row >= 0:
        _raise_refused(config, columns, error_row, scalars)
    # The latest snapshot of each market, for the marks at the end.
    rows = state[:, maker_kernel.MARKET_ROW]
    seen = rows >= 0
    safe = np.where(seen, rows, 0)
    return out._replace(
        latest_bid=np.where(seen, columns.yes_bid[safe] if n else _NONE, _NONE),
        latest_no_bid=np.where(seen, columns.no_bid[safe] if n else _NONE, _NONE),
        latest_sid=np.where(seen, columns.snapshot_id[safe] if n else _NONE, _NONE),
    )


def _raise_refused(
    config: EngineConfig, columns: SnapshotColumns, row: int, scalars: np.ndarray
) -> None:
    """The engine's StrategyError for the order the kernel stopped at (a limit price outside
    1..9,999: a quote at a $0 bid or a $1 ask)."""
    bid = int(scalars[maker_kernel.ERROR_ORDER]) == 1
    order = Order(
        columns.tickers[int(columns.code[row])],
        Side.YES,
        OrderAction.BUY if bid else OrderAction.SELL,
        int(scalars[maker_kernel.ERROR_COUNT]),
        limit_price=int(columns.yes_bid[row] if bid else columns.yes_ask[row]),
        client_order_id=1 if bid else 2,
    )
    raise StrategyError(f"limit_price must be an int in 1..9999: {order!r}")


_MAKER_FILLS = 14
_ACTIONS = {1: OrderAction.BUY, 2: OrderAction.SELL, 3: OrderAction.SETTLE}


def _result(
    config: EngineConfig,
    prepared: _Prepared,
    markets: Mapping[str, MarketRecord],
    fees: Mapping[str, MarketFees],
    fingerprinter: Fingerprinter,
    max_points: int,
) -> BacktestResult:
    out = _run_maker(config, prepared) if config.strategy == "spread_maker" else None
    out = out or _run_kernel(config, prepared)
    ex, curve, closes, trips = out.ex, out.curve, out.closes, out.trips
    values = [int(v) for v in out.scalars.tolist()]
    cash, marked, n_ex, n_curve, n_closes, n_trips, fees_paid, trades = values[:8]
    rejected, processed, exposed_us, first_us, last_us = values[8:13]
    tickers = prepared.columns.tickers
    executions = [
        ExecutionRecord(
            k + 1,
            tickers[row[1]],
            _from_us(row[0]),
            row[2],
            Side.YES if row[10] else Side.NO,
            _ACTIONS[row[3]],
            row[4],
            row[5],
            row[6],
            row[7],
            row[8],
            row[9],
        )
        for k, row in enumerate(ex[:n_ex].tolist())
    ]
    first_time = _from_us(first_us) if first_us >= 0 else None
    last_time = _from_us(last_us) if first_us >= 0 else None
    if last_time is not None:
        mark_time = config.end_time or last_time
        for code in sorted(range(len(tickers)), key=tickers.__getitem__):
            count = int(out.held[code])
            if count <= 0:
                continue
            yes = bool(out.yes_side[code])
            bid = out.latest_bid[code] if yes else out.latest_no_bid[code]
            executions.append(
                ExecutionRecord(
                    len(executions) + 1,
                    tickers[code],
                    mark_time,
                    max(int(out.latest_sid[code]), 0),
                    Side.YES if yes else Side.NO,
                    OrderAction.MARK,
                    count,
                    max(int(bid), 0),
                    0,
                    cash,
                    count if yes else -count,
                    int(out.mark[code]) - int(out.cost[code]),
                )
            )
    times = curve[:n_curve, 0]
    equity = curve[:n_curve, 1]
    span = last_us - first_us if first_us >= 0 else 0
    metrics = _metrics(
        config,
        cash + marked,
        closes[:n_closes],
        times,
        equity,
        trips[:n_trips],
        exposure=exposed_us / span if span > 0 else 0.0,
        fees_paid=fees_paid,
        trade_count=trades,
        brier=_brier(markets, tickers, out.forecast_p[: values[13]], out.forecast_code),
    )
    picks = _picks(n_curve, max_points)
    kept_times = _datetimes(times[picks])
    kept_equity = equity[picks].tolist()
    if config.strategy in COMPILED_WITH_TRADES:
        # The trades the run replayed (as the engine fingerprints them).
        start = config.start_time or datetime.min.replace(tzinfo=UTC)
        end = config.end_time or datetime.max.replace(tzinfo=UTC)
        in_markets = frozenset(config.tickers)
        for trade in prepared.trades:
            if trade.ticker in in_markets and start <= trade.create_time < end:
                fingerprinter.add_event(trade)
    fingerprinter.add_terms(config.tickers, markets, fees, config.fee_schedule_version)
    data_fingerprint = fingerprinter.result()
    if data_fingerprint.row_count != processed:
        raise ValueError(
            f"{data_fingerprint.row_count} rows were fingerprinted but {processed} replayed"
        )
    return BacktestResult(
        config=config,
        metrics=metrics,
        executions=executions,
        equity_curve=[
            EquityPointRecord(t, e) for t, e in zip(kept_times, kept_equity, strict=True)
        ],
        fingerprint=data_fingerprint,
        rejected_orders=rejected,
        maker_fills=values[_MAKER_FILLS],
        replayed_from=first_time,
        replayed_to=last_time,
    )


def _metrics(
    config: EngineConfig,
    final_equity: int,
    closes: np.ndarray,
    times: np.ndarray,
    equity: np.ndarray,
    trips: np.ndarray,
    *,
    exposure: float,
    fees_paid: int,
    trade_count: int,
    brier: float | None,
) -> BacktestMetrics:
    """The engine's metrics (``engine._metrics``) from the kernel's arrays."""
    initial = config.initial_cash
    total_pnl = final_equity - initial
    returns = daily_returns(initial, closes.tolist())
    # Drawdowns are measured from the initial cash too (a first point at the first time).
    if times.size:
        depth, fraction, longest = _drawdown(times, equity, initial)
        drawdown = Drawdown(int(depth), float(fraction), timedelta(microseconds=int(longest)))
    else:
        drawdown = Drawdown(0, 0.0, timedelta(0))
    win_rate, profit_factor, expectancy = round_trip_stats(trips.tolist())
    return BacktestMetrics(
        total_pnl=total_pnl,
        total_return=total_pnl / initial,
        sharpe_ratio=sharpe_ratio(returns),
        sortino_ratio=sortino_ratio(returns),
        max_drawdown=drawdown.depth,
        max_drawdown_fraction=drawdown.fraction,
        max_drawdown_duration=drawdown.duration,
        win_rate=win_rate,
        profit_factor=profit_factor,
        expectancy=expectancy,
        trade_count=trade_count,
        fees_paid=fees_paid,
        exposure=exposure,
        brier_score=brier,
    )


def _brier(
    markets: Mapping[str, MarketRecord],
    tickers: Sequence[str],
    probabilities: np.ndarray,
    codes: np.ndarray,
) -> float | None:
    """The engine's Brier score of the kernel's forecasts: those of markets settled YES or NO."""
    outcomes = {MarketResult.YES: 1, MarketResult.NO: 0}
    graded = []
    for probability, code in zip(probabilities.tolist(), codes.tolist(), strict=False):
        market = markets.get(tickers[code])
        if market is not None and market.result in outcomes:
            graded.append((probability, outcomes[market.result]))
    return brier_score(graded)


def run_fast(
    config: EngineConfig,
    markets: Mapping[str, MarketRecord],
    columns: SnapshotColumns,
    fingerprinter: Fingerprinter,
    *,
    fees: Mapping[str, MarketFees] | None = None,
    registry: StrategyRegistry = default_registry,
    max_equity_points: int = DEFAULT_MAX_EQUITY_POINTS,
    trades: Sequence[TradeRecord] = (),
) -> BacktestResult | None:
    """``run_backtest``'s result for ``config`` over ``columns`` (whose rows ``fingerprinter``
    already hashed, as the service's worker does) and, for a strategy that reads them
    (``COMPILED_WITH_TRADES``), the public ``trades`` in time order (each replayed before the
    first snapshot at or after its time, and fingerprinted here, as the engine does); None when
    the compiled path does not apply (then run the engine). Raises StrategyError where the engine
    would."""
    results = sweep_fast([config], markets, columns, [fingerprinter], fees=fees, registry=registry,
                         max_equity_points=max_equity_points, trades=trades)  # fmt: skip
    return results[0]


def sweep_fast(
    configs: Sequence[EngineConfig],
    markets: Mapping[str, MarketRecord],
    columns: SnapshotColumns,
    fingerprinters: Sequence[Fingerprinter],
    *,
    fees: Mapping[str, MarketFees] | None = None,
    registry: StrategyRegistry = default_registry,
    max_equity_points: int = DEFAULT_MAX_EQUITY_POINTS,
    trades: Sequence[TradeRecord] = (),
) -> list[BacktestResult | None]:
    """One result per configuration over the same columns (read and prepared once), None for a
    configuration the compiled path does not run. Each configuration gets its own fingerprinter
    (copies of one that hashed the rows); ``trades`` as for ``run_fast``."""
    fees = fees or {}
    prepared: _Prepared | None = None
    results: list[BacktestResult | None] = []
    for config, fingerprinter in zip(configs, fingerprinters, strict=True):
        config = validate_config(config, registry)
        if not fast_path_applies(config, fees) or tuple(config.tickers) != columns.tickers:
            results.append(None)
            continue
        if prepared is None:
            prepared = _prepare(config, markets, fees, columns, trades)
        # Settlements depend on the window's end: prepare again when it differs.
        points = _prepare(config, markets, fees, columns, trades) if config.end_time else prepared
        results.append(_result(config, points, markets, fees, fingerprinter, max_equity_points))
    return results


def warm_up() -> None:
    """Compiles the kernels (or loads them from numba's disk cache) by running each on two
    rows."""
    rows = [
        SnapshotRecord("W", _EPOCH + timedelta(seconds=k), _EPOCH, DataSource.BACKFILL,
                       yes_bid=3_900, yes_ask=4_000, status=MarketStatus.OPEN, snapshot_id=k + 1)
        for k in range(2)
    ]  # fmt: skip
    trades = [TradeRecord("W", "W", 3_800, 6_200, 100, Side.NO, _EPOCH + timedelta(seconds=1))]
    for strategy in ("threshold", "spread_maker"):
        fingerprinter = Fingerprinter()
        for row in rows:
            fingerprinter.add(row)
        columns = columns_from_records(rows, ("W",))
        run_fast(EngineConfig(strategy, ("W",)), {}, columns, fingerprinter, trades=trades)
