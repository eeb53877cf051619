"""The engine's configuration: the domain mirror of the proto ``BacktestConfig``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from kfeed_server.backtest.fees import KALSHI_TAKER_FEE_RATE, PRICE_SCALE, FeeRounding
from kfeed_server.backtest.params import ConfigError, ParamValue, resolve_parameters
from kfeed_server.backtest.strategy import StrategyRegistry, default_registry

DEFAULT_INITIAL_CASH = 10_000_000
"""$1,000 in 1/10,000 USD."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything that determines a backtest's result (with the data).

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


def validate_config(
    config: EngineConfig, registry: StrategyRegistry = default_registry
) -> EngineConfig:
    """Returns ``config`` with its parameters checked, coerced and completed with defaults.

    Raises ConfigError naming the offending field: ``strategy``, ``parameters.<name>``,
    ``tickers``, ``start_time``, ``end_time``, ``initial_cash``,
    ``taker_fee_rate_ten_thousandths``, ``fee_rounding``, ``slippage`` or ``max_position``.
    """
    cls = registry.get(config.strategy)
    parameters = resolve_parameters(cls.parameters, config.parameters)
    cls.check_parameters(parameters)
    if not config.tickers:
        raise ConfigError("tickers", "at least one ticker is required")
    for ticker in config.tickers:
        if not isinstance(ticker, str) or not ticker:
            raise ConfigError("tickers", f"invalid ticker {ticker!r}")
    if len(set(config.tickers)) != len(config.tickers):
        raise ConfigError("tickers", "duplicate tickers")
    for name, moment in (("start_time", config.start_time), ("end_time", config.end_time)):
        if moment is not None and moment.utcoffset() is None:
            raise ConfigError(name, "must be timezone-aware")
    if (
        config.start_time is not None
        and config.end_time is not None
        and config.end_time <= config.start_time
    ):
        raise ConfigError("end_time", "must be after start_time")
    if config.initial_cash <= 0:
        raise ConfigError("initial_cash", "must be positive")
    if not 0 <= config.taker_fee_rate_ten_thousandths <= PRICE_SCALE:
        raise ConfigError("taker_fee_rate_ten_thousandths", "must be in 0..10000")
    if not 0 <= config.slippage <= PRICE_SCALE:
        raise ConfigError("slippage", "must be in 0..10000")
    if config.max_position < 0:
        raise ConfigError("max_position", "must not be negative")
    try:
        rounding = FeeRounding(config.fee_rounding)
    except ValueError:
        raise ConfigError("fee_rounding", f"unknown fee rounding {config.fee_rounding!r}") from None
    if rounding is FeeRounding.UNSPECIFIED:
        rounding = FeeRounding.CENT
    return replace(
        config, parameters=parameters, tickers=tuple(config.tickers), fee_rounding=rounding
    )
