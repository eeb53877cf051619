"""Parameter sweeps: expand a grid into configurations, rank finished runs by a metric, and
walk-forward analysis (choose on in-sample windows, test on the out-of-sample ones after them)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta

from kfeed_server.backtest.config import validate_config
from kfeed_server.backtest.engine import BacktestResult, MarketEvent, run_backtest
from kfeed_server.backtest.fees import MarketFees
from kfeed_server.backtest.params import ConfigError
from kfeed_server.backtest.strategy import StrategyRegistry, default_registry
from kfeed_server.records import MarketRecord
from kfeed_server.records.backtest import (
    BacktestMetrics,
    EngineConfig,
    ParamValue,
    WalkForwardFold,
)

METRIC_ALIASES = {
    "sharpe": "sharpe_ratio",
    "sortino": "sortino_ratio",
    "return": "total_return",
    "pnl": "total_pnl",
}
"""Short names accepted by ``rank`` besides the ``BacktestMetrics`` field names."""
LOWER_IS_BETTER = frozenset(
    {"max_drawdown", "max_drawdown_fraction", "max_drawdown_duration", "fees_paid", "brier_score"}
)
"""Metrics where a smaller value ranks first; every other metric ranks higher first."""
_METRIC_NAMES = frozenset(f.name for f in fields(BacktestMetrics))
_MICROSECOND = timedelta(microseconds=1)


def sweep_grid(
    base: EngineConfig,
    grid: Mapping[str, Sequence[ParamValue]],
    registry: StrategyRegistry = default_registry,
) -> list[EngineConfig]:
    """One validated configuration per grid point: ``base`` with the point's parameter values
    over its own. Points are the Cartesian product with parameter names in sorted order and values
    in the order given, so the expansion is deterministic. An empty grid gives ``[base]``
    (validated). ConfigError names ``sweep.grid.<name>`` for a bad grid entry."""
    names = sorted(grid)
    for name in names:
        if not grid[name]:
            raise ConfigError(f"sweep.grid.{name}", "needs at least one value")
    configs = []
    for values in itertools.product(*(grid[name] for name in names)):
        point = dict(zip(names, values, strict=True))
        try:
            configs.append(
                validate_config(replace(base, parameters={**base.parameters, **point}), registry)
            )
        except ConfigError as error:
            prefix = "parameters."
            swept = error.field.removeprefix(prefix)
            if error.field.startswith(prefix) and swept in point:
                raise ConfigError(f"sweep.grid.{swept}", error.message) from error
            raise
    return configs


def _metric_key(metrics: BacktestMetrics, name: str) -> float:
    value = getattr(metrics, name)
    if value is None:  # a brier_score without forecasts ranks last
        return float("inf")
    number = value.total_seconds() if isinstance(value, timedelta) else float(value)
    return number if name in LOWER_IS_BETTER else -number


def rank(results: Sequence[BacktestResult | BacktestMetrics], metric_name: str) -> list[int]:
    """Indices of ``results`` best first by ``metric_name`` (a ``BacktestMetrics`` field or an
    alias such as "sharpe"); see LOWER_IS_BETTER. Ties keep the input order. ConfigError on
    ``sweep.rank_by`` for an unknown metric."""
    name = METRIC_ALIASES.get(metric_name, metric_name)
    if name not in _METRIC_NAMES:
        known = ", ".join(sorted(_METRIC_NAMES | METRIC_ALIASES.keys()))
        raise ConfigError("sweep.rank_by", f"unknown metric {metric_name!r} (known: {known})")
    metrics = [r.metrics if isinstance(r, BacktestResult) else r for r in results]
    return sorted(range(len(metrics)), key=lambda i: _metric_key(metrics[i], name))


# --- walk-forward ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WalkForwardResult:
    """A fold's best in-sample run (by the sweep's metric) and that configuration's run on the
    out-of-sample window."""

    fold: WalkForwardFold
    in_sample: BacktestResult
    out_of_sample: BacktestResult


def walk_forward_splits(
    start: datetime, end: datetime, folds: int, in_sample_fraction: float
) -> list[WalkForwardFold]:
    """``folds`` consecutive, equal segments of [start, end), each split at
    ``in_sample_fraction`` of its length (to the microsecond, rounded down) into in-sample and
    out-of-sample windows. ConfigError on ``sweep.walk_forward.*`` for bad values."""
    if folds < 1:
        raise ConfigError("sweep.walk_forward.folds", "must be at least 1")
    if not 0.0 < in_sample_fraction < 1.0:
        raise ConfigError("sweep.walk_forward.in_sample_fraction", "must be between 0 and 1")
    if end <= start:
        raise ConfigError("end_time", "must be after start_time")
    span_us = (end - start) // _MICROSECOND
    splits = []
    for k in range(folds):
        first = start + _MICROSECOND * (span_us * k // folds)
        last = start + _MICROSECOND * (span_us * (k + 1) // folds)
        length_us = (last - first) // _MICROSECOND
        middle = first + _MICROSECOND * int(length_us * in_sample_fraction)
        splits.append(WalkForwardFold(first, middle, last))
    return splits


def walk_forward(
    base: EngineConfig,
    grid: Mapping[str, Sequence[ParamValue]],
    rank_by: str,
    markets: Mapping[str, MarketRecord],
    events: Sequence[MarketEvent],
    *,
    folds: int,
    in_sample_fraction: float,
    fees: Mapping[str, MarketFees] | None = None,
    registry: StrategyRegistry = default_registry,
) -> list[WalkForwardResult]:
    """Walk-forward analysis over ``base``'s window (which must be closed): per fold, every grid
    point runs in-sample, the best by ``rank_by`` runs out-of-sample. ``events`` may span the
    whole window: each run replays its own window only."""
    if base.start_time is None or base.end_time is None:
        raise ConfigError("end_time", "walk-forward needs a closed window")
    rank([], rank_by)  # ConfigError on sweep.rank_by for an unknown metric
    results = []
    for fold in walk_forward_splits(base.start_time, base.end_time, folds, in_sample_fraction):
        in_sample = replace(
            base, start_time=fold.in_sample_start, end_time=fold.out_of_sample_start
        )
        runs = [
            run_backtest(config, markets, events, fees=fees, registry=registry)
            for config in sweep_grid(in_sample, grid, registry)
        ]
        best = runs[rank(runs, rank_by)[0]]
        out_of_sample = replace(best.config, start_time=fold.out_of_sample_start, end_time=fold.end)
        tested = run_backtest(out_of_sample, markets, events, fees=fees, registry=registry)
        results.append(WalkForwardResult(fold, best, tested))
    return results
