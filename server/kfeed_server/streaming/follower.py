"""Getting committed batches to the stream hub, in snapshot-id order.

On SQLite one process writes and serves, so the ingest servicer publishes each batch to the hub
right after its commit (``DirectPublisher``). On PostgreSQL several servers may share the
database — any of them taking ingest, all of them serving streams — so every batch reaches every
hub the same way: through its commit notice (``db.commits``), in commit order (``CommitFollower``).
A server's own batches skip the database read: it keeps what it wrote until its notice arrives.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from kfeed_server.db.commits import CommitNotice, Resync
from kfeed_server.db.repositories.ingest import BatchWriteResult
from kfeed_server.records import (
    BookStreamRow,
    FeedGapRecord,
    MarketRecord,
    SnapshotRecord,
    StreamedTrade,
)
from kfeed_server.streaming.hub import SnapshotHub

log = logging.getLogger(__name__)

# Rows read per query when catching up after notices may have been missed.
CATCH_UP_PAGE = 10_000
# Own batches kept for their notices; beyond this the oldest are dropped (and, if their notice
# still comes, read back from the database).
MAX_PENDING_OWN_BATCHES = 1_000
# How long an own batch's notice waits for the servicer to hand the batch over.
OWN_BATCH_WAIT_SECONDS = 2.0


class LivePublisher(Protocol):
    """Where the ingest servicer hands each committed batch (and the markets it stored)."""

    def committed(self, markets: Sequence[MarketRecord], result: BatchWriteResult) -> None: ...


class DirectPublisher:
    """Publishes each batch as it is committed: the one-process (SQLite) case."""

    def __init__(self, hub: SnapshotHub) -> None:
        self._hub = hub

    def committed(self, markets: Sequence[MarketRecord], result: BatchWriteResult) -> None:
        self._hub.remember_markets(markets)
        self._hub.publish(
            result.stored_snapshots, result.stored_gaps, result.stored_trades, result.stored_books
        )


class CommittedRows(Protocol):
    """The reads the follower needs (the repositories provide them)."""

    async def max_snapshot_id(self) -> int: ...

    async def list_id_range(self, after_id: int, last_id: int) -> list[SnapshotRecord]: ...

    async def list_after_id(
        self, after_id: int, *, tickers: Sequence[str] | None, limit: int
    ) -> list[SnapshotRecord]: ...


class CommittedTrades(Protocol):
    """The trade reads the follower needs (by stream id)."""

    async def max_stream_id(self) -> int: ...

    async def list_after_id(
        self, after_id: int, *, tickers: Sequence[str] | None, limit: int
    ) -> list[StreamedTrade]: ...


class CommittedBookRows(Protocol):
    """The order-book reads the follower needs (by stream id)."""

    async def max_stream_id(self) -> int: ...

    async def list_after_id(
        self, after_id: int, *, tickers: Sequence[str] | None, limit: int
    ) -> list[BookStreamRow]: ...


class GapsById(Protocol):
    async def get_gaps(self, gap_ids: Sequence[int]) -> list[FeedGapRecord]: ...


class MarketsByTicker(Protocol):
    async def get_markets(self, tickers: Sequence[str]) -> list[MarketRecord]: ...


class CommitFollower:
    """Publishes committed batches to ``hub`` in commit order, from commit notices."""

    def __init__(
        self,
        hub: SnapshotHub,
        rows: CommittedRows,
        gaps: GapsById,
        markets: MarketsByTicker,
        origin: str,
        trades: CommittedTrades,
        books: CommittedBookRows,
    ) -> None:
        self._hub = hub
        self._rows = rows
        self._trades = trades
        self._books = books
        self._gaps = gaps
        self._markets = markets
        self._origin = origin
        # Set once listening has started and what came before is published.
        self.listening = asyncio.Event()
        # The highest snapshot id published; rows at or below it are never published again.
        self._published_id: int | None = None
        # The same for trade and order-book stream ids.
        self._published_trade_id = 0
        self._published_book_id = 0
        # This process's batches by notice batch number, until their notice arrives.
        self._own: OrderedDict[int, BatchWriteResult] = OrderedDict()
        self._own_added = asyncio.Event()
        self._last_own_batch = 0
        self._last_own_batch_was_kept = False
        self._needs_catch_up = False

    def committed(self, markets: Sequence[MarketRecord], result: BatchWriteResult) -> None:
        self._hub.remember_markets(markets)
        batch = result.notice_batch
        if batch is None or batch <= self._last_own_batch:
            return  # nothing to publish, or its notice came first and was read from the database
        self._own[batch] = result
        self._own_added.set()
        if len(self._own) > MAX_PENDING_OWN_BATCHES:
            self._own.popitem(last=False)

    async def follow(self, notices: AsyncIterator[CommitNotice | Resync]) -> None:
        """Publish what ``notices`` announce, until they end or this is cancelled."""
        if self._published_id is None:
            self._published_id = await self._rows.max_snapshot_id()
            self._published_trade_id = await self._trades.max_stream_id()
            self._published_book_id = await self._books.max_stream_id()
        async for notice in notices:
            try:
                if isinstance(notice, Resync) or self._needs_catch_up:
                    await self._catch_up()
                    self.listening.set()
                if isinstance(notice, CommitNotice):
                    await self._apply(notice)
            except Exception:  # a failed read must not end the live feed of every stream
                log.exception("commit follower: could not publish %r; catching up next", notice)
                self._needs_catch_up = True

    async def _apply(self, notice: CommitNotice) -> None:
        own: BatchWriteResult | None = None
        if notice.origin == self._origin:
            if notice.batch < self._last_own_batch:
                return
            if notice.batch == self._last_own_batch:  # a further gaps part of that batch
                if self._last_own_batch_was_kept:
                    return  # published in full with the first part
            else:
                own = await self._own_batch(notice.batch)
                self._last_own_batch = notice.batch
                self._last_own_batch_was_kept = own is not None
        if own is not None:
            await self._publish(
                own.stored_snapshots, own.stored_gaps, own.stored_trades, own.stored_books
            )
            return
        snapshots: list[SnapshotRecord] = []
        if notice.first_snapshot_id:
            snapshots = await self._rows.list_id_range(
                notice.first_snapshot_id - 1, notice.last_snapshot_id
            )
        gaps = await self._gaps.get_gaps(notice.gap_ids) if notice.gap_ids else []
        trades: list[StreamedTrade] = []
        if notice.first_trade_id:
            trades = await self._trades.list_after_id(
                notice.first_trade_id - 1,
                tickers=None,
                limit=notice.last_trade_id - notice.first_trade_id + 1,
            )
        books: list[BookStreamRow] = []
        if notice.first_book_id:
            books = await self._books.list_after_id(
                notice.first_book_id - 1,
                tickers=None,
                limit=notice.last_book_id - notice.first_book_id + 1,
            )
        await self._publish(snapshots, gaps, trades, books)

    async def _own_batch(self, batch: int) -> BatchWriteResult | None:
        """This process's batch ``batch``. Its notice can come before the servicer hands the
        batch over (both follow the commit), so wait for it a moment; None: read it back."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OWN_BATCH_WAIT_SECONDS
        while (result := self._own.pop(batch, None)) is None:
            self._own_added.clear()
            try:
                await asyncio.wait_for(self._own_added.wait(), deadline - loop.time())
            except TimeoutError:
                return None
        return result

    async def _catch_up(self) -> None:
        """Publish every committed snapshot above the last one published (notices may have been
        missed). Gaps changed meanwhile are not recovered; streams learn of later ones."""
        self._needs_catch_up = False
        self._own.clear()  # what they hold is read back below; later batches come by notice
        assert self._published_id is not None
        while True:
            page = await self._rows.list_after_id(
                self._published_id, tickers=None, limit=CATCH_UP_PAGE
            )
            await self._publish(page, [])
            if len(page) < CATCH_UP_PAGE:
                break
        while True:
            trades = await self._trades.list_after_id(
                self._published_trade_id, tickers=None, limit=CATCH_UP_PAGE
            )
            await self._publish([], [], trades)
            if len(trades) < CATCH_UP_PAGE:
                break
        while True:
            books = await self._books.list_after_id(
                self._published_book_id, tickers=None, limit=CATCH_UP_PAGE
            )
            await self._publish([], [], books=books)
            if len(books) < CATCH_UP_PAGE:
                return

    async def _publish(
        self,
        snapshots: list[SnapshotRecord],
        gaps: list[FeedGapRecord],
        trades: Sequence[StreamedTrade] = (),
        books: Sequence[BookStreamRow] = (),
    ) -> None:
        published = self._published_id or 0
        fresh = [s for s in snapshots if s.snapshot_id > published]
        fresh_trades = [t for t in trades if t.stream_id > self._published_trade_id]
        fresh_books = [b for b in books if b.stream_id > self._published_book_id]
        tickers = (
            {s.ticker for s in fresh}
            | {t.ticker for t in fresh_trades}
            | {b.ticker for b in fresh_books}
        )
        unknown = self._hub.unknown_tickers(tickers)
        if unknown:  # markets another server stored: event and series selectors need them
            self._hub.remember_markets(await self._markets.get_markets(sorted(unknown)))
        self._hub.publish(fresh, gaps, fresh_trades, fresh_books)
        if fresh:
            self._published_id = max(s.snapshot_id for s in fresh)
        if fresh_trades:
            self._published_trade_id = fresh_trades[-1].stream_id
        if fresh_books:
            self._published_book_id = fresh_books[-1].stream_id
