"""Sweeps as runs: a parent backtest whose children are the grid's points.

The parent's progress sums its children's; when all are done it is SUCCEEDED with the children
ranked best first (the best child's metrics and fingerprint as its own), FAILED when any child
failed, CANCELLED when none succeeded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from kfeed_server.backtest.params import ConfigError
from kfeed_server.backtest.sweep import rank, sweep_grid, walk_forward_splits
from kfeed_server.backtest.tracking import replaced
from kfeed_server.records import BacktestState
from kfeed_server.records.backtest import BacktestRecord, EngineConfig, SweepSpec, WalkForwardFold


def sweep_points(config: EngineConfig, sweep: SweepSpec, max_points: int) -> list[EngineConfig]:
    """The validated configuration of each grid point; ConfigError on ``sweep.grid`` (empty or
    more than ``max_points`` points), ``sweep.grid.<name>`` or ``sweep.rank_by``."""
    if not sweep.grid:
        raise ConfigError("sweep.grid", "needs at least one parameter")
    rank([], sweep.rank_by)  # ConfigError on sweep.rank_by for an unknown metric
    points = math.prod(len(values) for values in sweep.grid.values())
    if points > max_points:
        raise ConfigError("sweep.grid", f"{points} points; at most {max_points}")
    return sweep_grid(config, sweep.grid)


def walk_forward_points(
    config: EngineConfig, sweep: SweepSpec, max_points: int
) -> list[tuple[WalkForwardFold, list[EngineConfig]]]:
    """Each fold of a walk-forward sweep with its grid points' in-sample configurations.
    ConfigError as ``sweep_points``, on ``end_time`` for an open window, on
    ``sweep.walk_forward.*`` for bad splits, and when the runs (each fold's points plus its
    out-of-sample run) exceed ``max_points``."""
    walk_forward = sweep.walk_forward
    assert walk_forward is not None
    if config.start_time is None or config.end_time is None:
        raise ConfigError("end_time", "a walk-forward sweep needs start_time and end_time")
    if walk_forward.folds > max_points:
        raise ConfigError("sweep.walk_forward.folds", f"at most {max_points}")
    points = sweep_points(config, sweep, max_points)
    folds = walk_forward_splits(
        config.start_time, config.end_time, walk_forward.folds, walk_forward.in_sample_fraction
    )
    runs = len(folds) * (len(points) + 1)
    if runs > max_points:
        raise ConfigError(
            "sweep.walk_forward.folds",
            f"{len(folds)} folds of {len(points)} points and 1 test: {runs} runs; at most "
            f"{max_points}",
        )
    if any(not f.in_sample_start < f.out_of_sample_start < f.end for f in folds):
        raise ConfigError("sweep.walk_forward.in_sample_fraction", "leaves a fold's window empty")
    return [
        (
            fold,
            [
                replace(p, start_time=fold.in_sample_start, end_time=fold.out_of_sample_start)
                for p in points
            ],
        )
        for fold in folds
    ]


def best_run(children: Sequence[BacktestRecord], rank_by: str) -> BacktestRecord | None:
    """The best SUCCEEDED run by ``rank_by`` (None when none succeeded)."""
    succeeded = [r for r in children if r.state is BacktestState.SUCCEEDED and r.metrics]
    if not succeeded:
        return None
    return succeeded[rank([r.metrics for r in succeeded if r.metrics], rank_by)[0]]


def sweep_progress(parent: BacktestRecord, children: Sequence[BacktestRecord]) -> BacktestRecord:
    """A sweep's live progress: the mean fraction done, summed snapshot counts, the best interim
    PnL; RUNNING once any child left PENDING."""
    started = [c for c in children if c.state is not BacktestState.PENDING]
    values: dict[str, Any] = {
        "fraction_done": sum(c.fraction_done for c in children) / len(children),
        "snapshots_processed": sum(c.snapshots_processed for c in children),
        "snapshots_total": sum(c.snapshots_total for c in children),
        "interim_pnl": max(c.interim_pnl for c in children),
    }
    if started and parent.state is BacktestState.PENDING:
        values["state"] = BacktestState.RUNNING
        values["run_start_time"] = min(c.run_start_time or datetime.now(UTC) for c in started)
    return replaced(parent, values)


def sweep_outcome(children: Sequence[BacktestRecord], rank_by: str) -> dict[str, Any]:
    """The finished sweep's terminal fields from its children's final records."""
    succeeded = [r for r in children if r.state is BacktestState.SUCCEEDED]
    failed = [r for r in children if r.state is BacktestState.FAILED]
    if failed:
        return {
            "state": BacktestState.FAILED,
            "error_message": (
                f"{len(failed)} of {len(children)} runs failed; first "
                f"{failed[0].backtest_id}: {failed[0].error_message}"
            ),
        }
    if not succeeded:
        return {"state": BacktestState.CANCELLED}
    metrics = [r.metrics for r in succeeded]
    assert all(m is not None for m in metrics)  # a SUCCEEDED run stores its metrics
    order = rank([m for m in metrics if m is not None], rank_by)
    best = succeeded[order[0]]
    return {
        "state": BacktestState.SUCCEEDED,
        "ranked_child_ids": tuple(succeeded[i].backtest_id for i in order),
        "metrics": best.metrics,
        "row_count": best.row_count,
        "first_snapshot_id": best.first_snapshot_id,
        "last_snapshot_id": best.last_snapshot_id,
        "content_hash": best.content_hash,
        "event_count": best.event_count,
        "fingerprint_version": best.fingerprint_version,
        "fraction_done": 1.0,
    }
