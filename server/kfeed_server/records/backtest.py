"""The backtest's stored values: configuration, sweep, metrics, data quality and the run itself.

Plain data, no engine logic: persistence stores these (the repository turns them into rows and
JSON columns and back), the domain (``kfeed_server.backtest``) computes with them and the
transport maps them onto the proto. Money is in 1/10,000 USD, counts in 1/100 contract; enum
values equal the matching proto numbers.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

from kfeed_server.records import BacktestState

ParamValue: TypeAlias = int | float | bool | str
"""One strategy parameter value: ``int`` for INTEGER and DOLLARS (DOLLARS in 1/10,000 USD),
``float`` for NUMBER, ``bool`` for BOOLEAN and ``str`` for STRING."""

# --- fees ------------------------------------------------------------------------------------

KALSHI_TAKER_FEE_RATE = 700
"""Kalshi's taker fee coefficient 0.07, in 1/10,000."""
KALSHI_MAKER_FEE_RATE = 175
"""Kalshi's maker fee coefficient 0.0175, in 1/10,000 (series with maker fees only)."""
FEE_SCHEDULE_VERSION = "kalshi-2025.1"
"""The version of the fee rules in ``kfeed_server.backtest.fees``; a run stores it, and it
changes with the rules."""


class FeeRounding(enum.IntEnum):
    """How each fill's fee is rounded up; values equal the proto ``FeeRounding`` numbers.
    UNSPECIFIED means CENT."""

    UNSPECIFIED = 0
    CENT = 1
    TEN_THOUSANDTH = 2

    @property
    def unit(self) -> int:
        """The rounding unit in 1/10,000 USD."""
        return 1 if self is FeeRounding.TEN_THOUSANDTH else 100


# --- orders and data quality -----------------------------------------------------------------


class FillModel(enum.IntEnum):
    """How taker orders meet the book; values equal the proto ``FillModel`` numbers.
    UNSPECIFIED means TOUCH."""

    UNSPECIFIED = 0
    # The best price of the latest snapshot, for the whole count (capped by the displayed size
    # only with ``cap_by_displayed_size``).
    TOUCH = 1
    # Walk the recorded book level by level: partial fills, the average price, never more than
    # was displayed.
    DEPTH = 2


class GapPolicy(enum.IntEnum):
    """What a run does about gaps; values equal the proto ``GapPolicy`` numbers. UNSPECIFIED
    means FLAG."""

    UNSPECIFIED = 0
    # Run, and report the gaps.
    FLAG = 1
    # Fail before running when an unrecovered gap overlaps the window.
    REFUSE = 2


@dataclass(frozen=True, slots=True)
class MarketCoverage:
    """One market's gaps in the window."""

    ticker: str
    coverage: float
    gap_count: int
    gap_time: timedelta


@dataclass(frozen=True, slots=True)
class DataQuality:
    """The gaps overlapping a run's markets and window (``kfeed_server.backtest.quality``)."""

    gap_count: int
    gap_time: timedelta
    unrecovered_gap_count: int
    markets: tuple[MarketCoverage, ...]


# --- configuration, sweep and metrics --------------------------------------------------------

DEFAULT_INITIAL_CASH = 10_000_000
"""$1,000 in 1/10,000 USD."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything that determines a backtest's result (with the data): the domain mirror of the
    proto ``BacktestConfig``.

    Money in 1/10,000 USD, counts in 1/100 contract. Snapshots with exchange time in
    ``[start_time, end_time)`` are replayed; None leaves that side open. Unlike the proto, zero is
    not "use the default" here: the transport maps unset proto fields onto these defaults.
    """

    strategy: str
    tickers: tuple[str, ...]
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    start_time: datetime | None = None
    end_time: datetime | None = None
    initial_cash: int = DEFAULT_INITIAL_CASH
    taker_fee_rate_ten_thousandths: int = KALSHI_TAKER_FEE_RATE
    fee_rounding: FeeRounding = FeeRounding.CENT
    # Extra price per contract on every fill, against the strategy.
    slippage: int = 0
    # Largest position per market (YES plus NO), in 1/100 contract; 0 means unlimited.
    max_position: int = 0
    cap_by_displayed_size: bool = False
    fill_model: FillModel = FillModel.TOUCH
    # Kalshi's maker coefficient (1/10,000), charged only in series with maker fees.
    maker_fee_rate_ten_thousandths: int = KALSHI_MAKER_FEE_RATE
    # Delay between a strategy's decision and its arrival at the exchange.
    latency: timedelta = timedelta(0)
    # Share (1/10,000) of a level's cancellations taken as being ahead of a resting order: 0 is
    # the risk-averse queue (cancellations are all behind you), 10,000 the optimistic one.
    queue_cancel_share_ten_thousandths: int = 0
    # The fee rules' version (``FEE_SCHEDULE_VERSION``); validation sets it.
    fee_schedule_version: str = FEE_SCHEDULE_VERSION
    # What the service does about recorded feed gaps in the window (the engine ignores it).
    gap_policy: GapPolicy = GapPolicy.FLAG


DEFAULT_RANK_BY = "total_pnl"
"""What a sweep ranks by when the request names no metric."""


@dataclass(frozen=True, slots=True)
class WalkForwardSpec:
    """Walk-forward splits of a sweep's window: ``folds`` equal folds, each ``in_sample_fraction``
    in-sample, the rest out-of-sample."""

    folds: int
    in_sample_fraction: float


@dataclass(frozen=True, slots=True)
class SweepSpec:
    """A parameter grid (one child run per point) and the metric ranking the children; with
    ``walk_forward``, the grid runs per fold in-sample and the best point out-of-sample."""

    grid: Mapping[str, Sequence[ParamValue]]
    rank_by: str = DEFAULT_RANK_BY
    walk_forward: WalkForwardSpec | None = None


@dataclass(frozen=True, slots=True)
class WalkForwardFold:
    """One fold: parameters are chosen on [in_sample_start, out_of_sample_start) and tested on
    [out_of_sample_start, end)."""

    in_sample_start: datetime
    out_of_sample_start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class WalkForwardOutcome:
    """A walk-forward sweep's fold as stored with its parent: the windows, the best in-sample
    child and the child that ran its configuration out of sample ("" when none ran)."""

    fold_index: int
    fold: WalkForwardFold
    best_in_sample_id: str
    out_of_sample_id: str


@dataclass(frozen=True, slots=True)
class BacktestMetrics:
    """The proto ``BacktestMetrics``: money in 1/10,000 USD, ratios as floats
    (``kfeed_server.backtest.metrics`` computes them)."""

    total_pnl: int
    total_return: float
    sharpe_ratio: float
    sortino_ratio: float
    max_drawdown: int
    max_drawdown_fraction: float
    max_drawdown_duration: timedelta
    win_rate: float
    profit_factor: float
    expectancy: int
    trade_count: int
    fees_paid: int
    exposure: float
    brier_score: float | None


# --- the stored run --------------------------------------------------------------------------


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
    # The definition content_hash follows (fingerprint.FINGERPRINT_VERSIONS; 0: not yet
    # fingerprinted): hashes of different versions are not comparable.
    fingerprint_version: int = 0
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
