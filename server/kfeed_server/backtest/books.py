"""The engine's order-book input: full books at instants, as Kalshi publishes them (bids only).

Kalshi's book has YES bids and NO bids. A YES ask at P is a NO bid at 1 − P (the same resting
order seen from the other side), so taking YES walks the NO bids and taking NO walks the YES bids.
A run's input may interleave ``BookState`` items with snapshots; the DEPTH fill model walks the
latest book of the order's market (falling back to the snapshot's top of book when the market has
no book yet). Whatever stores books (checkpoints plus deltas) rebuilds ``BookState`` items for the
run; the engine only needs the levels.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from kfeed_server.backtest.fees import PRICE_SCALE
from kfeed_server.records import SnapshotRecord, TradeRecord

Level = tuple[int, int]
"""(price in 1/10,000 USD, size in 1/100 contract)."""


@dataclass(frozen=True, slots=True)
class BookState:
    """A market's whole book at ``exchange_time``: bids best (highest) first on each side."""

    ticker: str
    exchange_time: datetime
    yes_bids: tuple[Level, ...]
    no_bids: tuple[Level, ...]

    def bids(self, yes: bool) -> tuple[Level, ...]:
        """The bids of one side, best first."""
        return self.yes_bids if yes else self.no_bids

    def size_at(self, yes: bool, price: int) -> int:
        """Size bid at ``price`` on one side (0 when there is no such level)."""
        for level_price, size in self.bids(yes):
            if level_price == price:
                return size
        return 0


ReplayedEvent = BookState | TradeRecord
"""A book or a public trade, as the engine replays them between snapshots."""


def event_time(event: ReplayedEvent) -> datetime:
    """When ``event`` happened (exchange time)."""
    return event.exchange_time if isinstance(event, BookState) else event.create_time


def asks_to_take(book: BookState, buy_yes: bool) -> list[Level]:
    """The levels a buyer of YES (``buy_yes``) or of NO takes, best (lowest) price first: the
    other side's bids, each at its complement price."""
    return [(PRICE_SCALE - price, size) for price, size in book.bids(not buy_yes)]


def top_of_book(snapshot: SnapshotRecord) -> BookState:
    """A one-level book from a snapshot's top of book. The NO bid level is the YES ask level
    (its size is ``yes_ask_size``); an unrecorded size is unlimited, as in the TOUCH model."""
    yes = () if snapshot.yes_bid is None else ((snapshot.yes_bid, _size(snapshot.yes_bid_size)),)
    no = () if snapshot.no_bid is None else ((snapshot.no_bid, _size(snapshot.yes_ask_size)),)
    return BookState(snapshot.ticker, snapshot.exchange_time, yes, no)


UNKNOWN_SIZE = 1 << 62
"""The size of a level whose size was not recorded: no cap."""


def _size(size: int | None) -> int:
    return UNKNOWN_SIZE if size is None else size
