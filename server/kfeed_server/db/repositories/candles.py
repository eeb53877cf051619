"""What candles are computed from: a market's top-of-book points and trades, in time order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kfeed_server.db.models import snapshots_table, trades_table
from kfeed_server.db.repositories._common import record_columns
from kfeed_server.records import BookPoint, TradePoint

_BOOK_COLUMNS = record_columns(snapshots_table, BookPoint, {"snapshot_id": "id"})
_TRADE_COLUMNS = record_columns(trades_table, TradePoint, {"size": "count"})
# Rows handed to the aggregation at a time: memory stays bounded however long the window.
STREAM_CHUNK_ROWS = 10_000

_s = snapshots_table.c
_t = trades_table.c


class CandleSourceRepository:
    """Reads of the snapshot and trade columns candles need, in (time, id) order."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def book_state_at(self, ticker: str, time: datetime) -> BookPoint | None:
        """The snapshot in force at ``time``: the last with ``exchange_time <= time`` in
        (exchange_time, snapshot_id) order, or None when the market had none yet."""
        statement = (
            select(*_BOOK_COLUMNS)
            .where(_s.ticker == ticker, _s.exchange_time <= time)
            .order_by(_s.exchange_time.desc(), _s.id.desc())
            .limit(1)
        )
        async with self._sessions() as session:
            connection = await session.connection()
            row = (await connection.execute(statement)).first()
        return None if row is None else BookPoint._make(row)

    def book_points(
        self, ticker: str, *, after: datetime, before: datetime
    ) -> AsyncIterator[list[BookPoint]]:
        """Snapshots with ``after < exchange_time < before`` in (exchange_time, snapshot_id)
        order, in chunks."""
        statement = (
            select(*_BOOK_COLUMNS)
            .where(_s.ticker == ticker, _s.exchange_time > after, _s.exchange_time < before)
            .order_by(_s.exchange_time, _s.id)
        )
        return self._stream(statement, BookPoint._make)

    def trade_points(
        self, ticker: str, *, start: datetime, before: datetime
    ) -> AsyncIterator[list[TradePoint]]:
        """Trades with ``start <= create_time < before`` in (create_time, trade_id) order, in
        chunks."""
        statement = (
            select(*_TRADE_COLUMNS)
            .where(_t.ticker == ticker, _t.create_time >= start, _t.create_time < before)
            .order_by(_t.create_time, _t.trade_id)
        )
        return self._stream(statement, TradePoint._make)

    async def _stream(self, statement: Select[Any], make: Any) -> AsyncIterator[list[Any]]:
        async with self._sessions() as session:
            connection = await session.connection()
            result = await connection.stream(statement)
            async for rows in result.partitions(STREAM_CHUNK_ROWS):
                yield list(map(make, rows))
