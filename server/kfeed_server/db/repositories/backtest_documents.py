"""How a backtest's configuration, sweep and metrics are stored: JSON documents.

Only the repository uses this; everything above it sees typed records. Readers accept documents
written before a field existed (the field then takes its default), so stored runs stay readable
as the configuration grows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from datetime import datetime, timedelta
from typing import Any

from kfeed_server.records.backtest import (
    BacktestMetrics,
    DataQuality,
    EngineConfig,
    FeeRounding,
    FillModel,
    GapPolicy,
    MarketCoverage,
    SweepSpec,
    WalkForwardFold,
    WalkForwardOutcome,
    WalkForwardSpec,
)

_CONFIG_DEFAULTS = EngineConfig(strategy="", tickers=())
_MICROSECOND = timedelta(microseconds=1)
LEGACY_FEE_SCHEDULE = "kalshi-taker-only"
"""The fee schedule of runs stored before versions: one taker rate, no series terms."""


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def config_document(config: EngineConfig) -> dict[str, Any]:
    """``config`` as the JSON document stored with a backtest."""
    return {
        "strategy": config.strategy,
        "tickers": list(config.tickers),
        "parameters": dict(config.parameters),
        "start_time": _time(config.start_time),
        "end_time": _time(config.end_time),
        "initial_cash": config.initial_cash,
        "taker_fee_rate_ten_thousandths": config.taker_fee_rate_ten_thousandths,
        "fee_rounding": int(config.fee_rounding),
        "slippage": config.slippage,
        "max_position": config.max_position,
        "cap_by_displayed_size": config.cap_by_displayed_size,
        "fill_model": int(config.fill_model),
        "maker_fee_rate_ten_thousandths": config.maker_fee_rate_ten_thousandths,
        "latency_us": config.latency // _MICROSECOND,
        "queue_cancel_share_ten_thousandths": config.queue_cancel_share_ten_thousandths,
        "fee_schedule_version": config.fee_schedule_version,
        "gap_policy": int(config.gap_policy),
    }


def config_from_document(document: Mapping[str, Any]) -> EngineConfig:
    """The configuration ``config_document`` stored."""

    def value(name: str) -> Any:
        return document.get(name, getattr(_CONFIG_DEFAULTS, name))

    return EngineConfig(
        strategy=document["strategy"],
        tickers=tuple(document["tickers"]),
        parameters=dict(document.get("parameters", {})),
        start_time=_parse_time(document.get("start_time")),
        end_time=_parse_time(document.get("end_time")),
        initial_cash=value("initial_cash"),
        taker_fee_rate_ten_thousandths=value("taker_fee_rate_ten_thousandths"),
        fee_rounding=FeeRounding(value("fee_rounding")),
        slippage=value("slippage"),
        max_position=value("max_position"),
        cap_by_displayed_size=value("cap_by_displayed_size"),
        fill_model=FillModel(value("fill_model")),
        maker_fee_rate_ten_thousandths=value("maker_fee_rate_ten_thousandths"),
        latency=timedelta(microseconds=document.get("latency_us", 0)),
        queue_cancel_share_ten_thousandths=value("queue_cancel_share_ten_thousandths"),
        # Runs stored before fee schedules were versioned applied the first rules.
        fee_schedule_version=document.get("fee_schedule_version", LEGACY_FEE_SCHEDULE),
        gap_policy=GapPolicy(value("gap_policy")),
    )


def sweep_document(sweep: SweepSpec) -> dict[str, Any]:
    """``sweep`` as the JSON document stored with a sweep's parent."""
    document: dict[str, Any] = {
        "grid": {name: list(values) for name, values in sweep.grid.items()},
        "rank_by": sweep.rank_by,
    }
    if sweep.walk_forward is not None:
        walk_forward = sweep.walk_forward
        document["walk_forward"] = [walk_forward.folds, walk_forward.in_sample_fraction]
    return document


def sweep_from_document(document: Mapping[str, Any]) -> SweepSpec:
    """The sweep ``sweep_document`` stored."""
    walk_forward = document.get("walk_forward")
    return SweepSpec(
        grid=dict(document["grid"]),
        rank_by=document["rank_by"],
        walk_forward=None if walk_forward is None else WalkForwardSpec(*walk_forward),
    )


def folds_document(folds: Sequence[WalkForwardOutcome]) -> list[Any]:
    """A walk-forward parent's folds as JSON: one list per fold."""
    return [
        [
            f.fold_index,
            _time(f.fold.in_sample_start),
            _time(f.fold.out_of_sample_start),
            _time(f.fold.end),
            f.best_in_sample_id,
            f.out_of_sample_id,
        ]
        for f in folds
    ]


def folds_from_document(document: Sequence[Any]) -> tuple[WalkForwardOutcome, ...]:
    """The folds ``folds_document`` stored."""
    return tuple(
        WalkForwardOutcome(
            index,
            WalkForwardFold(
                datetime.fromisoformat(in_sample),
                datetime.fromisoformat(out_of_sample),
                datetime.fromisoformat(end),
            ),
            best,
            tested,
        )
        for index, in_sample, out_of_sample, end, best, tested in document
    )


def metrics_document(metrics: BacktestMetrics) -> dict[str, Any]:
    """``metrics`` as JSON: the drawdown duration in microseconds, everything else as is."""
    document = {f.name: getattr(metrics, f.name) for f in fields(BacktestMetrics)}
    document["max_drawdown_duration"] = metrics.max_drawdown_duration // timedelta(microseconds=1)
    return document


def metrics_from_document(document: Mapping[str, Any]) -> BacktestMetrics:
    """The metrics ``metrics_document`` stored."""
    values = dict(document)
    values["max_drawdown_duration"] = timedelta(microseconds=values["max_drawdown_duration"])
    return BacktestMetrics(**values)


def quality_document(quality: DataQuality) -> dict[str, Any]:
    """``quality`` as JSON (durations in microseconds)."""
    return {
        "gap_count": quality.gap_count,
        "gap_time_us": quality.gap_time // _MICROSECOND,
        "unrecovered_gap_count": quality.unrecovered_gap_count,
        "markets": [
            [m.ticker, m.coverage, m.gap_count, m.gap_time // _MICROSECOND] for m in quality.markets
        ],
    }


def quality_from_document(document: Mapping[str, Any]) -> DataQuality:
    """The report ``quality_document`` stored."""
    return DataQuality(
        gap_count=document["gap_count"],
        gap_time=timedelta(microseconds=document["gap_time_us"]),
        unrecovered_gap_count=document["unrecovered_gap_count"],
        markets=tuple(
            MarketCoverage(ticker, coverage, count, timedelta(microseconds=gap_us))
            for ticker, coverage, count, gap_us in document["markets"]
        ),
    )
