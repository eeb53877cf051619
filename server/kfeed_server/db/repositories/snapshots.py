"""Market snapshots: latest, time ranges with keyset pagination, replay by id, backtest reads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, Text, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from kfeed_server.db.models import snapshots_table
from kfeed_server.db.repositories._common import (
    is_postgresql,
    page_of,
    record_columns,
    time_range_page_query,
)
from kfeed_server.records import Page, SnapshotRecord

SNAPSHOT_COLUMNS = record_columns(snapshots_table, SnapshotRecord, {"snapshot_id": "id"})

_s = snapshots_table.c


def _distinct_snapshot_tickers() -> tuple[Any, ColumnElement[str]]:
    """Every ticker with snapshots, by a loose index scan (one index probe per ticker) instead of
    a scan of the whole table, which neither database's DISTINCT avoids."""
    first = snapshots_table.alias("first_ticker")
    following = snapshots_table.alias("next_ticker")
    first_ticker = select(first.c.ticker).order_by(first.c.ticker).limit(1).scalar_subquery()
    tickers = select(first_ticker.label("ticker")).cte("snapshot_tickers", recursive=True)
    next_ticker = (
        select(following.c.ticker)
        .where(following.c.ticker > tickers.c.ticker)
        .order_by(following.c.ticker)
        .limit(1)
        .scalar_subquery()
    )
    tickers = tickers.union_all(
        select(next_ticker.label("ticker")).where(tickers.c.ticker.is_not(None))
    )
    return tickers, tickers.c.ticker


def _ticker_list(connection: AsyncConnection, tickers: Sequence[str]) -> tuple[Any, Any]:
    """``tickers`` as a one-column row source: a bound array on PostgreSQL, JSON on SQLite."""
    if is_postgresql(connection):
        values = bindparam("tickers", list(tickers), type_=ARRAY(Text()))
        source = func.unnest(values).table_valued("ticker").render_derived()
        return source, source.c.ticker
    source = func.json_each(json.dumps(list(tickers))).table_valued("value")
    return source, source.c.value


async def latest_per_market(
    connection: AsyncConnection, tickers: Sequence[str] | None
) -> list[SnapshotRecord]:
    """The latest snapshot (highest (exchange_time, id)) of each market, sorted by ticker.

    One backward index probe per ticker on ``(ticker, exchange_time, id)``: the cost grows with
    the number of markets, not with the history stored."""
    if tickers is not None and not tickers:
        return []
    source, ticker = (
        _distinct_snapshot_tickers() if tickers is None else _ticker_list(connection, tickers)
    )
    newest = snapshots_table.alias("newest")
    latest_id = (
        select(newest.c.id)
        .where(newest.c.ticker == ticker)
        .order_by(newest.c.exchange_time.desc(), newest.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    statement = (
        select(*SNAPSHOT_COLUMNS)
        .where(_s.id.in_(select(latest_id).select_from(source)))
        .order_by(_s.ticker)
    )
    return list(map(SnapshotRecord._make, await connection.execute(statement)))


def _backtest_window(
    tickers: Sequence[str],
    start: datetime | None,
    end: datetime | None,
    max_snapshot_id: int | None,
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [_s.ticker.in_(list(tickers))]
    if start is not None:
        conditions.append(_s.exchange_time >= start)
    if end is not None:
        conditions.append(_s.exchange_time < end)
    if max_snapshot_id is not None:
        conditions.append(_s.id <= max_snapshot_id)
    return conditions


class SnapshotRepository:
    """Reads of stored snapshots (writes go through ``IngestWriter``)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def _all(self, statement: Select[Any]) -> list[SnapshotRecord]:
        async with self._sessions() as session:
            connection = await session.connection()
            return list(map(SnapshotRecord._make, await connection.execute(statement)))

    async def latest(self, ticker: str) -> SnapshotRecord | None:
        """The market's latest snapshot (highest (exchange_time, snapshot_id)), or None."""
        statement = (
            select(*SNAPSHOT_COLUMNS)
            .where(_s.ticker == ticker)
            .order_by(_s.exchange_time.desc(), _s.id.desc())
            .limit(1)
        )
        found = await self._all(statement)
        return found[0] if found else None

    async def latest_per_market(self, tickers: Sequence[str] | None) -> list[SnapshotRecord]:
        """The latest snapshot of each of ``tickers`` that has one (None: of every market),
        sorted by ticker."""
        async with self._sessions() as session:
            return await latest_per_market(await session.connection(), tickers)

    async def list_range(
        self,
        ticker: str,
        *,
        start: datetime | None,
        end: datetime | None,
        limit: int,
        after: tuple[datetime, int] | None = None,
    ) -> Page[SnapshotRecord]:
        """Snapshots of ``ticker`` with ``start <= exchange_time < end``, ordered by
        (exchange_time, snapshot_id), after the keyset cursor ``after``. ``next_cursor`` is
        (exchange_time, snapshot_id) of the last row when more rows exist."""
        statement = time_range_page_query(
            select(*SNAPSHOT_COLUMNS).where(_s.ticker == ticker),
            _s.exchange_time,
            _s.id,
            start=start,
            end=end,
            limit=limit,
            after=after,
        )
        rows = await self._all(statement)
        return page_of(rows, limit, lambda last: (last.exchange_time, last.snapshot_id))

    async def list_after_id(
        self,
        after_id: int,
        *,
        tickers: Sequence[str] | None,
        limit: int,
        min_exchange_time: datetime | None = None,
    ) -> list[SnapshotRecord]:
        """Snapshots with ``snapshot_id > after_id`` in id order (stream replay and resume),
        of ``tickers`` (None: every market), optionally not older than ``min_exchange_time``."""
        if tickers is not None and not tickers:
            return []
        statement = select(*SNAPSHOT_COLUMNS).where(_s.id > after_id).order_by(_s.id).limit(limit)
        if tickers is not None:
            statement = statement.where(_s.ticker.in_(list(tickers)))
        if min_exchange_time is not None:
            statement = statement.where(_s.exchange_time >= min_exchange_time)
        return await self._all(statement)

    async def list_id_range(self, after_id: int, last_id: int) -> list[SnapshotRecord]:
        """Snapshots with ``after_id < snapshot_id <= last_id``, in id order."""
        statement = (
            select(*SNAPSHOT_COLUMNS).where(_s.id > after_id, _s.id <= last_id).order_by(_s.id)
        )
        return await self._all(statement)

    async def max_snapshot_id(self) -> int:
        """The highest stored snapshot id; 0 when there is none."""
        async with self._sessions() as session:
            connection = await session.connection()
            value = await connection.scalar(select(func.max(_s.id)))
        return int(value or 0)

    # The name the stream feed reads it by (streaming.feed.RowSource).
    max_stream_id = max_snapshot_id

    async def count_for_backtest(
        self,
        tickers: Sequence[str],
        start: datetime,
        end: datetime,
        *,
        max_snapshot_id: int | None = None,
    ) -> int:
        """How many snapshots a backtest over these arguments reads
        (``ArrowExportReader.snapshots_for_backtest``)."""
        if not tickers:
            return 0
        statement = select(func.count()).where(
            *_backtest_window(tickers, start, end, max_snapshot_id)
        )
        async with self._sessions() as session:
            connection = await session.connection()
            return int(await connection.scalar(statement) or 0)
