"""Conflated order books: at most one full book per market per interval, holding every change up
to then (StreamOrderBooksRequest.conflation_interval).

A change only means something on top of the book before it, so, unlike a snapshot, the newest row
of a market cannot stand for the others: the conflator folds every row of the stream into its own
copy of each market's book — the rows sent as they are before the stream went live included —
and a flush sends that book, whole. It implements ``streaming.feed.Conflator``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from kfeed_server.records import (
    BookCheckpointRecord,
    BookStreamRow,
    CheckpointKind,
    Side,
    StreamedBook,
)


@dataclass(slots=True)
class _Book:
    """One market's book as the stream's rows built it."""

    yes: dict[int, int]
    no: dict[int, int]
    kind: CheckpointKind  # of the last full book: LOST = in a feed gap since
    exchange_time: datetime
    receive_time: datetime
    sequence: int | None

    def as_record(self, ticker: str) -> BookCheckpointRecord:
        return BookCheckpointRecord(
            ticker,
            self.exchange_time,
            self.receive_time,
            self.sequence,
            self.kind,
            tuple(sorted(self.yes.items(), reverse=True)),
            tuple(sorted(self.no.items(), reverse=True)),
        )


@dataclass
class BookConflator:
    """Every market's book from the stream's rows, sent whole for the markets that changed."""

    books: dict[str, _Book] = field(default_factory=dict)
    # Markets changed since the last flush: the position of the last row folded in, and how
    # many rows were.
    changed: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def pending(self) -> bool:
        return bool(self.changed)

    def observe(self, row: BookStreamRow) -> None:
        if isinstance(row, StreamedBook):
            book = row.book
            self.books[book.ticker] = _Book(
                dict(book.yes), dict(book.no), book.kind,
                book.exchange_time, book.receive_time, book.sequence,
            )  # fmt: skip
            return
        state = self.books.get(row.ticker)
        if state is None:
            return  # no full book of the market yet: its first comes with its first checkpoint
        change = row.change
        side = state.yes if change.side == Side.YES else state.no
        if change.size:
            side[change.price] = change.size
        else:
            side.pop(change.price, None)
        state.exchange_time, state.receive_time = change.exchange_time, change.receive_time
        state.sequence = change.sequence or None

    def add(self, row: BookStreamRow) -> None:
        self.observe(row)
        _, count = self.changed.get(row.ticker, (0, 0))
        self.changed[row.ticker] = (row.stream_id, count + 1)

    def flush(self) -> list[tuple[BookStreamRow, int]]:
        """Each changed market's book (one with no full book yet is left out), in the order of
        the last row folded into it; with how many rows it folds in."""
        flushed: list[tuple[BookStreamRow, int]] = []
        for ticker, (position, count) in sorted(self.changed.items(), key=lambda c: c[1][0]):
            state = self.books.get(ticker)
            if state is not None:
                flushed.append((StreamedBook(position, state.as_record(ticker)), count))
        self.changed.clear()
        return flushed

    def forget(self) -> None:
        """Rows were dropped: no book built so far is trusted until its next full book."""
        self.books.clear()
        self.changed.clear()
