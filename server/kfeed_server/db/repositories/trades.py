"""Public trades and feed gaps: keyset reads."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kfeed_server.db.models import feed_gaps_table, trades_table
from kfeed_server.db.repositories._common import (
    chunks,
    keyset_after,
    page_of,
    record_columns,
    rows_per_statement,
    time_range_page_query,
)
from kfeed_server.records import FeedGapRecord, Page, StreamedTrade, TradeRecord

TRADE_COLUMNS = record_columns(trades_table, TradeRecord)
FEED_GAP_COLUMNS = record_columns(feed_gaps_table, FeedGapRecord, {"gap_id": "id"})


class TradeRepository:
    """Reads of stored public trades (writes go through ``IngestWriter``)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def list_range(
        self,
        ticker: str,
        *,
        start: datetime | None,
        end: datetime | None,
        limit: int,
        after: tuple[datetime, str] | None = None,
        max_stream_id: int | None = None,
    ) -> Page[TradeRecord]:
        """Trades of ``ticker`` with ``start <= create_time < end`` ordered by (create_time,
        trade_id), after the keyset cursor ``after``; ``next_cursor`` is (create_time, trade_id)
        of the last row when more rows exist. With ``max_stream_id`` (a backtest's pinned
        position), only trades stored at or before it: ids increase in commit order."""
        c = trades_table.c
        selected = select(*TRADE_COLUMNS).where(c.ticker == ticker)
        if max_stream_id is not None:
            selected = selected.where(c.stream_id <= max_stream_id)
        statement = time_range_page_query(
            selected,
            c.create_time,
            c.trade_id,
            start=start,
            end=end,
            limit=limit,
            after=after,
        )
        async with self._sessions() as session:
            connection = await session.connection()
            rows = [TradeRecord(*row) for row in await connection.execute(statement)]
        return page_of(rows, limit, lambda last: (last.create_time, last.trade_id))

    async def list_after_id(
        self,
        after_id: int,
        *,
        tickers: Sequence[str] | None,
        limit: int,
        min_exchange_time: datetime | None = None,
    ) -> list[StreamedTrade]:
        """Trades with ``stream_id > after_id`` in stream-id order (StreamTrades replay and
        resume), of ``tickers`` (None: every market), optionally created at or after
        ``min_exchange_time``."""
        if tickers is not None and not tickers:
            return []
        c = trades_table.c
        statement = (
            select(c.stream_id, *TRADE_COLUMNS)
            .where(c.stream_id > after_id)
            .order_by(c.stream_id)
            .limit(limit)
        )
        if tickers is not None:
            statement = statement.where(c.ticker.in_(list(tickers)))
        if min_exchange_time is not None:
            statement = statement.where(c.create_time >= min_exchange_time)
        async with self._sessions() as session:
            connection = await session.connection()
            rows = await connection.execute(statement)
            return [StreamedTrade(stream_id, TradeRecord(*trade)) for stream_id, *trade in rows]

    async def max_stream_id(self) -> int:
        """The highest trade stream id; 0 when no trade is stored."""
        async with self._sessions() as session:
            connection = await session.connection()
            value = await connection.scalar(select(func.max(trades_table.c.stream_id)))
        return int(value or 0)

    async def latest_times(self, tickers: Sequence[str]) -> dict[str, datetime]:
        """The create time of the newest stored trade of each of ``tickers`` that has one."""
        c = trades_table.c
        latest: dict[str, datetime] = {}
        async with self._sessions() as session:
            connection = await session.connection()
            for chunk in chunks(list(tickers), rows_per_statement(1)):
                statement = (
                    select(c.ticker, func.max(c.create_time))
                    .where(c.ticker.in_(chunk))
                    .group_by(c.ticker)
                )
                rows = await connection.execute(statement)
                latest.update((ticker, time) for ticker, time in rows)
        return latest


class FeedGapRepository:
    """Reads of detected feed gaps (writes go through ``IngestWriter``)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def list_gaps(
        self, *, tickers: Sequence[str] | None, after_id: int, limit: int
    ) -> list[FeedGapRecord]:
        """Gaps with ``gap_id > after_id`` in id order, of ``tickers`` (None: all)."""
        if tickers is not None and not tickers:
            return []
        c = feed_gaps_table.c
        statement = select(*FEED_GAP_COLUMNS).where(c.id > after_id).order_by(c.id).limit(limit)
        if tickers is not None:
            statement = statement.where(c.ticker.in_(list(tickers)))
        async with self._sessions() as session:
            connection = await session.connection()
            return [FeedGapRecord(*row) for row in await connection.execute(statement)]

    async def overlapping(
        self, tickers: Sequence[str], start: datetime, end: datetime
    ) -> list[FeedGapRecord]:
        """Gaps of ``tickers`` or of no ticker (a whole subscription) that overlap [start, end):
        detected before ``end`` and not recovered by ``start``; in id order."""
        c = feed_gaps_table.c
        statement = (
            select(*FEED_GAP_COLUMNS)
            .where(_of_markets(tickers), c.detect_time < end, _open_after(start))
            .order_by(c.id)
        )
        async with self._sessions() as session:
            connection = await session.connection()
            return [FeedGapRecord(*row) for row in await connection.execute(statement)]

    async def list_newest_first(
        self,
        *,
        tickers: Sequence[str] | None,
        start: datetime | None,
        end: datetime | None,
        limit: int,
        before: tuple[datetime, int] | None = None,
    ) -> Page[FeedGapRecord]:
        """Gaps of ``tickers`` or of no ticker (None: every gap) still open at ``start`` and
        detected before ``end`` (None: unbounded), newest first by (detect_time, id), after the
        keyset cursor ``before``; ``next_cursor`` is the last row's (detect_time, id) when more
        rows exist."""
        c = feed_gaps_table.c
        statement = (
            select(*FEED_GAP_COLUMNS).order_by(c.detect_time.desc(), c.id.desc()).limit(limit + 1)
        )
        if tickers is not None:
            statement = statement.where(_of_markets(tickers))
        if start is not None:
            statement = statement.where(_open_after(start))
        if end is not None:
            statement = statement.where(c.detect_time < end)
        if before is not None:
            statement = statement.where(
                keyset_after((c.detect_time, c.id), before, descending=True)
            )
        async with self._sessions() as session:
            connection = await session.connection()
            rows = [FeedGapRecord(*row) for row in await connection.execute(statement)]
        return page_of(rows, limit, lambda last: (last.detect_time, last.gap_id))

    async def get_gaps(self, gap_ids: Sequence[int]) -> list[FeedGapRecord]:
        """The gaps with these ids, in id order (unknown ids are left out)."""
        c = feed_gaps_table.c
        found: list[FeedGapRecord] = []
        async with self._sessions() as session:
            connection = await session.connection()
            for chunk in chunks(sorted(set(gap_ids)), rows_per_statement(1)):
                statement = select(*FEED_GAP_COLUMNS).where(c.id.in_(chunk)).order_by(c.id)
                found.extend(FeedGapRecord(*row) for row in await connection.execute(statement))
        return found


def _of_markets(tickers: Sequence[str]) -> ColumnElement[bool]:
    """Gaps of ``tickers``, and gaps of a whole subscription (no ticker), which concern them too."""
    c = feed_gaps_table.c
    return or_(c.ticker.in_(list(tickers)), c.ticker == "")


def _open_after(start: datetime) -> ColumnElement[bool]:
    """Gaps not recovered by ``start``."""
    c = feed_gaps_table.c
    return or_(c.recover_time.is_(None), c.recover_time > start, c.recovered.is_(False))
