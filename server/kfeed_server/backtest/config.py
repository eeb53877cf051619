"""Validates the engine's configuration (``records.backtest.EngineConfig``); picks its path."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta

from kfeed_server.backtest.fees import (
    DEFAULT_MARKET_FEES,
    MULTIPLIER_SCALE,
    PRICE_SCALE,
    MarketFees,
)
from kfeed_server.backtest.params import ConfigError, resolve_parameters
from kfeed_server.backtest.strategy import StrategyRegistry, default_registry
from kfeed_server.records.backtest import (
    FEE_SCHEDULE_VERSION,
    EngineConfig,
    FeeRounding,
    FillModel,
    GapPolicy,
)

MAX_LATENCY = timedelta(hours=1)
"""The longest decision-to-arrival delay accepted."""

FAST_STRATEGIES = frozenset(
    {"threshold", "favourite_hold", "mean_reversion", "momentum", "spread_maker"}
)
"""Strategies the compiled path (``backtest.fast``) runs."""
COMPILED_WITH_TRADES = frozenset({"spread_maker"})
"""Compiled strategies that replay the public trades (the queue model of resting orders)."""
_NO_BOUND = 2**62


def fast_path_applies(config: EngineConfig, fees: Mapping[str, MarketFees] | None = None) -> bool:
    """Whether the compiled path (``backtest.fast``) runs ``config``: a FAST_STRATEGIES rule, the
    TOUCH fill model, no latency, and a fee numerator (rate × multiplier × count × P(1 − P))
    within int64."""
    if not (
        config.strategy in FAST_STRATEGIES
        and FillModel(config.fill_model) in (FillModel.TOUCH, FillModel.UNSPECIFIED)
        and not config.latency
    ):
        return False
    fees = fees or {}
    multiplier = max(
        (fees.get(t, DEFAULT_MARKET_FEES).multiplier for t in config.tickers),
        default=MULTIPLIER_SCALE,
    )
    # The largest order: ``count``, or for the market maker its inventory (what it offers).
    counts = [config.parameters.get(name, 100) for name in ("count", "max_inventory")]
    if not all(isinstance(count, int) for count in counts):
        return False
    count = max(c for c in counts if isinstance(c, int))
    rate = max(config.taker_fee_rate_ten_thousandths, config.maker_fee_rate_ten_thousandths)
    return rate * multiplier * count * 25_000_000 < _NO_BOUND


def validate_config(
    config: EngineConfig, registry: StrategyRegistry = default_registry
) -> EngineConfig:
    """Returns ``config`` with its parameters checked, coerced and completed with defaults.

    Raises ConfigError naming the offending field: ``strategy``, ``parameters.<name>``,
    ``tickers``, ``start_time``, ``end_time``, ``initial_cash``,
    ``taker_fee_rate_ten_thousandths``, ``fee_rounding``, ``slippage``, ``max_position``,
    ``maker_fee_rate_ten_thousandths``, ``latency``, ``queue_cancel_share_ten_thousandths``,
    ``fill_model`` or ``gap_policy``.
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
    if not 0 <= config.maker_fee_rate_ten_thousandths <= PRICE_SCALE:
        raise ConfigError("maker_fee_rate_ten_thousandths", "must be in 0..10000")
    if not timedelta(0) <= config.latency <= MAX_LATENCY:
        raise ConfigError("latency", f"must be in 0..{MAX_LATENCY.total_seconds():g} s")
    if not 0 <= config.queue_cancel_share_ten_thousandths <= PRICE_SCALE:
        raise ConfigError("queue_cancel_share_ten_thousandths", "must be in 0..10000")
    try:
        fill_model = FillModel(config.fill_model)
    except ValueError:
        raise ConfigError("fill_model", f"unknown fill model {config.fill_model!r}") from None
    if fill_model is FillModel.UNSPECIFIED:
        fill_model = FillModel.TOUCH
    try:
        gap_policy = GapPolicy(config.gap_policy)
    except ValueError:
        raise ConfigError("gap_policy", f"unknown gap policy {config.gap_policy!r}") from None
    if gap_policy is GapPolicy.UNSPECIFIED:
        gap_policy = GapPolicy.FLAG
    try:
        rounding = FeeRounding(config.fee_rounding)
    except ValueError:
        raise ConfigError("fee_rounding", f"unknown fee rounding {config.fee_rounding!r}") from None
    if rounding is FeeRounding.UNSPECIFIED:
        rounding = FeeRounding.CENT
    return replace(
        config,
        parameters=parameters,
        tickers=tuple(config.tickers),
        fee_rounding=rounding,
        fill_model=fill_model,
        fee_schedule_version=FEE_SCHEDULE_VERSION,
        gap_policy=gap_policy,
    )
