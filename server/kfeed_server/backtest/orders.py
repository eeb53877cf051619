"""What a strategy sends (orders and cancels) and what it is told back (fills).

Money in 1/10,000 USD, counts in 1/100 contract. See docs/BACKTESTING.md ("Orders and fills").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from kfeed_server.records import OrderAction, Side


@dataclass(frozen=True, slots=True)
class Order:
    """An order. ``count`` is in 1/100 contract and must be positive; ``side`` YES or NO;
    ``action`` BUY or SELL.

    Without ``limit_price`` it is a market order: it takes what the book offers at once and the
    rest is dropped. With ``limit_price`` (1/10,000 USD, 1..9,999) it takes what is offered at that
    price or better, and the rest *rests* on the book as a maker order until it fills (queue
    model), is cancelled, expires (``expire_after``, from its arrival) or the run ends.
    ``client_order_id`` (> 0) names it in fills and in ``Cancel``. ``probability``, when given, is
    the strategy's stated probability (0..1) that the market settles YES; it feeds the Brier score.
    """

    ticker: str
    side: Side
    action: OrderAction
    count: int
    probability: float | None = None
    limit_price: int | None = None
    expire_after: timedelta | None = None
    client_order_id: int = 0


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancels the resting orders of ``ticker`` with ``client_order_id`` (0: all of them)."""

    ticker: str
    client_order_id: int = 0


Instruction = Order | Cancel
"""What a strategy hook returns, in a sequence."""


@dataclass(frozen=True, slots=True)
class Fill:
    """One fill of a strategy's order, as ``Strategy.on_fill`` sees it. ``price`` is the average
    price per contract (slippage included), ``maker`` tells a resting order's fill."""

    ticker: str
    time: datetime
    side: Side
    action: OrderAction
    count: int
    price: int
    fee: int
    maker: bool
    client_order_id: int
    # The market's net position after the fill: YES contracts positive, NO negative.
    position_after: int
