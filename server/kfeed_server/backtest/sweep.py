"""Parameter sweeps: expand a grid into configurations, rank finished runs by a metric."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import timedelta

from kfeed_server.backtest.config import EngineConfig, validate_config
from kfeed_server.backtest.engine import BacktestResult
from kfeed_server.backtest.metrics import BacktestMetrics
from kfeed_server.backtest.params import ConfigError, ParamValue
from kfeed_server.backtest.strategy import StrategyRegistry, default_registry

DEFAULT_RANK_BY = "total_pnl"
"""What a sweep ranks by when the request names no metric."""


@dataclass(frozen=True, slots=True)
class SweepSpec:
    """A parameter grid (one child run per point) and the metric ranking the children."""

    grid: Mapping[str, Sequence[ParamValue]]
    rank_by: str = DEFAULT_RANK_BY


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
