"""Order books at any instant: the latest checkpoint at or before it, then the changes after it.

A change gives a level's new size, so applying one is a plain assignment (a duplicate is harmless).
A checkpoint holds every change at or before its exchange time. A LOST checkpoint marks where the
recording stopped (a feed gap, a lost socket): the book is unknown from then until the next START
or RESYNC, and is returned as last known, flagged ``in_feed_gap``. A START whose market had
earlier records means the recording restarted without saying where it stopped (ingest killed):
the instants between the previous record and the START are flagged too. Design:
docs/adr/0017-order-book-storage.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from kfeed_server.db.repositories import MarketRepository, OrderBookRepository
from kfeed_server.db.repositories.books import BookHistory
from kfeed_server.records import (
    BookCheckpointRecord,
    BookStreamRow,
    CheckpointKind,
    Levels,
    Side,
    StreamedBook,
)

# The latest book, however far the exchange's clock runs from ours.
LATEST = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class BookAt:
    """A market's book in force at an instant, best levels first."""

    ticker: str
    exchange_time: datetime  # of the last change (or checkpoint) in it
    receive_time: datetime
    sequence: int | None  # the exchange's sequence number of that change, when known
    yes: Levels
    no: Levels
    in_feed_gap: bool


class UnknownMarketError(LookupError):
    """No market has this ticker."""


class BeforeMarketError(ValueError):
    """The instant is before the market existed (its open time)."""

    def __init__(self, opened: datetime) -> None:
        super().__init__(f"before the market opened ({opened.isoformat()})")
        self.opened = opened


class NotRecordedError(LookupError):
    """No book of the market was recorded at or before the instant."""


def _best_first(side: dict[int, int], depth: int) -> Levels:
    levels = sorted(side.items(), reverse=True)
    return tuple(levels[:depth] if depth else levels)


def rebuild(history: BookHistory, depth: int = 0) -> BookAt:
    """The book a checkpoint and the changes after it make (``depth`` levels a side; 0: all)."""
    checkpoint = history.checkpoint
    assert checkpoint is not None
    books = (dict(checkpoint.yes), dict(checkpoint.no))
    yes_side = int(Side.YES)
    for side, price, size in history.levels:
        book = books[0] if side == yes_side else books[1]
        if size:
            book[price] = size
        else:
            book.pop(price, None)
    last = history.last_change
    time, received, sequence = (
        (checkpoint.exchange_time, checkpoint.receive_time, checkpoint.sequence)
        if last is None
        else (last.exchange_time, last.receive_time, last.sequence)
    )
    return BookAt(
        ticker=checkpoint.ticker,
        exchange_time=time,
        receive_time=received,
        sequence=sequence or None,
        yes=_best_first(books[0], depth),
        no=_best_first(books[1], depth),
        in_feed_gap=checkpoint.kind is CheckpointKind.LOST
        or history.following is CheckpointKind.START,
    )


class OrderBooks:
    """Point-in-time books over the stored changes and checkpoints."""

    def __init__(self, markets: MarketRepository, books: OrderBookRepository) -> None:
        self._markets = markets
        self._books = books

    async def book_at(self, ticker: str, time: datetime, depth: int = 0) -> BookAt:
        """``ticker``'s book in force at ``time``, ``depth`` levels a side (0: all)."""
        history = await self._books.history(ticker, time)
        if history.checkpoint is None:
            market = await self._markets.get_market(ticker)
            if market is None:
                raise UnknownMarketError(ticker)
            if market.open_time is not None and time < market.open_time:
                raise BeforeMarketError(market.open_time)
            raise NotRecordedError(ticker)
        return rebuild(history, depth)

    async def books_at(self, tickers: Sequence[str], time: datetime) -> list[BookAt]:
        """The books in force at ``time`` of those of ``tickers`` that have one (in that order),
        every level: what :meth:`book_at` gives each, read for all of them at once."""
        histories = await self._books.histories(tickers, time)
        return [rebuild(histories[t]) for t in tickers if t in histories]


class BookStream:
    """What StreamOrderBooks reads: each market's full book where a stream starts, then the
    stored rows after that position by stream id (``streaming.feed.StartingPointSource``)."""

    def __init__(self, books: OrderBooks, repository: OrderBookRepository) -> None:
        self._books = books
        self._repository = repository

    async def starting_point(
        self, tickers: Sequence[str] | None, start_time: datetime | None
    ) -> tuple[list[BookStreamRow], int]:
        """Each market's book in force at ``start_time`` (None: now) that has one, and the
        stream position they stand at: every row at or before it is in them. Rows after it may
        be in them too (committed meanwhile, or stored late); replaying such a change sets a
        level to the size it already has."""
        if start_time is None:
            position, time = await self._repository.max_stream_id(), LATEST
        else:
            position, time = await self._repository.position_before(start_time, tickers), start_time
        markets = tickers if tickers is not None else await self._repository.tickers_with_books()
        # A market without a book yet gets its first with its first recorded checkpoint.
        books = await self._books.books_at(list(markets), time)
        rows: list[BookStreamRow] = [StreamedBook(position, _as_checkpoint(b)) for b in books]
        return rows, position

    async def list_after_id(
        self,
        after_id: int,
        *,
        tickers: Sequence[str] | None,
        limit: int,
        min_exchange_time: datetime | None = None,
    ) -> list[BookStreamRow]:
        return await self._repository.list_after_id(
            after_id, tickers=tickers, limit=limit, min_exchange_time=min_exchange_time
        )

    async def max_stream_id(self) -> int:
        return await self._repository.max_stream_id()


def _as_checkpoint(book: BookAt) -> BookCheckpointRecord:
    """A rebuilt book as the stream carries full books (LOST: flagged as in a feed gap)."""
    kind = CheckpointKind.LOST if book.in_feed_gap else CheckpointKind.START
    return BookCheckpointRecord(
        book.ticker, book.exchange_time, book.receive_time, book.sequence, kind, book.yes, book.no
    )
