"""Order books: writing changes (COPY on PostgreSQL) and checkpoints, the reads a rebuild needs,
and the PostgreSQL partitions of the change table (created ahead, dropped by retention).

Design: docs/adr/0017-order-book-storage.md.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any, NamedTuple

import asyncpg
from sqlalchemy import BigInteger, Column, MetaData, Table, func, select, text, true
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.schema import CreateTable
from sqlalchemy.types import TypeDecorator

from kfeed_server.db.models import (
    BOOK_PARTITION_PREFIX,
    OrderBookCheckpoint,
    book_changes_table,
    book_checkpoints_table,
)
from kfeed_server.db.repositories._common import (
    chunks,
    insert_for,
    is_postgresql,
    keyset_after,
    rows_per_statement,
)
from kfeed_server.records import (
    BookChangeRecord,
    BookCheckpointRecord,
    BookStreamRow,
    CheckpointKind,
    Levels,
    Side,
    StreamedBook,
    StreamedBookChange,
)

log = logging.getLogger(__name__)

# From this many changes on, PostgreSQL batches go through COPY.
COPY_THRESHOLD = 200
_CHANGE_COLUMNS = [*BookChangeRecord._fields, "stream_id"]
_CHANGE_KEY = ("ticker", "exchange_time", "side", "price", "sequence")
_DAY = timedelta(days=1)

_staging = Table(
    "kfeed_book_change_staging",
    MetaData(),
    *(
        Column(c.name, c.type.impl if isinstance(c.type, TypeDecorator) else c.type)
        for c in book_changes_table.c
    ),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DELETE ROWS",
)
_INSERT_STAGED_SQL = f"""
INSERT INTO {book_changes_table.name} ({", ".join(_CHANGE_COLUMNS)})
SELECT {", ".join(_CHANGE_COLUMNS)} FROM {_staging.name}
ON CONFLICT ({", ".join(_CHANGE_KEY)}) DO NOTHING
RETURNING stream_id
"""


def pack_levels(levels: Levels) -> bytes:
    """(price, size) pairs as little-endian int64s: 16 bytes a level."""
    return struct.pack(f"<{2 * len(levels)}q", *(n for level in levels for n in level))


def unpack_levels(packed: bytes) -> Levels:
    """The inverse of :func:`pack_levels`."""
    numbers = struct.unpack(f"<{len(packed) // 8}q", packed)
    return tuple(zip(numbers[::2], numbers[1::2], strict=True))


@dataclass(slots=True)
class StoredBookRows:
    """What one batch stored of order books: the counts, and the rows a book stream delivers
    (changes and START, RESYNC and LOST checkpoints) in stream-id order."""

    changes: int = 0
    checkpoints: int = 0
    streamed: list[BookStreamRow] = field(default_factory=list)


def _max_stream_id_query() -> Any:
    return select(
        func.coalesce(select(func.max(book_changes_table.c.stream_id)).scalar_subquery(), 0),
        func.coalesce(select(func.max(book_checkpoints_table.c.stream_id)).scalar_subquery(), 0),
    )


async def insert_book_rows(
    connection: AsyncConnection,
    changes: Sequence[BookChangeRecord],
    checkpoints: Sequence[BookCheckpointRecord],
) -> StoredBookRows:
    """Store the changes and checkpoints not stored yet, with stream ids above the stored
    maximum (writes are serialised, so the ids increase in commit order).

    A batch's rows are numbered in exchange-time order, a change before a checkpoint of the same
    instant (a checkpoint holds every change at or before its time), so each market's stream
    order is the order a rebuild applies them in."""
    if not changes and not checkpoints:
        return StoredBookRows()
    highest = max((await connection.execute(_max_stream_id_query())).one())
    # (exchange time, checkpoint after change, sequence, which list, index) in stream order
    order = sorted(
        [(c.exchange_time, 0, c.sequence, 0, i) for i, c in enumerate(changes)]
        + [(k.exchange_time, 1, k.sequence or 0, 1, i) for i, k in enumerate(checkpoints)]
    )
    change_ids = [0] * len(changes)
    checkpoint_ids = [0] * len(checkpoints)
    for stream_id, (*_, which, index) in enumerate(order, start=highest + 1):
        (checkpoint_ids if which else change_ids)[index] = stream_id
    stored_change_ids = await _insert_changes(connection, changes, change_ids)
    stored_checkpoint_ids = await _insert_checkpoints(connection, checkpoints, checkpoint_ids)
    streamed: list[BookStreamRow] = [
        StreamedBookChange(stream_id, change)
        for stream_id, change in zip(change_ids, changes, strict=True)
        if stream_id in stored_change_ids
    ]
    streamed += [
        StreamedBook(stream_id, checkpoint)
        for stream_id, checkpoint in zip(checkpoint_ids, checkpoints, strict=True)
        if stream_id in stored_checkpoint_ids and checkpoint.kind is not CheckpointKind.PERIODIC
    ]
    streamed.sort(key=attrgetter("stream_id"))
    return StoredBookRows(len(stored_change_ids), len(stored_checkpoint_ids), streamed)


async def _insert_changes(
    connection: AsyncConnection, changes: Sequence[BookChangeRecord], stream_ids: list[int]
) -> set[int]:
    """Store the changes not stored yet; the stream ids of those stored."""
    if not changes:
        return set()
    if is_postgresql(connection) and len(changes) >= COPY_THRESHOLD:
        return await _copy_changes(connection, changes, stream_ids)
    statement = (
        insert_for(connection, book_changes_table)
        .on_conflict_do_nothing(index_elements=[book_changes_table.c[name] for name in _CHANGE_KEY])
        .returning(book_changes_table.c.stream_id)
    )
    rows = [
        {**c._asdict(), "stream_id": stream_id}
        for c, stream_id in zip(changes, stream_ids, strict=True)
    ]
    stored: set[int] = set()
    for chunk in chunks(rows, rows_per_statement(len(_CHANGE_COLUMNS))):
        stored.update((await connection.execute(statement, list(chunk))).scalars())
    return stored


async def _copy_changes(
    connection: AsyncConnection, changes: Sequence[BookChangeRecord], stream_ids: list[int]
) -> set[int]:
    """Binary COPY straight into the (partitioned) table inside a savepoint: the live case, all
    new. A batch with a stored row (a resend) goes through a staging table and
    ``INSERT … ON CONFLICT DO NOTHING`` instead."""
    if any(c.exchange_time.tzinfo is None or c.receive_time.tzinfo is None for c in changes):
        raise ValueError("order-book change times must be timezone-aware")
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection
    # Plain tuples with plain ints: asyncpg reads them fastest.
    rows = [
        (c[0], c[1], c[2], c[3], int(c[4]), c[5], c[6], stream_id)
        for c, stream_id in zip(changes, stream_ids, strict=True)
    ]
    await driver.execute("SAVEPOINT kfeed_book_copy")
    try:
        await driver.copy_records_to_table(
            book_changes_table.name, records=rows, columns=_CHANGE_COLUMNS
        )
    except asyncpg.UniqueViolationError:
        await driver.execute("ROLLBACK TO SAVEPOINT kfeed_book_copy")
    else:
        await driver.execute("RELEASE SAVEPOINT kfeed_book_copy")
        return set(stream_ids)
    await connection.execute(CreateTable(_staging, if_not_exists=True))
    await driver.copy_records_to_table(_staging.name, records=rows, columns=_CHANGE_COLUMNS)
    return {row[0] for row in await driver.fetch(_INSERT_STAGED_SQL)}


async def _insert_checkpoints(
    connection: AsyncConnection, checkpoints: Sequence[BookCheckpointRecord], stream_ids: list[int]
) -> set[int]:
    """Store the checkpoints not stored yet; the stream ids of those stored."""
    if not checkpoints:
        return set()
    rows = [
        {
            "ticker": c.ticker,
            "exchange_time": c.exchange_time,
            "receive_time": c.receive_time,
            "sequence": c.sequence,
            "kind": c.kind,
            "yes_levels": pack_levels(c.yes),
            "no_levels": pack_levels(c.no),
            "stream_id": stream_id,
        }
        for c, stream_id in zip(checkpoints, stream_ids, strict=True)
    ]
    table = book_checkpoints_table
    statement = (
        insert_for(connection, table)
        .on_conflict_do_nothing(
            index_elements=[table.c[n] for n in ("ticker", "exchange_time", "kind", "receive_time")]
        )
        .returning(table.c.stream_id)
    )
    stored: set[int] = set()
    for chunk in chunks(rows, rows_per_statement(len(rows[0]))):
        stored.update((await connection.execute(statement, list(chunk))).scalars())
    return stored


_CHECKPOINT_COLUMNS = [
    OrderBookCheckpoint.ticker, OrderBookCheckpoint.exchange_time,
    OrderBookCheckpoint.receive_time, OrderBookCheckpoint.sequence, OrderBookCheckpoint.kind,
    OrderBookCheckpoint.yes_levels, OrderBookCheckpoint.no_levels,
]  # fmt: skip


def _kind(value: Any) -> CheckpointKind | None:
    return None if value is None else CheckpointKind(value)


class BookHistory(NamedTuple):
    """What rebuilds a book at an instant: the latest checkpoint at or before it, the level
    changes after that checkpoint up to the instant as ``(side, price, new size)`` in exchange
    order, the last of those changes in full, and the kind of the first checkpoint after it."""

    checkpoint: BookCheckpointRecord | None
    levels: list[tuple[int, int, int]]
    last_change: BookChangeRecord | None
    following: CheckpointKind | None


_NO_HISTORY = BookHistory(None, [], None, None)


def _checkpoint(row: Any) -> BookCheckpointRecord:
    return BookCheckpointRecord(
        row[0], row[1], row[2], row[3], CheckpointKind(row[4]),
        unpack_levels(row[5]), unpack_levels(row[6]),
    )  # fmt: skip


_CHANGE_RUN = f"""
    FROM {book_changes_table.name}
    WHERE ticker = t.ticker AND exchange_time > cp.exchange_time AND exchange_time <= $2"""
_RUN_ORDER = "exchange_time, sequence, side, price"
# PostgreSQL: everything the rebuilds of several markets read, in one statement (one round
# trip): per market, the checkpoint, the kind of the next one, the run of changes after it as
# three arrays, and the last change's times. Nothing after a LOST checkpoint is read. A market
# without a checkpoint at or before the time has no row.
_HISTORIES_SQL = f"""
SELECT t.ticker, cp.exchange_time, cp.receive_time, cp.sequence, cp.kind, cp.yes_levels,
    cp.no_levels,
    (SELECT kind FROM {book_checkpoints_table.name}
     WHERE ticker = t.ticker AND exchange_time > $2 ORDER BY exchange_time, receive_time LIMIT 1),
    run.sides, run.prices, run.sizes, last.exchange_time, last.receive_time, last.sequence
FROM unnest($1::text[]) AS t(ticker)
CROSS JOIN LATERAL (
    SELECT exchange_time, receive_time, sequence, kind, yes_levels, no_levels
    FROM {book_checkpoints_table.name} WHERE ticker = t.ticker AND exchange_time <= $2
    ORDER BY exchange_time DESC, receive_time DESC LIMIT 1
) AS cp
LEFT JOIN LATERAL (
    SELECT array_agg(side ORDER BY {_RUN_ORDER}) AS sides,
        array_agg(price ORDER BY {_RUN_ORDER}) AS prices,
        array_agg(size ORDER BY {_RUN_ORDER}) AS sizes{_CHANGE_RUN}
) AS run ON cp.kind <> $3
LEFT JOIN LATERAL (
    SELECT exchange_time, receive_time, sequence{_CHANGE_RUN}
    ORDER BY exchange_time DESC, sequence DESC, side DESC, price DESC LIMIT 1
) AS last ON cp.kind <> $3
"""
# Markets a statement reads at most (a stream may name thousands).
_MARKETS_PER_READ = 1_000


async def _postgresql_histories(
    connection: AsyncConnection, tickers: Sequence[str], time: datetime
) -> dict[str, BookHistory]:
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection  # asyncpg's, outside any transaction: one round trip
    histories: dict[str, BookHistory] = {}
    for chunk in chunks(tickers, _MARKETS_PER_READ):
        for row in await driver.fetch(_HISTORIES_SQL, list(chunk), time, int(CheckpointKind.LOST)):
            ticker = row[0]
            checkpoint = BookCheckpointRecord(
                ticker, row[1], row[2], row[3], CheckpointKind(row[4]),
                unpack_levels(row[5]), unpack_levels(row[6]),
            )  # fmt: skip
            sides, prices, sizes, last_time = row[8], row[9], row[10], row[11]
            last = None
            if last_time is not None:
                last = BookChangeRecord(
                    ticker, last_time, row[12], row[13], Side(sides[-1]), prices[-1], sizes[-1]
                )
            levels = list(zip(sides, prices, sizes, strict=True)) if sides else []
            histories[ticker] = BookHistory(checkpoint, levels, last, _kind(row[7]))
    return histories


async def _sqlite_histories(
    connection: AsyncConnection, tickers: Sequence[str], time: datetime
) -> dict[str, BookHistory]:
    """Two statements for every ``_MARKETS_PER_READ`` markets: each one's latest checkpoint at or
    before ``time`` (with the next one's kind), then the changes after those checkpoints."""
    table, changes = book_checkpoints_table, book_changes_table
    later = table.alias("later")
    following = (
        select(later.c.kind)
        .where(later.c.ticker == table.c.ticker, later.c.exchange_time > time)
        .order_by(later.c.exchange_time, later.c.receive_time)
        .limit(1)
        .scalar_subquery()
    )
    newest_first = func.row_number().over(
        partition_by=table.c.ticker,
        order_by=(table.c.exchange_time.desc(), table.c.receive_time.desc()),
    )
    histories: dict[str, BookHistory] = {}
    for chunk in chunks(tickers, _MARKETS_PER_READ):
        ranked = (
            select(*_CHECKPOINT_COLUMNS, following.label("following"), newest_first.label("rank"))
            .where(table.c.ticker.in_(chunk), table.c.exchange_time <= time)
            .subquery()
        )
        latest = select(ranked).where(ranked.c.rank == 1).subquery()
        runs: dict[str, list[Any]] = {}
        for row in (await connection.execute(select(latest))).all():
            checkpoint = _checkpoint(row)
            histories[checkpoint.ticker] = BookHistory(checkpoint, [], None, _kind(row[7]))
            runs[checkpoint.ticker] = []
        run = (
            select(
                changes.c.ticker, changes.c.side.cast(BigInteger), changes.c.price,
                changes.c.size, changes.c.exchange_time, changes.c.receive_time,
                changes.c.sequence,
            )
            .join(latest, latest.c.ticker == changes.c.ticker)
            .where(
                latest.c.kind != int(CheckpointKind.LOST),
                changes.c.exchange_time > latest.c.exchange_time,
                changes.c.exchange_time <= time,
            )
            .order_by(
                changes.c.ticker, changes.c.exchange_time, changes.c.sequence, changes.c.side,
                changes.c.price,
            )
        )  # fmt: skip
        for row in (await connection.execute(run)).all():
            runs[row[0]].append(row)
        for ticker, rows in runs.items():
            if not rows:
                continue
            _, side, price, size, exchange_time, receive_time, sequence = rows[-1]
            last = BookChangeRecord(
                ticker, exchange_time, receive_time, sequence, Side(side), price, size
            )
            levels = [(r[1], r[2], r[3]) for r in rows]
            histories[ticker] = histories[ticker]._replace(levels=levels, last_change=last)
    return histories


class OrderBookRepository:
    """The reads that rebuild a book at an instant, and partition upkeep."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def history(self, ticker: str, time: datetime) -> BookHistory:
        """What rebuilds ``ticker``'s book at ``time`` (see :meth:`histories`)."""
        return (await self.histories([ticker], time)).get(ticker, _NO_HISTORY)

    async def histories(self, tickers: Sequence[str], time: datetime) -> dict[str, BookHistory]:
        """What rebuilds each market's book at ``time``, for the markets that have a checkpoint
        at or before it: one statement on PostgreSQL (a round trip costs more than the index
        range reads), two on SQLite, for up to ``_MARKETS_PER_READ`` markets. No transaction
        around them: rows are only ever appended, and a change committed between two reads lies
        after the checkpoint the first found, so it is not missed."""
        if not tickers:
            return {}
        async with self._sessions() as session:
            connection = await session.connection(
                execution_options={"isolation_level": "AUTOCOMMIT"}
            )
            if is_postgresql(connection):
                return await _postgresql_histories(connection, tickers, time)
            return await _sqlite_histories(connection, tickers, time)

    async def replay_rows(
        self,
        ticker: str,
        start: datetime,
        end: datetime,
        *,
        chunk_size: int = 4_096,
        max_stream_id: int | None = None,
    ) -> AsyncIterator[list[BookCheckpointRecord | BookChangeRecord]]:
        """What rebuilds ``ticker``'s book at every instant of ``[start, end)``, in chunks: the
        latest checkpoint at or before ``start`` (when there is one), then the checkpoints and
        changes after it and before ``end`` in exchange-time order, the changes of an instant
        before a checkpoint at that instant (which holds them). Changes come in primary-key
        order within an instant (side, price, sequence), so a level changed twice ends at its
        later size. Each read is one keyset page of an index, in a session of its own (no
        connection is held between chunks). With ``max_stream_id`` (a backtest's pinned
        position) only rows stored at or before it are read: stream ids increase in commit
        order, so rows committed while the reads go on are left out."""
        table, changes = book_checkpoints_table, book_changes_table
        pinned_checkpoints = (
            table.c.stream_id <= max_stream_id if max_stream_id is not None else true()
        )
        pinned_changes = (
            changes.c.stream_id <= max_stream_id if max_stream_id is not None else true()
        )
        first = await self._all(
            select(*_CHECKPOINT_COLUMNS)
            .where(table.c.ticker == ticker, table.c.exchange_time <= start, pinned_checkpoints)
            .order_by(table.c.exchange_time.desc(), table.c.receive_time.desc())
            .limit(1)
        )
        checkpoints = [] if not first else [_checkpoint(first[0])]
        after = checkpoints[0].exchange_time if checkpoints else start
        later = table.c.exchange_time > after if checkpoints else table.c.exchange_time >= after
        checkpoints += map(
            _checkpoint,
            await self._all(
                select(*_CHECKPOINT_COLUMNS)
                .where(
                    table.c.ticker == ticker, later, table.c.exchange_time < end, pinned_checkpoints
                )
                .order_by(table.c.exchange_time, table.c.receive_time)
            ),
        )
        key = (changes.c.exchange_time, changes.c.side, changes.c.price, changes.c.sequence)
        page_query = (
            select(
                changes.c.exchange_time, changes.c.receive_time, changes.c.sequence,
                changes.c.side.cast(BigInteger), changes.c.price, changes.c.size,
            )
            .where(
                changes.c.ticker == ticker,
                changes.c.exchange_time > after,
                changes.c.exchange_time < end,
                pinned_changes,
            )
            .order_by(*key)
            .limit(chunk_size)
        )  # fmt: skip
        statement = page_query
        taken = 0  # checkpoints given out
        while True:
            page = [
                BookChangeRecord(ticker, time, received, sequence, Side(side), price, size)
                for time, received, sequence, side, price, size in await self._all(statement)
            ]
            more = len(page) == chunk_size
            merged: list[BookCheckpointRecord | BookChangeRecord] = []
            for change in page:
                while taken < len(checkpoints) and (
                    checkpoints[taken].exchange_time < change.exchange_time
                ):
                    merged.append(checkpoints[taken])
                    taken += 1
                merged.append(change)
            if not more:
                # A checkpoint at the last page's last instant holds its changes: it comes after
                # them, so it waits until no page is left.
                merged += checkpoints[taken:]
            if merged:
                yield merged
            if not more:
                return
            last = page[-1]
            statement = page_query.where(
                keyset_after(key, (last.exchange_time, last.side, last.price, last.sequence))
            )

    async def _all(self, statement: Any) -> list[Any]:
        """All rows of ``statement``, read outside a transaction (rows are only appended)."""
        async with self._sessions() as session:
            connection = await session.connection(
                execution_options={"isolation_level": "AUTOCOMMIT"}
            )
            return list((await connection.execute(statement)).all())

    async def max_stream_id(self) -> int:
        """The highest order-book stream id; 0 when no book row is stored."""
        async with self._sessions() as session:
            connection = await session.connection()
            return int(max((await connection.execute(_max_stream_id_query())).one()))

    async def list_after_id(
        self,
        after_id: int,
        *,
        tickers: Sequence[str] | None,
        limit: int,
        min_exchange_time: datetime | None = None,
    ) -> list[BookStreamRow]:
        """The rows a book stream delivers with ``stream_id > after_id``, in stream-id order:
        changes and START, RESYNC and LOST checkpoints (PERIODIC ones only bound rebuilds), of
        ``tickers`` (None: every market), optionally at or after ``min_exchange_time``."""
        if tickers is not None and not tickers:
            return []
        changes, checkpoints = book_changes_table.c, book_checkpoints_table.c
        change_query = (
            select(changes.stream_id, *(changes[name] for name in BookChangeRecord._fields))
            .where(changes.stream_id > after_id)
            .order_by(changes.stream_id)
            .limit(limit)
        )
        checkpoint_query = (
            select(book_checkpoints_table.c.stream_id, *_CHECKPOINT_COLUMNS)
            .where(
                checkpoints.stream_id > after_id,
                checkpoints.kind != CheckpointKind.PERIODIC,
            )
            .order_by(checkpoints.stream_id)
            .limit(limit)
        )
        if tickers is not None:
            change_query = change_query.where(changes.ticker.in_(list(tickers)))
            checkpoint_query = checkpoint_query.where(checkpoints.ticker.in_(list(tickers)))
        if min_exchange_time is not None:
            change_query = change_query.where(changes.exchange_time >= min_exchange_time)
            checkpoint_query = checkpoint_query.where(
                checkpoints.exchange_time >= min_exchange_time
            )
        async with self._sessions() as session:
            connection = await session.connection()
            rows: list[BookStreamRow] = [
                StreamedBookChange(
                    stream_id,
                    BookChangeRecord(ticker, time, received, seq, Side(side), price, size),
                )
                for stream_id, ticker, time, received, seq, side, price, size in (
                    await connection.execute(change_query)
                )
            ]
            rows += [
                StreamedBook(row[0], _checkpoint(row[1:]))
                for row in await connection.execute(checkpoint_query)
            ]
        rows.sort(key=attrgetter("stream_id"))
        return rows[:limit]

    async def position_before(self, time: datetime, tickers: Sequence[str] | None) -> int:
        """The stream position just before the first row of ``tickers`` (None: every market)
        with an exchange time after ``time``: every row at or before it is at or before
        ``time``. The current position when no row is later than ``time``."""
        highest = await self.max_stream_id()
        firsts: list[int] = []
        async with self._sessions() as session:
            connection = await session.connection()
            for table in (book_changes_table, book_checkpoints_table):
                query = select(func.min(table.c.stream_id)).where(
                    table.c.exchange_time > time, table.c.stream_id <= highest
                )
                if tickers is not None:
                    query = query.where(table.c.ticker.in_(list(tickers)))
                first = await connection.scalar(query)
                if first is not None:
                    firsts.append(int(first))
        return min(firsts) - 1 if firsts else highest

    async def tickers_with_books(self) -> list[str]:
        """The markets with at least one recorded book, by ticker."""
        ticker = book_checkpoints_table.c.ticker
        async with self._sessions() as session:
            connection = await session.connection()
            return list(
                (await connection.execute(select(ticker).distinct().order_by(ticker))).scalars()
            )

    async def maintain_partitions(
        self, now: datetime, days_ahead: int, retention: timedelta | None
    ) -> tuple[list[str], list[str]]:
        """PostgreSQL: a partition of one UTC day for yesterday, today and ``days_ahead`` days
        ahead (existing ones kept); with ``retention``, partitions wholly older than it dropped.
        The names created and dropped; nothing on SQLite."""
        async with self._sessions.begin() as session:
            connection = await session.connection()
            if not is_postgresql(connection):
                return [], []
            existing = {
                name
                for (name,) in await connection.execute(
                    text(
                        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                        " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = :parent"
                    ),
                    {"parent": book_changes_table.name},
                )
            }
            today = datetime(now.year, now.month, now.day, tzinfo=UTC)
            created: list[str] = []
            for offset in range(-1, days_ahead + 1):
                start = today + offset * _DAY
                name = f"{BOOK_PARTITION_PREFIX}p{start:%Y%m%d}"
                if name in existing:
                    continue
                try:
                    async with connection.begin_nested():
                        await connection.execute(
                            text(
                                f"CREATE TABLE {name} PARTITION OF {book_changes_table.name} "
                                f"FOR VALUES FROM ('{start.isoformat()}') "
                                f"TO ('{(start + _DAY).isoformat()}')"
                            )
                        )
                except Exception as exc:  # rows of that day already sit in the default
                    log.warning("order-book partition %s not created: %s", name, exc)
                    continue
                created.append(name)
            dropped: list[str] = []
            if retention is not None:
                cutoff = now - retention
                for name in sorted(existing):
                    day = name.removeprefix(f"{BOOK_PARTITION_PREFIX}p")
                    if not day.isdigit():
                        continue  # the default partition
                    end = datetime.strptime(day, "%Y%m%d").replace(tzinfo=UTC) + _DAY
                    if end <= cutoff:
                        await connection.execute(text(f"DROP TABLE {name}"))
                        dropped.append(name)
            return created, dropped
