"""Backtest metrics, computed from the engine's raw outputs (docs/BACKTESTING.md defines each)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

ANNUALISATION_DAYS = 365
"""Prediction markets trade every calendar day: daily ratios are scaled by sqrt(365)."""


@dataclass(frozen=True, slots=True)
class Drawdown:
    """The deepest fall of equity below its running peak: ``depth`` in 1/10,000 USD, ``fraction``
    of the peak (each the maximum over the curve, so they may come from different falls), and
    ``duration``, the longest time from a peak until equity is back at it (or the curve ends)."""

    depth: int
    fraction: float
    duration: timedelta


def daily_returns(initial_equity: int, day_closes: Sequence[int]) -> np.ndarray:
    """Simple returns of consecutive UTC day closes, the first against ``initial_equity``. A day
    that starts from zero equity has return 0 (nothing left to lose or grow)."""
    import numpy as np  # lazily: the server imports this module, the worker computes

    closes = np.asarray(day_closes, dtype=np.float64)
    previous = np.concatenate(([float(initial_equity)], closes[:-1]))
    safe = np.where(previous == 0.0, 1.0, previous)
    return np.where(previous == 0.0, 0.0, closes / safe - 1.0)


def sharpe_ratio(returns: np.ndarray) -> float:
    """mean / sample standard deviation (ddof 1) × sqrt(365); 0 when undefined (fewer than two
    returns or no variation)."""
    import numpy as np  # lazily: the server imports this module, the worker computes

    if returns.size < 2:
        return 0.0
    spread = float(np.std(returns, ddof=1))
    if spread == 0.0:
        return 0.0
    return float(np.mean(returns)) / spread * math.sqrt(ANNUALISATION_DAYS)


def sortino_ratio(returns: np.ndarray) -> float:
    """mean / downside deviation × sqrt(365), the downside deviation being
    sqrt(mean(min(r, 0)²)) over all periods (target 0); 0 when undefined (fewer than two
    returns or no losing period)."""
    import numpy as np  # lazily: the server imports this module, the worker computes

    if returns.size < 2:
        return 0.0
    downside = math.sqrt(float(np.mean(np.minimum(returns, 0.0) ** 2)))
    if downside == 0.0:
        return 0.0
    return float(np.mean(returns)) / downside * math.sqrt(ANNUALISATION_DAYS)


def _underwater(values: np.ndarray) -> tuple[int, float, np.ndarray, np.ndarray]:
    """(depth, fraction, the first point of each underwater run, the first point back at the
    peak after it) of an equity curve (int64, not empty)."""
    import numpy as np  # lazily: the server imports this module, the worker computes

    peaks = np.maximum.accumulate(values)
    falls = peaks - values
    depth = int(falls.max())
    with np.errstate(divide="ignore", invalid="ignore"):
        fractions = np.where(peaks > 0, falls / np.where(peaks > 0, peaks, 1), 0.0)
    # Underwater stretches: a run of points below the running peak. It starts at the last point
    # at the peak (just before the run) and ends at the first point back at it, or the curve's end.
    underwater = np.concatenate(([False], falls > 0, [False])).astype(np.int8)
    edges = np.diff(underwater)
    run_starts = np.flatnonzero(edges == 1)  # index of the first underwater point
    run_ends = np.flatnonzero(edges == -1)  # index of the first point back at the peak
    return depth, float(fractions.max()), run_starts, run_ends


def max_drawdown(times: Sequence[datetime], equity: Sequence[int]) -> Drawdown:
    """The drawdown of an equity curve (see ``Drawdown``)."""
    import numpy as np  # lazily: the server imports this module, the worker computes

    if not equity:
        return Drawdown(0, 0.0, timedelta(0))
    values = np.asarray(equity, dtype=np.int64)
    depth, fraction, run_starts, run_ends = _underwater(values)
    longest = timedelta(0)
    last = len(values) - 1
    for first_below, recovered in zip(run_starts.tolist(), run_ends.tolist(), strict=True):
        peak_time = times[max(first_below - 1, 0)]
        longest = max(longest, times[min(recovered, last)] - peak_time)
    return Drawdown(depth, fraction, longest)


def round_trip_stats(trip_pnls: Sequence[int]) -> tuple[float, float, int]:
    """(win rate, profit factor, expectancy) of closed round trips' PnL: the fraction with PnL
    > 0; gross profit / gross loss (0 when nothing was lost); and the mean PnL rounded to the
    nearest 1/10,000 USD (halves to even). All 0 without round trips."""
    if not trip_pnls:
        return 0.0, 0.0, 0
    wins = sum(1 for pnl in trip_pnls if pnl > 0)
    gross_profit = sum(pnl for pnl in trip_pnls if pnl > 0)
    gross_loss = -sum(pnl for pnl in trip_pnls if pnl < 0)
    profit_factor = gross_profit / gross_loss if gross_loss else 0.0
    expectancy = round(Fraction(sum(trip_pnls), len(trip_pnls)))
    return wins / len(trip_pnls), profit_factor, expectancy


def brier_score(forecasts: Sequence[tuple[float, int]]) -> float | None:
    """Mean of (probability − outcome)² over (stated YES probability, outcome 0/1) pairs; None
    when there are none."""
    if not forecasts:
        return None
    return math.fsum((p - outcome) ** 2 for p, outcome in forecasts) / len(forecasts)


def downsample(
    times: Sequence[datetime], equity: Sequence[int], max_points: int
) -> tuple[list[datetime], list[int]]:
    """At most ``max_points`` points: the last point of each of ``max_points`` consecutive chunks
    of (nearly) equal count, so the final point is always kept."""
    n = len(times)
    if n <= max_points:
        return list(times), list(equity)
    picks = downsample_picks(n, max_points)
    return [times[i] for i in picks], [equity[i] for i in picks]


def downsample_picks(n: int, max_points: int) -> list[int]:
    """The indices ``downsample`` keeps of ``n`` points (all of them up to ``max_points``)."""
    if n <= max_points:
        return list(range(n))
    return [((k + 1) * n + max_points - 1) // max_points - 1 for k in range(max_points)]
