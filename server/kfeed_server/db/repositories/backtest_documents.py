"""How a backtest's configuration, sweep and metrics are stored: JSON documents.

Only the repository uses this; everything above it sees typed records. Readers accept documents
written before a field existed (the field then takes its default), so stored runs stay readable
as the configuration grows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from datetime import datetime, timedelta
from typing import Any

from kfeed_server.backtest.config import EngineConfig
from kfeed_server.backtest.fees import FeeRounding
from kfeed_server.backtest.metrics import BacktestMetrics
from kfeed_server.backtest.sweep import SweepSpec

_CONFIG_DEFAULTS = EngineConfig(strategy="", tickers=())


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
    )


def sweep_document(sweep: SweepSpec) -> dict[str, Any]:
    """``sweep`` as the JSON document stored with a sweep's parent."""
    return {
        "grid": {name: list(values) for name, values in sweep.grid.items()},
        "rank_by": sweep.rank_by,
    }


def sweep_from_document(document: Mapping[str, Any]) -> SweepSpec:
    """The sweep ``sweep_document`` stored."""
    return SweepSpec(grid=dict(document["grid"]), rank_by=document["rank_by"])


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
