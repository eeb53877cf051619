"""Order books kept up to date from a StreamOrderBooks stream.

A full book replaces the market's copy (the first of each market, and again after a feed gap);
a change sets one level's size (0 removes it). Applying a change twice is harmless, so a copy
that a resumed stream brings up to date again ends up the same.

    books = LocalOrderBooks()
    async for message in client.stream_order_books(["KXBTC-25DEC31-B100000"]):
        book = books.apply(message)
        if book is not None:
            print(book.yes_bids(5), book.no_bids(5))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2

from kfeed.v1 import market_service_pb2, types_pb2

Level = tuple[int, int]
"""(price in 1/10,000 USD, size in 1/100 contract)."""


@dataclass
class LocalOrderBook:
    """One market's book as the stream has told it: YES and NO bids by price."""

    ticker: str
    yes: dict[int, int] = field(default_factory=dict)
    no: dict[int, int] = field(default_factory=dict)
    # True from a book flagged ``in_feed_gap`` until the next full book.
    in_feed_gap: bool = False
    exchange_time: timestamp_pb2.Timestamp | None = None
    exchange_sequence: int | None = None

    def yes_bids(self, depth: int = 0) -> list[Level]:
        """YES bids, best (highest price) first; ``depth`` levels (0: all)."""
        return _best_first(self.yes, depth)

    def no_bids(self, depth: int = 0) -> list[Level]:
        """NO bids, best first; a NO bid at X is a YES ask at 1 − X."""
        return _best_first(self.no, depth)


def _best_first(side: dict[int, int], depth: int) -> list[Level]:
    levels = sorted(side.items(), reverse=True)
    return levels[:depth] if depth else levels


class LocalOrderBooks:
    """Every followed market's book, from the messages of one stream."""

    def __init__(self) -> None:
        self.books: dict[str, LocalOrderBook] = {}

    def apply(
        self,
        message: market_service_pb2.StreamOrderBooksResponse | market_service_pb2.OrderBookUpdate,
    ) -> LocalOrderBook | None:
        """Apply a book, a change or a batch of them; the book changed (the last one, for a
        batch), or None when the message holds neither."""
        if isinstance(message, market_service_pb2.StreamOrderBooksResponse) and message.HasField(
            "batch"
        ):
            changed = None
            for update in message.batch.updates:
                changed = self.apply(update)
            return changed
        if message.HasField("book"):
            return self._replace(message.book)
        if message.HasField("change"):
            return self._change(message.change)
        return None

    def _replace(self, book: types_pb2.OrderBook) -> LocalOrderBook:
        local = LocalOrderBook(
            book.ticker,
            {level.price.ten_thousandths: level.size.hundredths for level in book.yes_bids},
            {level.price.ten_thousandths: level.size.hundredths for level in book.no_bids},
            book.in_feed_gap,
            book.exchange_time,
            book.exchange_sequence if book.HasField("exchange_sequence") else None,
        )
        self.books[book.ticker] = local
        return local

    def _change(self, change: types_pb2.OrderBookChange) -> LocalOrderBook:
        local = self.books.setdefault(change.ticker, LocalOrderBook(change.ticker))
        side = local.yes if change.side == types_pb2.SIDE_YES else local.no
        if change.size.hundredths:
            side[change.price.ten_thousandths] = change.size.hundredths
        else:
            side.pop(change.price.ten_thousandths, None)
        local.exchange_time = change.exchange_time
        if change.HasField("exchange_sequence"):
            local.exchange_sequence = change.exchange_sequence
        return local
