"""A stored backtest as the domain sees it: typed configuration, sweep and metrics.

The repository turns these into rows (and its JSON columns) and back; nothing above it handles
documents. Money is in 1/10,000 USD.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from kfeed_server.backtest.config import EngineConfig
from kfeed_server.backtest.metrics import BacktestMetrics
from kfeed_server.backtest.quality import DataQuality
from kfeed_server.backtest.sweep import SweepSpec, WalkForwardOutcome
from kfeed_server.records import BacktestState


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class BacktestRecord:
    """A backtest run or a sweep's parent: configuration, state and progress, data fingerprint,
    metrics."""

    backtest_id: str
    # The validated configuration (a sweep's parent: the base of its grid).
    config: EngineConfig
    parent_backtest_id: str | None = None
    state: BacktestState = BacktestState.PENDING
    sweep: SweepSpec | None = None
    fraction_done: float = 0.0
    snapshots_processed: int = 0
    snapshots_total: int = 0
    interim_pnl: int = 0
    metrics: BacktestMetrics | None = None
    # Fingerprint of the data read: shows when a rerun would see different data.
    row_count: int = 0
    first_snapshot_id: int = 0
    last_snapshot_id: int = 0
    content_hash: str = ""
    # Books and trades read besides the snapshot rows.
    event_count: int = 0
    code_version: str = ""
    create_time: datetime = field(default_factory=_now)
    run_start_time: datetime | None = None
    run_end_time: datetime | None = None
    error_message: str = ""
    ranked_child_ids: tuple[str, ...] = ()
    # The recorded feed gaps overlapping the run's markets and window, once it read its data.
    data_quality: DataQuality | None = None
    # The name of the token that created it (only it or an admin may cancel it).
    created_by: str = ""
    # A walk-forward sweep's parent: its folds, once its children are done.
    walk_forward_folds: tuple[WalkForwardOutcome, ...] = ()

    @property
    def strategy(self) -> str:
        """The strategy's name."""
        return self.config.strategy
