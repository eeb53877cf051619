"""Each metric of a multi-day run against an independent calculation from the run's outputs."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime, timedelta

import numpy as np
import pytest

from kfeed_server.backtest import BacktestResult, EngineConfig, Order, run_backtest
from kfeed_server.backtest.metrics import downsample, max_drawdown
from kfeed_server.records import MarketResult, OrderAction, Side
from tests.support.backtest import T0, quote, scripted_registry, settled

DAY = 24 * 60
BUY, SELL = OrderAction.BUY, OrderAction.SELL
INITIAL = 10_000_000


def _multi_day_run() -> BacktestResult:
    rows = [  # (ticker, minutes, yes_bid, yes_ask, orders)
        ("A", 0, 4_000, 4_100, [Order("A", Side.YES, BUY, 1_000)]),
        ("A", 360, 4_500, 4_600, []),
        ("A", DAY, 3_500, 3_600, []),
        ("B", DAY + 60, 8_400, 8_500, [Order("B", Side.YES, BUY, 100, 0.85)]),
        ("A", 2 * DAY, 5_000, 5_100, [Order("A", Side.YES, SELL, 1_000)]),
        ("A", 3 * DAY + 60, 4_000, 4_200, [Order("A", Side.YES, BUY, 500)]),
        ("A", 4 * DAY, 3_000, 3_100, [Order("A", Side.YES, SELL, 500)]),
        ("A", 5 * DAY, 2_000, 3_100, [Order("A", Side.NO, BUY, 200, 0.3)]),
        ("A", 6 * DAY, 2_500, 2_700, []),
    ]
    snapshots = [quote(t, m, i + 1, bid, ask) for i, (t, m, bid, ask, _) in enumerate(rows)]
    script = {i + 1: orders for i, (*_, orders) in enumerate(rows)}
    markets = {
        "B": settled("B", MarketResult.YES, 3 * DAY),
        "A": settled("A", MarketResult.NO, 99 * DAY),
    }
    # A settles after the window: its NO position is marked, but its result still grades the
    # stated probability.
    config = EngineConfig("scripted", ("A", "B"), end_time=T0 + timedelta(days=7))
    return run_backtest(config, markets, snapshots, registry=scripted_registry(script))


@pytest.fixture(scope="module")
def run() -> BacktestResult:
    return _multi_day_run()


def _daily_closes(times: list[datetime], equity: list[int]) -> list[int]:
    """Last equity of each UTC calendar day from the first point's day to the last's."""
    first_day, last_day = times[0].date(), times[-1].date()
    closes = []
    day = first_day
    while day <= last_day:
        same_or_before = [e for t, e in zip(times, equity, strict=True) if t.date() <= day]
        closes.append(same_or_before[-1])
        day += timedelta(days=1)
    return closes


def test_sharpe_and_sortino_match_numpy(run: BacktestResult) -> None:
    times = [p.time for p in run.equity_curve]
    closes = np.array(_daily_closes(times, [p.equity for p in run.equity_curve]), dtype=float)
    returns = np.diff(np.concatenate(([INITIAL], closes))) / np.concatenate(
        ([INITIAL], closes[:-1])
    )
    assert returns.size == 7  # days 0..6
    expected_sharpe = returns.mean() / returns.std(ddof=1) * math.sqrt(365)
    downside = np.sqrt(np.sum(np.clip(returns, None, 0.0) ** 2) / returns.size)
    expected_sortino = returns.mean() / downside * math.sqrt(365)
    assert run.metrics.sharpe_ratio == pytest.approx(expected_sharpe, rel=1e-12)
    assert run.metrics.sortino_ratio == pytest.approx(expected_sortino, rel=1e-12)
    assert run.metrics.sharpe_ratio != 0.0


def test_drawdown_matches_a_plain_loop(run: BacktestResult) -> None:
    points = [(run.equity_curve[0].time, INITIAL)] + [(p.time, p.equity) for p in run.equity_curve]
    peak, peak_time = points[0][1], points[0][0]
    depth, fraction, longest = 0, 0.0, timedelta(0)
    for when, equity in points:
        if equity >= peak:
            longest = max(longest, when - peak_time)
            peak, peak_time = equity, when
        depth = max(depth, peak - equity)
        fraction = max(fraction, (peak - equity) / peak)
    # Still under water at the end: the stretch runs to the last point.
    if points[-1][1] < peak:
        longest = max(longest, points[-1][0] - peak_time)
    assert run.metrics.max_drawdown == depth > 0
    assert run.metrics.max_drawdown_fraction == pytest.approx(fraction, rel=1e-12)
    assert run.metrics.max_drawdown_duration == longest > timedelta(0)


def test_round_trip_metrics_match_the_executions(run: BacktestResult) -> None:
    trips: list[int] = []
    open_pnl: dict[tuple[str, Side], int] = defaultdict(int)
    for e in run.executions:
        if e.action is OrderAction.MARK:
            continue
        open_pnl[e.ticker, e.side] += e.realized_pnl
        if e.position_after == 0:
            trips.append(open_pnl.pop((e.ticker, e.side)))
    assert len(trips) == 3  # A bought and sold twice, B settled
    wins = [p for p in trips if p > 0]
    losses = [-p for p in trips if p < 0]
    assert run.metrics.win_rate == len(wins) / len(trips)
    assert run.metrics.profit_factor == pytest.approx(sum(wins) / sum(losses))
    assert run.metrics.expectancy == round(sum(trips) / len(trips))
    assert (
        run.metrics.trade_count == sum(e.action in (BUY, SELL) for e in run.executions) == 6
    )  # 4 buys, 2 sells
    assert run.metrics.fees_paid == sum(e.fee for e in run.executions)
    assert run.metrics.total_pnl == sum(e.realized_pnl for e in run.executions)
    assert run.metrics.total_pnl == run.equity_curve[-1].equity - INITIAL
    assert run.metrics.total_return == run.metrics.total_pnl / INITIAL


def test_exposure_matches_the_open_intervals(run: BacktestResult) -> None:
    held: dict[tuple[str, Side], int] = {}
    exposed = timedelta(0)
    since: datetime | None = None
    for e in sorted(run.executions, key=lambda x: x.sequence):
        if e.action is OrderAction.MARK:
            continue
        held[e.ticker, e.side] = e.position_after
        open_now = any(held.values())
        if open_now and since is None:
            since = e.time
        elif not open_now and since is not None:
            exposed += e.time - since
            since = None
    span_end = run.equity_curve[-1].time
    if since is not None:
        exposed += span_end - since
    span = span_end - T0
    assert run.metrics.exposure == pytest.approx(exposed / span, rel=1e-12)
    assert 0.0 < run.metrics.exposure < 1.0


def test_brier_score_uses_settled_markets_only(run: BacktestResult) -> None:
    # B: stated 0.85, settled YES → (0.85 − 1)²; A: stated 0.30, its record says NO → 0.3².
    assert run.metrics.brier_score == pytest.approx(((0.85 - 1) ** 2 + 0.3**2) / 2)


def test_no_forecasts_means_no_brier_score() -> None:
    result = run_backtest(EngineConfig("threshold", ("A",)), {}, [quote("A", 0, 1, 3_000, 3_100)])
    assert result.metrics.brier_score is None


def test_drawdown_duration_counts_until_recovery() -> None:
    times = [T0 + timedelta(hours=h) for h in range(6)]
    # Peak 100 at hour 1, under water at 2 and 3, back at 100 at hour 4: 3 hours.
    drawdown = max_drawdown(times, [90, 100, 80, 95, 100, 99])
    assert drawdown.depth == 20
    assert drawdown.fraction == pytest.approx(0.2)
    assert drawdown.duration == timedelta(hours=3)


def test_downsample_keeps_the_last_point_of_each_chunk() -> None:
    times = [T0 + timedelta(seconds=s) for s in range(10)]
    kept_times, kept = downsample(times, list(range(10)), 4)
    # Chunks of 10/4: [0..2], [3..4], [5..7], [8..9] → last points 2, 4, 7, 9.
    assert kept == [2, 4, 7, 9]
    assert kept_times[-1] == times[-1]


def test_equity_curve_is_bounded() -> None:
    snapshots = [quote("A", k, k + 1, 4_500, 4_600) for k in range(50)]
    result = run_backtest(EngineConfig("threshold", ("A",)), {}, snapshots, max_equity_points=10)
    assert len(result.equity_curve) == 10
    assert result.equity_curve[-1].time == snapshots[-1].exchange_time
