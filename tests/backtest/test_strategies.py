"""Each built-in strategy on a path crafted to trigger its rules, and a user strategy."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kfeed_server.backtest import (
    EngineConfig,
    MarketView,
    Order,
    Parameters,
    ParameterSpec,
    ParameterType,
    PortfolioView,
    Strategy,
    StrategyRegistry,
    run_backtest,
)
from kfeed_server.records import MarketResult, OrderAction, Side, SnapshotRecord
from tests.support.backtest import quote, settled

BUY, SELL = OrderAction.BUY, OrderAction.SELL
YES, NO = Side.YES, Side.NO


def _mids(ticker: str, mids: list[int]) -> list[SnapshotRecord]:
    """Quotes one cent either side of each mid, one minute apart."""
    return [quote(ticker, k, k + 1, mid - 100, mid + 100) for k, mid in enumerate(mids)]


def _trades(
    config: EngineConfig, snapshots: list[SnapshotRecord]
) -> list[tuple[int, Side, OrderAction]]:
    result = run_backtest(config, {}, snapshots)
    return [(e.snapshot_id, e.side, e.action) for e in result.executions if e.action in (BUY, SELL)]


def test_mean_reversion_buys_the_dip_and_fades_the_spike() -> None:
    # Window 3, population deviation, current mid included:
    #   #3 [5000, 5200, 4000]: mean 4733.3, sd 524.9, z = −733.3 / 524.9 = −1.40 <= −1: buy YES
    #   #4 [5200, 4000, 5000]: z = 266.7 / 524.9 = +0.51 >= −0: sell YES
    #   #5 [4000, 5000, 6500]: mean 5166.7, sd 1027.4, z = 1333.3 / 1027.4 = +1.30 >= 1: buy NO
    #   #6 [5000, 6500, 5000]: mean 5500, sd 707.1, z = −0.71 <= 0: sell NO
    config = EngineConfig("mean_reversion", ("A",), {"window": 3, "entry_z": 1.0, "exit_z": 0.0})
    trades = _trades(config, _mids("A", [5_000, 5_200, 4_000, 5_000, 6_500, 5_000]))
    assert trades == [(3, YES, BUY), (4, YES, SELL), (5, NO, BUY), (6, NO, SELL)]


def test_momentum_follows_the_move_and_exits_on_reversal() -> None:
    # Lookback 2, threshold 0.03: change = mid − mid two snapshots back.
    #   #3 5400 − 5000 = +400 >= 300: buy YES;  #4 5300 − 5100 = +200: hold
    #   #5 5200 − 5400 = −200 < 0: sell YES;    #6 4800 − 5300 = −500 <= −300: buy NO
    #   #7 4900 − 5200 = −300: hold;            #8 5000 − 4800 = +200 > 0: sell NO
    config = EngineConfig("momentum", ("A",), {"lookback": 2, "threshold": 300})
    trades = _trades(config, _mids("A", [5_000, 5_100, 5_400, 5_300, 5_200, 4_800, 4_900, 5_000]))
    assert trades == [(3, YES, BUY), (5, YES, SELL), (6, NO, BUY), (8, NO, SELL)]


def test_favourite_hold_buys_the_favourite_once_and_holds_to_settlement() -> None:
    snapshots = [
        quote("F1", 0, 1, 6_900, 7_000),  # YES ask 0.70, NO ask 0.31: no favourite in range
        quote("F2", 1, 2, 1_000, 1_200),  # NO ask 1 − 0.10 = 0.90: buy NO, states P(YES) 0.10
        quote("F1", 2, 3, 8_300, 8_500),  # YES ask 0.85: buy YES, states 0.85
        quote("F1", 3, 4, 8_900, 9_000),  # already held: nothing
        quote("F1", 4, 5, 9_900, 9_950),  # held, never sold
    ]
    markets = {"F1": settled("F1", MarketResult.YES, 10), "F2": settled("F2", MarketResult.YES, 10)}
    result = run_backtest(EngineConfig("favourite_hold", ("F1", "F2")), markets, snapshots)
    actions = [(e.ticker, e.side, e.action, e.price) for e in result.executions]
    assert actions == [
        ("F2", NO, BUY, 9_000),
        ("F1", YES, BUY, 8_500),
        ("F1", YES, OrderAction.SETTLE, 10_000),
        ("F2", NO, OrderAction.SETTLE, 0),
    ]
    # ((0.85 − 1)² + (0.10 − 1)²) / 2 = (0.0225 + 0.81) / 2
    assert result.metrics.brier_score == pytest.approx(0.41625)


class BuyEveryNth(Strategy):
    """A user strategy: buys one YES contract at every n-th snapshot."""

    name = "every_nth"
    description = "Buys one YES contract every n snapshots."
    parameters = (ParameterSpec("n", ParameterType.INTEGER, "Snapshots between buys.", 2, 1),)

    def __init__(self, params: Parameters) -> None:
        super().__init__(params)
        self.n = params.integer("n")
        self.seen = 0

    def on_snapshot(
        self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Order]:
        self.seen += 1
        if self.seen % self.n:
            return ()
        return [Order(snapshot.ticker, YES, BUY, 100)]


def test_a_user_strategy_can_be_registered_and_run() -> None:
    registry = StrategyRegistry()
    registry.register(BuyEveryNth)
    result = run_backtest(
        EngineConfig("every_nth", ("A",), {"n": 3}),
        {},
        _mids("A", [5_000] * 7),
        registry=registry,
    )
    assert [e.snapshot_id for e in result.executions if e.action is BUY] == [3, 6]
    assert "every_nth" in registry


def test_registry_refuses_clashing_names() -> None:
    registry = StrategyRegistry()
    registry.register(BuyEveryNth)
    registry.register(BuyEveryNth)  # the same class again is harmless

    class Impostor(BuyEveryNth):
        pass

    with pytest.raises(ValueError, match="already registered"):
        registry.register(Impostor)
