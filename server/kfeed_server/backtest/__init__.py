"""The backtest engine (domain layer: no gRPC, no SQL): strategies and their registry, the
execution model with Kalshi fees and settlement, metrics, and parameter sweeps.

The service calls ``validate_config`` (to answer INVALID_ARGUMENT early), then ``run_backtest`` in a
worker process, and ``sweep_grid`` / ``rank`` for sweeps. See docs/BACKTESTING.md.
"""

from kfeed_server.backtest import strategies as _builtins  # noqa: F401  (registers the built-ins)
from kfeed_server.backtest.books import BookState
from kfeed_server.backtest.config import validate_config
from kfeed_server.backtest.engine import (
    BacktestCancelled,
    BacktestResult,
    Progress,
    StrategyError,
    run_backtest,
)
from kfeed_server.backtest.fees import FeeModel, FeeType, MarketFees, market_fees, taker_fee
from kfeed_server.backtest.fingerprint import DataFingerprint, Fingerprinter, fingerprint
from kfeed_server.backtest.orders import Cancel, Fill, Instruction
from kfeed_server.backtest.params import ConfigError, Parameters, ParameterSpec, ParameterType
from kfeed_server.backtest.strategies import (
    FavouriteStrategy,
    MeanReversionStrategy,
    MomentumStrategy,
    ThresholdStrategy,
)
from kfeed_server.backtest.strategy import (
    MarketView,
    Order,
    PortfolioView,
    Strategy,
    StrategyRegistry,
    default_registry,
    register_strategy,
)
from kfeed_server.backtest.sweep import rank, sweep_grid
from kfeed_server.records.backtest import (
    DEFAULT_INITIAL_CASH,
    FEE_SCHEDULE_VERSION,
    KALSHI_MAKER_FEE_RATE,
    KALSHI_TAKER_FEE_RATE,
    BacktestMetrics,
    EngineConfig,
    FeeRounding,
    FillModel,
    ParamValue,
)

__all__ = [
    "DEFAULT_INITIAL_CASH",
    "FEE_SCHEDULE_VERSION",
    "KALSHI_MAKER_FEE_RATE",
    "KALSHI_TAKER_FEE_RATE",
    "BacktestCancelled",
    "BacktestMetrics",
    "BacktestResult",
    "BookState",
    "Cancel",
    "ConfigError",
    "DataFingerprint",
    "EngineConfig",
    "FavouriteStrategy",
    "FeeModel",
    "FeeRounding",
    "FeeType",
    "Fill",
    "FillModel",
    "Fingerprinter",
    "Instruction",
    "MarketFees",
    "MarketView",
    "MeanReversionStrategy",
    "MomentumStrategy",
    "Order",
    "ParamValue",
    "ParameterSpec",
    "ParameterType",
    "Parameters",
    "PortfolioView",
    "Progress",
    "Strategy",
    "StrategyError",
    "StrategyRegistry",
    "ThresholdStrategy",
    "default_registry",
    "fingerprint",
    "market_fees",
    "rank",
    "register_strategy",
    "run_backtest",
    "sweep_grid",
    "taker_fee",
    "validate_config",
]
