"""User strategies in a module of their own, loaded by configuration (``--strategy-module``),
as a user's package would be: nothing here is registered at import."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

from kfeed_server.backtest import (
    Cancel,
    Fill,
    Instruction,
    MarketView,
    Order,
    Parameters,
    ParameterSpec,
    ParameterType,
    PortfolioView,
    Strategy,
)
from kfeed_server.records import OrderAction, Side, SnapshotRecord

YES, BUY, SELL = Side.YES, OrderAction.BUY, OrderAction.SELL


class BidUnderTheMarket(Strategy):
    """Rests a YES bid `offset` under the bid; sells what fills at the next bid above cost."""

    name = "user_bid_under"
    description = "A user's strategy: a resting YES bid under the market, sold on fill."
    parameters = (
        ParameterSpec("offset", ParameterType.DOLLARS, "Distance under the bid.", default=100),
    )

    def __init__(self, params: Parameters) -> None:
        super().__init__(params)
        self.offset = params.dollars("offset")
        self.fills: list[Fill] = []

    def on_snapshot(
        self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        ticker = snapshot.ticker
        if snapshot.yes_bid is None or portfolio.position(ticker, YES):
            return ()
        price = max(snapshot.yes_bid - self.offset, 100)
        return (
            Cancel(ticker),
            Order(ticker, YES, BUY, 100, limit_price=price, client_order_id=len(self.fills) + 1),
        )

    def on_fill(
        self, fill: Fill, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        self.fills.append(fill)
        if fill.action is BUY:
            return (Order(fill.ticker, YES, SELL, fill.count, limit_price=fill.price + 300),)
        return ()


class Raises(Strategy):
    """Fails at its 100th snapshot."""

    name = "user_raises"
    description = "A user's strategy with a bug."

    def __init__(self, params: Parameters) -> None:
        super().__init__(params)
        self.seen = 0

    def on_snapshot(
        self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        self.seen += 1
        if self.seen == 100:
            raise ZeroDivisionError("the user's bug")
        return ()


class Spins(Strategy):
    """Never returns from its first snapshot."""

    name = "user_spins"
    description = "A user's strategy that runs away."

    def on_snapshot(
        self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        while True:
            time.sleep(0.01)


class SwallowsTheLimit(Strategy):
    """Never returns from its first snapshot and swallows every exception, the time limit's
    included: only killing its process stops it."""

    name = "user_swallows"
    description = "A user's strategy that runs away and catches BaseException."

    def on_snapshot(
        self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        while True:
            # The whole loop inside the handler: the limit's one exception cannot land outside.
            with contextlib.suppress(BaseException):
                while True:
                    time.sleep(0.01)


class Dawdles(Strategy):
    """Takes half a millisecond over every snapshot: a run slow enough to be cancelled while it
    runs (a stop is seen at the engine's progress reports)."""

    name = "user_dawdles"
    description = "A user's strategy that takes its time (0.5 ms a snapshot)."

    def on_snapshot(
        self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        time.sleep(0.0005)
        return ()
