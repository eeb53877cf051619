"""Builders shared by the backtest tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from kfeed_server.backtest import PortfolioView, Strategy, StrategyRegistry
from kfeed_server.backtest.orders import Instruction
from kfeed_server.backtest.strategy import MarketView
from kfeed_server.records import (
    DataSource,
    MarketRecord,
    MarketResult,
    MarketStatus,
    SnapshotRecord,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    """T0 plus ``minutes``."""
    return T0 + timedelta(minutes=minutes)


def quote(
    ticker: str,
    minutes: float,
    snapshot_id: int,
    yes_bid: int | None,
    yes_ask: int | None,
    *,
    yes_bid_size: int | None = None,
    yes_ask_size: int | None = None,
) -> SnapshotRecord:
    """A snapshot whose NO quotes are the complements of the YES quotes, as on Kalshi."""
    return SnapshotRecord(
        ticker=ticker,
        exchange_time=at(minutes),
        receive_time=at(minutes),
        source=DataSource.POLL,
        yes_bid=yes_bid,
        yes_ask=yes_ask,
        no_bid=None if yes_ask is None else 10_000 - yes_ask,
        no_ask=None if yes_bid is None else 10_000 - yes_bid,
        yes_bid_size=yes_bid_size,
        yes_ask_size=yes_ask_size,
        status=MarketStatus.OPEN,
        snapshot_id=snapshot_id,
    )


def settled(ticker: str, result: MarketResult, minutes: float) -> MarketRecord:
    """A market that settled with ``result`` at T0 + ``minutes``."""
    return MarketRecord(
        ticker=ticker,
        status=MarketStatus.FINALIZED,
        result=result,
        settlement_time=at(minutes),
    )


def scripted_registry(script: Mapping[int, Sequence[Instruction]]) -> StrategyRegistry:
    """A registry with one strategy, "scripted", that places ``script[snapshot_id]`` at each
    snapshot: fills are then fixed by the test, not by a strategy's logic."""

    class Scripted(Strategy):
        name = "scripted"
        description = "Places the orders the test scripted for each snapshot id."

        def on_snapshot(
            self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
        ) -> Sequence[Instruction]:
            return script.get(snapshot.snapshot_id, ())

    registry = StrategyRegistry()
    registry.register(Scripted)
    return registry
