"""Helpers shared by the repositories: record/column mapping, dialect-specific inserts, chunks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Column, ColumnElement, Select, Table, literal, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from kfeed_server.records import Page

T = TypeVar("T")

# Below SQLite's 32,766 bound-parameter limit even for the widest IN list or multi-row VALUES.
MAX_PARAMETERS_PER_STATEMENT = 10_000


def record_columns(
    table: Table, record_type: type[Any], renames: Mapping[str, str] | None = None
) -> list[Column[Any]]:
    """``table``'s columns in the order of ``record_type``'s fields, so ``record_type(*row)``
    builds a record from a row (``renames`` maps a field name to its column name)."""
    renames = renames or {}
    return [table.c[renames.get(name, name)] for name in field_names(record_type)]


def field_names(record_type: type[Any]) -> tuple[str, ...]:
    """The field names of a dataclass or a named tuple, in order."""
    if dataclasses.is_dataclass(record_type):
        return tuple(f.name for f in dataclasses.fields(record_type))
    return tuple(record_type._fields)


def insert_for(connection: AsyncConnection, table: Table) -> Any:
    """An INSERT with ``ON CONFLICT`` support for the connection's database."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def is_postgresql(connection: AsyncConnection) -> bool:
    """True on PostgreSQL, False on SQLite."""
    return connection.dialect.name == "postgresql"


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def rows_per_statement(column_count: int) -> int:
    """How many rows of ``column_count`` parameters fit one statement on every database."""
    return max(1, MAX_PARAMETERS_PER_STATEMENT // max(1, column_count))


def keyset_after(
    columns: Sequence[ColumnElement[Any]], cursor: Sequence[Any], *, descending: bool = False
) -> ColumnElement[bool]:
    """Rows strictly after ``cursor`` in the order of ``columns`` (a row-value comparison, which
    both databases answer from a matching index). The cursor's values are bound with the columns'
    types, so a timestamp is compared in the column's own representation."""
    bound = tuple_(
        *(literal(value, column.type) for column, value in zip(columns, cursor, strict=True))
    )
    return tuple_(*columns) < bound if descending else tuple_(*columns) > bound


def time_range_page_query(
    statement: Select[Any],
    time: ColumnElement[datetime],
    row_id: ColumnElement[Any],
    *,
    start: datetime | None,
    end: datetime | None,
    limit: int,
    after: Sequence[Any] | None,
) -> Select[Any]:
    """``statement`` narrowed to ``start <= time < end``, ordered by (time, row_id), after the
    keyset cursor ``after``; reads one row over ``limit`` for :func:`page_of`."""
    statement = statement.order_by(time, row_id).limit(limit + 1)
    # One lower bound, the tighter: given both, SQLite scans the index from ``start`` and
    # filters up to the cursor, so page n cost n pages.
    if after is not None and (start is None or after[0] >= start):
        statement = statement.where(keyset_after((time, row_id), after))
    elif start is not None:
        statement = statement.where(time >= start)
    if end is not None:
        statement = statement.where(time < end)
    return statement


def page_of(rows: Sequence[T], limit: int, cursor: Callable[[T], tuple[object, ...]]) -> Page[T]:
    """The page of the first ``limit`` of ``rows``, read with ``limit + 1`` so that one more row
    means a next page; its cursor is ``cursor`` of the last item."""
    items = list(rows[:limit])
    if len(rows) > limit and items:
        return Page(items, cursor(items[-1]))
    return Page(items)
