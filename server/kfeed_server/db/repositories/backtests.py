"""Backtests: runs, their executions (trade-level audit) and equity curves."""

from __future__ import annotations

import builtins
import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kfeed_server.db.models import backtests_table, equity_points_table, executions_table
from kfeed_server.db.repositories._common import (
    chunks,
    insert_for,
    keyset_after,
    page_of,
    record_columns,
    rows_per_statement,
)
from kfeed_server.db.repositories.backtest_documents import (
    config_document,
    config_from_document,
    folds_document,
    folds_from_document,
    metrics_document,
    metrics_from_document,
    quality_document,
    quality_from_document,
    sweep_document,
    sweep_from_document,
)
from kfeed_server.records import BacktestState, EquityPointRecord, ExecutionRecord, Page
from kfeed_server.records.backtest import BacktestRecord

# Fields stored as JSON documents (the strategy column is written from the configuration).
_DOCUMENT_FIELDS = (
    "config",
    "sweep",
    "metrics",
    "ranked_child_ids",
    "data_quality",
    "walk_forward_folds",
)
_BACKTEST_FIELDS = frozenset(f.name for f in dataclasses.fields(BacktestRecord))
_PLAIN_FIELDS = tuple(
    f.name for f in dataclasses.fields(BacktestRecord) if f.name not in _DOCUMENT_FIELDS
)
_BACKTEST_COLUMNS = [backtests_table.c[name] for name in (*_PLAIN_FIELDS, *_DOCUMENT_FIELDS)]
_EXECUTION_COLUMNS = record_columns(executions_table, ExecutionRecord)
_EQUITY_COLUMNS = record_columns(equity_points_table, EquityPointRecord)
_PLAIN_COUNT = len(_PLAIN_FIELDS)


def _backtest_from_row(row: Row[Any]) -> BacktestRecord:
    plain = dict(zip(_PLAIN_FIELDS, row[:_PLAIN_COUNT], strict=True))
    config, sweep, metrics, ranked, quality, folds = row[_PLAIN_COUNT:]
    return BacktestRecord(
        **plain,
        config=config_from_document(config),
        sweep=None if sweep is None else sweep_from_document(sweep),
        metrics=None if metrics is None else metrics_from_document(metrics),
        ranked_child_ids=tuple(ranked),
        data_quality=None if quality is None else quality_from_document(quality),
        walk_forward_folds=folds_from_document(folds or []),
    )


def _column_values(values: dict[str, Any]) -> dict[str, Any]:
    """Record field values as column values (the typed fields as their documents)."""
    columns = dict(values)
    if "config" in columns:
        config = columns["config"]
        columns["config"] = config_document(config)
        columns["strategy"] = config.strategy
    if "sweep" in columns:
        sweep = columns["sweep"]
        columns["sweep"] = None if sweep is None else sweep_document(sweep)
    if "metrics" in columns:
        metrics = columns["metrics"]
        columns["metrics"] = None if metrics is None else metrics_document(metrics)
    if "data_quality" in columns:
        quality = columns["data_quality"]
        columns["data_quality"] = None if quality is None else quality_document(quality)
    if "ranked_child_ids" in columns:
        columns["ranked_child_ids"] = list(columns["ranked_child_ids"])
    if "walk_forward_folds" in columns:
        folds = columns["walk_forward_folds"]
        columns["walk_forward_folds"] = folds_document(folds) if folds else None
    return columns


class BacktestRepository:
    """Backtests, executions and equity points."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def create(self, record: BacktestRecord) -> None:
        """Store a new backtest (its id must be new)."""
        values = _column_values({f: getattr(record, f) for f in _BACKTEST_FIELDS})
        async with self._sessions.begin() as session:
            connection = await session.connection()
            await connection.execute(backtests_table.insert().values(values))

    async def get(self, backtest_id: str) -> BacktestRecord | None:
        """The backtest ``backtest_id``, or None."""
        statement = select(*_BACKTEST_COLUMNS).where(backtests_table.c.backtest_id == backtest_id)
        async with self._sessions() as session:
            connection = await session.connection()
            row = (await connection.execute(statement)).first()
        return None if row is None else _backtest_from_row(row)

    async def list(
        self,
        *,
        limit: int,
        after: tuple[datetime, str] | None = None,
        strategy: str | None = None,
        state: BacktestState | None = None,
        parent_backtest_id: str | None = None,
    ) -> Page[BacktestRecord]:
        """Backtests newest first (by (create_time, backtest_id) descending), after the cursor;
        ``next_cursor`` is (create_time, backtest_id) of the last row when more rows exist."""
        c = backtests_table.c
        statement = (
            select(*_BACKTEST_COLUMNS)
            .order_by(c.create_time.desc(), c.backtest_id.desc())
            .limit(limit + 1)
        )
        if after is not None:
            statement = statement.where(
                keyset_after((c.create_time, c.backtest_id), after, descending=True)
            )
        if strategy is not None:
            statement = statement.where(c.strategy == strategy)
        if state is not None:
            statement = statement.where(c.state == int(state))
        if parent_backtest_id is not None:
            statement = statement.where(c.parent_backtest_id == parent_backtest_id)
        async with self._sessions() as session:
            connection = await session.connection()
            rows = [_backtest_from_row(row) for row in await connection.execute(statement)]
        return page_of(rows, limit, lambda last: (last.create_time, last.backtest_id))

    async def update(self, backtest_id: str, **fields: Any) -> BacktestRecord | None:
        """Set ``fields`` (names of ``BacktestRecord`` fields) and return the updated backtest,
        or None when it does not exist."""
        unknown = set(fields) - _BACKTEST_FIELDS | ({"backtest_id"} & set(fields))
        if unknown:
            raise TypeError(f"cannot update backtest fields {sorted(unknown)}")
        if not fields:
            return await self.get(backtest_id)
        statement = (
            update(backtests_table)
            .where(backtests_table.c.backtest_id == backtest_id)
            .values(_column_values(fields))
            .returning(*_BACKTEST_COLUMNS)
        )
        async with self._sessions.begin() as session:
            connection = await session.connection()
            row = (await connection.execute(statement)).first()
        return None if row is None else _backtest_from_row(row)

    async def add_executions(self, backtest_id: str, executions: Sequence[ExecutionRecord]) -> None:
        """Store executions; one already stored (same sequence) is left as it is."""
        rows = [{**dataclasses.asdict(e), "backtest_id": backtest_id} for e in executions]
        if not rows:
            return
        async with self._sessions.begin() as session:
            connection = await session.connection()
            statement = insert_for(connection, executions_table).on_conflict_do_nothing(
                index_elements=[executions_table.c.backtest_id, executions_table.c.sequence]
            )
            for chunk in chunks(rows, rows_per_statement(len(rows[0]))):
                await connection.execute(statement, list(chunk))

    async def list_executions(
        self, backtest_id: str, *, limit: int, after_sequence: int = -1
    ) -> Page[ExecutionRecord]:
        """Executions in sequence order after ``after_sequence``; ``next_cursor`` is
        ``(last_sequence,)`` when more rows exist."""
        c = executions_table.c
        statement = (
            select(*_EXECUTION_COLUMNS)
            .where(c.backtest_id == backtest_id, c.sequence > after_sequence)
            .order_by(c.sequence)
            .limit(limit + 1)
        )
        async with self._sessions() as session:
            connection = await session.connection()
            rows = [ExecutionRecord(*row) for row in await connection.execute(statement)]
        return page_of(rows, limit, lambda last: (last.sequence,))

    async def add_equity_points(
        self, backtest_id: str, points: Sequence[EquityPointRecord]
    ) -> None:
        """Append points to the backtest's equity curve."""
        rows = [{"backtest_id": backtest_id, "time": p.time, "equity": p.equity} for p in points]
        if not rows:
            return
        async with self._sessions.begin() as session:
            connection = await session.connection()
            for chunk in chunks(rows, rows_per_statement(3)):
                await connection.execute(equity_points_table.insert(), list(chunk))

    async def equity_curve(self, backtest_id: str) -> builtins.list[EquityPointRecord]:
        """The backtest's equity curve in time order (insertion order among equal times)."""
        c = equity_points_table.c
        statement = (
            select(*_EQUITY_COLUMNS).where(c.backtest_id == backtest_id).order_by(c.time, c.id)
        )
        async with self._sessions() as session:
            connection = await session.connection()
            return [EquityPointRecord(*row) for row in await connection.execute(statement)]
