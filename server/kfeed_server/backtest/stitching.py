"""A walk-forward sweep's combined out-of-sample metrics: its folds' out-of-sample runs stitched
in time order into one run, measured as a single run is (docs/BACKTESTING.md, "Walk-forward").

Each out-of-sample run starts from the same initial cash; stitched, run k's equity is shifted by
the PnL of the runs before it, so the stitched curve is continuous: the initial cash, then every
run's curve in turn. From it and the runs' executions come the same measures as ``engine._metrics``
computes for one run: PnL, return, fees and trade count (sums), drawdown over the stitched curve,
Sharpe and Sortino over its UTC day closes, the closed round trips' win rate, profit factor and
expectancy, and exposure (time with a position open over the stitched span). A run's stored curve
holds every point up to ``max_equity_points`` (10,000); above that it is downsampled, and so is
the stitched drawdown's input. Forecasts are not stored, so the Brier score stays on the folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from kfeed_server.backtest.metrics import (
    daily_returns,
    max_drawdown,
    round_trip_stats,
    sharpe_ratio,
    sortino_ratio,
)
from kfeed_server.records import EquityPointRecord, ExecutionRecord, OrderAction
from kfeed_server.records.backtest import BacktestMetrics

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class RunSegment:
    """One finished run to stitch: its metrics, stored equity curve and executions."""

    metrics: BacktestMetrics
    equity_curve: Sequence[EquityPointRecord]
    executions: Sequence[ExecutionRecord]


def _day(moment: datetime) -> int:
    return (moment - _EPOCH) // _DAY


def _day_closes(times: Sequence[datetime], equity: Sequence[int]) -> list[int]:
    """The engine's day closes from a curve: at each UTC midnight passed between two points, the
    equity of the earlier one (once per midnight), then the final equity."""
    closes: list[int] = []
    for k in range(1, len(times)):
        closes += [equity[k - 1]] * (_day(times[k]) - _day(times[k - 1]))
    return [*closes, equity[-1]] if equity else []


def _round_trips(executions: Sequence[ExecutionRecord]) -> list[int]:
    """The PnL of each closed round trip: a market's position back to 0 or to the other side
    (netting) closes the trip, with the realised PnL of the executions since it opened."""
    net: dict[str, int] = {}
    running: dict[str, int] = {}
    trips: list[int] = []
    for execution in executions:
        if execution.action is OrderAction.MARK:
            continue
        ticker, after = execution.ticker, execution.position_after
        before = net.get(ticker, 0)
        running[ticker] = running.get(ticker, 0) + execution.realized_pnl
        if before and (after == 0 or (after > 0) != (before > 0)):
            trips.append(running.pop(ticker))
        net[ticker] = after
    return trips


def _exposed(executions: Sequence[ExecutionRecord], end: datetime) -> timedelta:
    """Time with at least one position open, from the executions (a run ends at ``end``)."""
    open_markets: set[str] = set()
    since: datetime | None = None
    exposed = timedelta(0)
    for execution in executions:
        if execution.action is OrderAction.MARK:
            continue
        had = bool(open_markets)
        if execution.position_after:
            open_markets.add(execution.ticker)
        else:
            open_markets.discard(execution.ticker)
        if had and not open_markets and since is not None:
            exposed += execution.time - since
            since = None
        elif not had and open_markets:
            since = execution.time
    if since is not None:
        exposed += end - since
    return exposed


def stitched_metrics(initial_cash: int, segments: Sequence[RunSegment]) -> BacktestMetrics:
    """The metrics of ``segments`` (runs in time order, each from ``initial_cash``) stitched
    into one run (see the module docstring)."""
    times: list[datetime] = []
    equity: list[int] = []
    trips: list[int] = []
    exposed = timedelta(0)
    offset = 0
    for segment in segments:
        curve = segment.equity_curve
        times += [point.time for point in curve]
        equity += [point.equity + offset for point in curve]
        trips += _round_trips(segment.executions)
        if curve:
            exposed += _exposed(segment.executions, curve[-1].time)
        offset += segment.metrics.total_pnl
    total_pnl = offset
    returns = daily_returns(initial_cash, _day_closes(times, equity))
    # Drawdowns are measured from the initial cash too, as a single run's.
    drawdown = max_drawdown([times[0], *times], [initial_cash, *equity]) if times else None
    span = times[-1] - times[0] if times else timedelta(0)
    win_rate, profit_factor, expectancy = round_trip_stats(trips)
    return BacktestMetrics(
        total_pnl=total_pnl,
        total_return=total_pnl / initial_cash,
        sharpe_ratio=sharpe_ratio(returns),
        sortino_ratio=sortino_ratio(returns),
        max_drawdown=drawdown.depth if drawdown else 0,
        max_drawdown_fraction=drawdown.fraction if drawdown else 0.0,
        max_drawdown_duration=drawdown.duration if drawdown else timedelta(0),
        win_rate=win_rate,
        profit_factor=profit_factor,
        expectancy=expectancy,
        trade_count=sum(s.metrics.trade_count for s in segments),
        fees_paid=sum(s.metrics.fees_paid for s in segments),
        exposure=exposed / span if span > timedelta(0) else 0.0,
        brier_score=None,
    )
