"""A user strategy that probes the DEPTH fill model: a YES market order of ``count`` at every
``every``-th open snapshot of a market whose recorded book it has seen (``on_book``), so every
order walks a recorded book. Loaded by configuration (``--strategy-module``)."""

from __future__ import annotations

from collections.abc import Sequence

from kfeed_server.backtest import (
    BookState,
    Instruction,
    MarketView,
    Order,
    Parameters,
    ParameterSpec,
    ParameterType,
    PortfolioView,
    Strategy,
)
from kfeed_server.records import MarketStatus, OrderAction, Side, SnapshotRecord


class DepthProbe(Strategy):
    """Buys ``count`` YES at market every ``every``-th open snapshot once the book is known."""

    name = "depth_probe"
    description = "Test probe: YES market orders that walk the recorded book."
    parameters = (
        ParameterSpec("count", ParameterType.INTEGER, "Order size, 1/100 contract.", default=100),
        ParameterSpec("every", ParameterType.INTEGER, "Snapshots between orders.", default=1),
    )

    def __init__(self, params: Parameters) -> None:
        super().__init__(params)
        self.count = params.integer("count")
        self.every = params.integer("every")
        self.seen: dict[str, int] = {}  # snapshots of each market since its first book
        self.last_order: dict[str, object] = {}

    def on_book(
        self, book: BookState, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        self.seen.setdefault(book.ticker, 0)
        return ()

    def on_snapshot(
        self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        ticker = snapshot.ticker
        seen = self.seen.get(ticker)
        if seen is None or snapshot.status is not MarketStatus.OPEN:
            return ()
        self.seen[ticker] = seen + 1
        # One order per market and instant: a second one would share the first one's levels.
        if seen % self.every or self.last_order.get(ticker) == snapshot.exchange_time:
            return ()
        self.last_order[ticker] = snapshot.exchange_time
        return (Order(ticker, Side.YES, OrderAction.BUY, self.count),)
