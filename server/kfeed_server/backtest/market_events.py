"""The recorded books and public trades a run replays besides its snapshots.

The stored order books (checkpoints and level changes, ADR 0017) become one ``BookState`` per
instant at which a market's book changed, plus the book in force at the window's start (placed at
the start). Trades come as stored. ``window_events`` merges every market's books and trades into
one stream in exchange-time order; at one instant trades come before books, and the feeder puts
both before the snapshots of that instant, so a decision at a snapshot sees the book of its
instant and a resting order's queue has already been consumed by the trades of that instant.

Which runs read them (``reads_books`` / ``reads_trades``): books for the DEPTH fill model or a
strategy with ``on_book``; trades for every run on the event engine (the queue model of resting
orders and ``on_trade``) and the compiled ``spread_maker`` (its queue model); the rest of the
compiled path reads neither. A book's feed gaps are not guessed over: a LOST checkpoint keeps the
last known book (as GetOrderBook returns it) until the next START or RESYNC, and the run's
data-quality report counts the gap.

Both are pinned like the snapshots (``EventPins``): a run reads the rows stored up to the highest
stream ids of the books and trades when it started, so rows committed while it reads do not change
what it reads (a trade's later refinement of its time, which keeps its id, is the exception).
"""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from kfeed_server.backtest.books import BookState, ReplayedEvent, event_time
from kfeed_server.backtest.config import COMPILED_WITH_TRADES, fast_path_applies
from kfeed_server.backtest.fees import MarketFees
from kfeed_server.backtest.strategy import Strategy, StrategyRegistry, default_registry
from kfeed_server.db.repositories.books import OrderBookRepository
from kfeed_server.db.repositories.trades import TradeRepository
from kfeed_server.records import (
    BookChangeRecord,
    BookCheckpointRecord,
    Side,
)
from kfeed_server.records.backtest import EngineConfig, FillModel

EVENT_PAGE = 4_096
"""Rows per read of the books and trades."""


def reads_books(config: EngineConfig, registry: StrategyRegistry = default_registry) -> bool:
    """Whether a run of ``config`` replays the recorded books."""
    if FillModel(config.fill_model) is FillModel.DEPTH:
        return True
    return registry.get(config.strategy).on_book is not Strategy.on_book


def reads_trades(config: EngineConfig, fees: Mapping[str, MarketFees]) -> bool:
    """Whether a run of ``config`` with its markets' ``fees`` replays the public trades: every
    run on the event engine, and the compiled ones whose strategy queues resting orders."""
    return not fast_path_applies(config, fees) or config.strategy in COMPILED_WITH_TRADES


class BookFold:
    """Folds one market's replay rows (``OrderBookRepository.replay_rows``) into the book at each
    instant: a checkpoint replaces the book, a change sets one level. Nothing comes out before
    the first checkpoint (the book is unknown), and the instants before ``start`` come out as one
    book placed at ``start``."""

    def __init__(self, ticker: str, start: datetime) -> None:
        self._ticker = ticker
        self._start = start
        self._sides: tuple[dict[int, int], dict[int, int]] | None = None
        self._instant: datetime | None = None  # of changes applied but not yet given out

    def add(self, row: BookCheckpointRecord | BookChangeRecord) -> BookState | None:
        """Applies ``row``; the book of the instant before it when ``row`` starts a new one."""
        instant, ready = self._instant, None
        if instant is not None and row.exchange_time > instant and row.exchange_time > self._start:
            ready = self.finish()
        if isinstance(row, BookCheckpointRecord):
            self._sides = (dict(row.yes), dict(row.no))
        elif self._sides is not None:
            side = self._sides[0] if row.side is Side.YES else self._sides[1]
            if row.size:
                side[row.price] = row.size
            else:
                side.pop(row.price, None)
        if self._sides is not None:
            self._instant = row.exchange_time
        return ready

    def finish(self) -> BookState | None:
        """The book of the last instant added, if not given out yet."""
        instant, self._instant = self._instant, None
        if instant is None or self._sides is None:
            return None
        yes, no = self._sides
        return BookState(
            self._ticker,
            max(instant, self._start),
            tuple(sorted(yes.items(), reverse=True)),
            tuple(sorted(no.items(), reverse=True)),
        )


@dataclass(frozen=True, slots=True)
class EventPins:
    """The stored positions a run reads books and trades up to (their highest stream ids when
    it started; None: unpinned), as its snapshots are read up to the highest snapshot id: rows
    committed while the run reads are not seen, so a rerun over the same pins reads the same
    rows and gets the same fingerprint."""

    books: int | None = None
    trades: int | None = None


UNPINNED = EventPins()


async def _books(
    repository: OrderBookRepository, ticker: str, start: datetime, end: datetime, pinned: int | None
) -> AsyncIterator[ReplayedEvent]:
    fold = BookFold(ticker, start)
    async for rows in repository.replay_rows(
        ticker, start, end, chunk_size=EVENT_PAGE, max_stream_id=pinned
    ):
        for row in rows:
            book = fold.add(row)
            if book is not None:
                yield book
    last = fold.finish()
    if last is not None:
        yield last


async def _trades(
    repository: TradeRepository, ticker: str, start: datetime, end: datetime, pinned: int | None
) -> AsyncIterator[ReplayedEvent]:
    after: tuple[datetime, str] | None = None
    while True:
        page = await repository.list_range(
            ticker, start=start, end=end, limit=EVENT_PAGE, after=after, max_stream_id=pinned
        )
        for trade in page.items:
            yield trade
        if page.next_cursor is None:
            return
        last = page.items[-1]
        after = (last.create_time, last.trade_id)


def _order(event: ReplayedEvent) -> tuple[datetime, int, str]:
    # At one instant: trades, then books (then, in the feeder, the snapshots).
    return (event_time(event), isinstance(event, BookState), event.ticker)


async def window_events(
    books: OrderBookRepository | None,
    trades: TradeRepository | None,
    tickers: Sequence[str],
    start: datetime,
    end: datetime,
    pins: EventPins = UNPINNED,
) -> AsyncIterator[ReplayedEvent]:
    """The books (when ``books`` is given) and trades (when ``trades`` is given) of ``tickers``
    in ``[start, end)`` stored up to ``pins``, merged in time order (see the module
    docstring)."""
    sources: list[AsyncIterator[ReplayedEvent]] = []
    for ticker in tickers:
        if books is not None:
            sources.append(_books(books, ticker, start, end, pins.books))
        if trades is not None:
            sources.append(_trades(trades, ticker, start, end, pins.trades))
    heap: list[tuple[tuple[datetime, int, str], int, ReplayedEvent]] = []
    for index, source in enumerate(sources):
        first = await anext(source, None)
        if first is not None:
            heap.append((_order(first), index, first))
    heapq.heapify(heap)
    while heap:
        _, index, event = heap[0]
        following = await anext(sources[index], None)
        if following is None:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (_order(following), index, following))
        yield event


class EventCursor:
    """Takes events from a time-ordered stream up to an instant at a time."""

    def __init__(self, events: AsyncIterator[ReplayedEvent]) -> None:
        self._events = events
        self._next: ReplayedEvent | None = None
        self._done = False

    async def until(self, moment: datetime | None) -> list[ReplayedEvent]:
        """The events not taken yet at or before ``moment`` (None: all of them)."""
        taken: list[ReplayedEvent] = []
        while not self._done:
            if self._next is None:
                self._next = await anext(self._events, None)
                if self._next is None:
                    self._done = True
                    break
            if moment is not None and event_time(self._next) > moment:
                break
            taken.append(self._next)
            self._next = None
        return taken
