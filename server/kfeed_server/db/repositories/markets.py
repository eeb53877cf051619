"""Series, events and markets: metadata upserts and reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from kfeed_server.db.models import events_table, markets_table, series_table
from kfeed_server.db.repositories._common import (
    chunks,
    field_names,
    insert_for,
    page_of,
    record_columns,
    rows_per_statement,
)
from kfeed_server.records import EventRecord, MarketRecord, MarketStatus, Page, SeriesRecord

_MARKET_COLUMNS = record_columns(markets_table, MarketRecord)
_EVENT_COLUMNS = record_columns(events_table, EventRecord)
_SERIES_COLUMNS = record_columns(series_table, SeriesRecord)
_SERIES_TAGS = field_names(SeriesRecord).index("tags")


def _series_record(row: Sequence[Any]) -> SeriesRecord:
    """A series row as a record (tags come back as a JSON list)."""
    values = list(row)
    values[_SERIES_TAGS] = tuple(values[_SERIES_TAGS] or ())
    return SeriesRecord(*values)


async def upsert_rows(
    connection: AsyncConnection, table: Table, key: str, rows: Sequence[dict[str, Any]]
) -> int:
    """Insert ``rows`` or update the row with the same ``key`` where anything differs (the last
    of several rows with one key wins). Returns how many rows were inserted or changed, so a
    resent batch counts 0; ``update_time`` moves only when data changed."""
    latest_by_key = {row[key]: row for row in rows}
    if not latest_by_key:
        return 0
    now = datetime.now(UTC)
    deduplicated = [{**row, "update_time": now} for row in latest_by_key.values()]
    compared = [name for name in deduplicated[0] if name not in (key, "update_time")]
    statement = insert_for(connection, table)
    excluded = statement.excluded
    statement = statement.on_conflict_do_update(
        index_elements=[table.c[key]],
        set_={name: excluded[name] for name in [*compared, "update_time"]},
        where=or_(*(table.c[name].is_distinct_from(excluded[name]) for name in compared)),
    ).returning(table.c[key])
    changed = 0
    for chunk in chunks(deduplicated, rows_per_statement(len(deduplicated[0]))):
        result = await connection.execute(statement, list(chunk))
        changed += len(result.all())
    return changed


def series_rows(series: Sequence[SeriesRecord]) -> list[dict[str, Any]]:
    """Column values of ``series`` (tags as a JSON list)."""
    return [{**dataclasses.asdict(s), "tags": list(s.tags)} for s in series]


def record_rows(records: Sequence[Any], *, exclude: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Column values of dataclass ``records`` whose field names are the column names."""
    rows = [dataclasses.asdict(r) for r in records]
    for row in rows:
        for name in exclude:
            row.pop(name, None)
    return rows


class MarketRepository:
    """Series, events and markets. Writes are upserts keyed by ticker: newer data wins."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def upsert_series(self, series: list[SeriesRecord]) -> int:
        """Insert or update series; returns how many were new or changed."""
        async with self._sessions.begin() as session:
            connection = await session.connection()
            return await upsert_rows(connection, series_table, "ticker", series_rows(series))

    async def upsert_events(self, events: list[EventRecord]) -> int:
        """Insert or update events; returns how many were new or changed."""
        async with self._sessions.begin() as session:
            connection = await session.connection()
            return await upsert_rows(connection, events_table, "event_ticker", record_rows(events))

    async def upsert_markets(self, markets: list[MarketRecord]) -> int:
        """Insert or update markets; returns how many were new or changed."""
        async with self._sessions.begin() as session:
            connection = await session.connection()
            rows = record_rows(markets, exclude=("update_time",))
            return await upsert_rows(connection, markets_table, "ticker", rows)

    async def get_market(self, ticker: str) -> MarketRecord | None:
        """The market ``ticker``, or None when unknown."""
        async with self._sessions() as session:
            connection = await session.connection()
            statement = select(*_MARKET_COLUMNS).where(markets_table.c.ticker == ticker)
            row = (await connection.execute(statement)).first()
        return None if row is None else MarketRecord(*row)

    async def list_markets(
        self,
        *,
        limit: int,
        after_ticker: str | None = None,
        event_ticker: str | None = None,
        series_ticker: str | None = None,
        statuses: Sequence[MarketStatus] = (),
    ) -> Page[MarketRecord]:
        """Markets ordered by ticker, after ``after_ticker``, filtered by event, series and any of
        ``statuses``. ``next_cursor`` is ``(last_ticker,)`` when more rows exist."""
        statement = select(*_MARKET_COLUMNS).order_by(markets_table.c.ticker).limit(limit + 1)
        if after_ticker is not None:
            statement = statement.where(markets_table.c.ticker > after_ticker)
        if event_ticker is not None:
            statement = statement.where(markets_table.c.event_ticker == event_ticker)
        if series_ticker is not None:
            statement = statement.where(markets_table.c.series_ticker == series_ticker)
        if statuses:
            statement = statement.where(markets_table.c.status.in_([int(s) for s in statuses]))
        async with self._sessions() as session:
            connection = await session.connection()
            rows = [MarketRecord(*row) for row in await connection.execute(statement)]
        return page_of(rows, limit, lambda last: (last.ticker,))

    async def get_event(self, event_ticker: str) -> EventRecord | None:
        """The event ``event_ticker``, or None when unknown."""
        statement = select(*_EVENT_COLUMNS).where(events_table.c.event_ticker == event_ticker)
        async with self._sessions() as session:
            connection = await session.connection()
            row = (await connection.execute(statement)).first()
        return None if row is None else EventRecord(*row)

    async def list_events(
        self, *, limit: int, after_event_ticker: str | None = None, series_ticker: str | None = None
    ) -> Page[EventRecord]:
        """Events ordered by event ticker, after ``after_event_ticker``, of ``series_ticker``
        when given. ``next_cursor`` is ``(last_event_ticker,)`` when more rows exist."""
        c = events_table.c
        statement = select(*_EVENT_COLUMNS).order_by(c.event_ticker).limit(limit + 1)
        if after_event_ticker is not None:
            statement = statement.where(c.event_ticker > after_event_ticker)
        if series_ticker is not None:
            statement = statement.where(c.series_ticker == series_ticker)
        async with self._sessions() as session:
            connection = await session.connection()
            rows = [EventRecord(*row) for row in await connection.execute(statement)]
        return page_of(rows, limit, lambda last: (last.event_ticker,))

    async def markets_of_event(self, event_ticker: str) -> list[MarketRecord]:
        """Every market of the event, ordered by ticker."""
        c = markets_table.c
        statement = (
            select(*_MARKET_COLUMNS).where(c.event_ticker == event_ticker).order_by(c.ticker)
        )
        async with self._sessions() as session:
            connection = await session.connection()
            return [MarketRecord(*row) for row in await connection.execute(statement)]

    async def get_series(self, ticker: str) -> SeriesRecord | None:
        """The series ``ticker``, or None when unknown."""
        statement = select(*_SERIES_COLUMNS).where(series_table.c.ticker == ticker)
        async with self._sessions() as session:
            connection = await session.connection()
            row = (await connection.execute(statement)).first()
        return None if row is None else _series_record(row)

    async def list_series(
        self, *, limit: int, after_ticker: str | None = None, category: str | None = None
    ) -> Page[SeriesRecord]:
        """Series ordered by ticker, after ``after_ticker``, in ``category`` when given.
        ``next_cursor`` is ``(last_ticker,)`` when more rows exist."""
        c = series_table.c
        statement = select(*_SERIES_COLUMNS).order_by(c.ticker).limit(limit + 1)
        if after_ticker is not None:
            statement = statement.where(c.ticker > after_ticker)
        if category is not None:
            statement = statement.where(c.category == category)
        async with self._sessions() as session:
            connection = await session.connection()
            rows = [_series_record(row) for row in await connection.execute(statement)]
        return page_of(rows, limit, lambda last: (last.ticker,))

    async def get_markets(self, tickers: Sequence[str]) -> list[MarketRecord]:
        """The known markets among ``tickers``, in no particular order."""
        found: list[MarketRecord] = []
        async with self._sessions() as session:
            connection = await session.connection()
            for chunk in chunks(list(dict.fromkeys(tickers)), rows_per_statement(1)):
                statement = select(*_MARKET_COLUMNS).where(markets_table.c.ticker.in_(chunk))
                found.extend(MarketRecord(*row) for row in await connection.execute(statement))
        return found

    async def existing_tickers(self, tickers: Sequence[str]) -> set[str]:
        """Which of ``tickers`` are known markets."""
        found: set[str] = set()
        async with self._sessions() as session:
            connection = await session.connection()
            for chunk in chunks(list(dict.fromkeys(tickers)), rows_per_statement(1)):
                statement = select(markets_table.c.ticker).where(markets_table.c.ticker.in_(chunk))
                found.update((await connection.scalars(statement)).all())
        return found

    async def tickers_matching(
        self, *, event_ticker: str | None, series_ticker: str | None
    ) -> list[str]:
        """Tickers of the markets in an event and/or a series, sorted (both None: every market)."""
        statement = select(markets_table.c.ticker).order_by(markets_table.c.ticker)
        if event_ticker is not None:
            statement = statement.where(markets_table.c.event_ticker == event_ticker)
        if series_ticker is not None:
            statement = statement.where(markets_table.c.series_ticker == series_ticker)
        async with self._sessions() as session:
            connection = await session.connection()
            return list((await connection.scalars(statement)).all())
