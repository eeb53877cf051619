"""The write path of ingest: one transaction per batch, idempotent, unchanged states skipped."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from operator import attrgetter
from typing import Any

import asyncpg
from sqlalchemy import (
    BigInteger,
    Column,
    MetaData,
    Table,
    and_,
    func,
    literal_column,
    or_,
    select,
    text,
    type_coerce,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.schema import CreateTable
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator

from kfeed_server.db.commits import CHANNEL, batch_notices
from kfeed_server.db.engine import (
    SQLITE_BEGIN_MODE,
    SQLITE_BUSY_TIMEOUT_MS,
    StorageUnavailable,
    is_sqlite_busy,
)
from kfeed_server.db.models import (
    events_table,
    feed_gaps_table,
    markets_table,
    series_table,
    snapshots_table,
    trades_table,
)
from kfeed_server.db.repositories._common import (
    chunks,
    insert_for,
    is_postgresql,
    rows_per_statement,
)
from kfeed_server.db.repositories.books import insert_book_rows
from kfeed_server.db.repositories.markets import record_rows, series_rows, upsert_rows
from kfeed_server.db.repositories.snapshots import SNAPSHOT_COLUMNS, latest_per_market
from kfeed_server.db.repositories.trades import FEED_GAP_COLUMNS, TRADE_COLUMNS
from kfeed_server.records import (
    BookChangeRecord,
    BookCheckpointRecord,
    BookStreamRow,
    EventRecord,
    FeedGapRecord,
    MarketRecord,
    SeriesRecord,
    SnapshotRecord,
    StreamedTrade,
    TradeRecord,
    WriteCounts,
)

# From this many snapshots on, PostgreSQL batches go through COPY into a staging table.
COPY_THRESHOLD = 500
# Held for the rest of a write transaction on PostgreSQL: snapshot ids are then committed in the
# order they are assigned, so a reader tailing by id never skips a row committed late.
_WRITE_LOCK_KEY = 0x6B_66_65_65_64_01

# While another connection holds SQLite's write lock, the writer tries again after this long,
# doubling up to the last pause, for as long as the busy timeout.
FIRST_BUSY_PAUSE = 0.001
LAST_BUSY_PAUSE = 0.05

_SNAPSHOT_KEY = ("ticker", "source", "exchange_time", "receive_time")
# Every field but the id (the last): the columns an insert gives.
_SNAPSHOT_FIELDS = SnapshotRecord._fields[:-1]
# The columns of a stored record's fields, in field order (the id last).
_COLUMNS = [*_SNAPSHOT_FIELDS, "id"]

_staging = Table(
    "kfeed_snapshot_staging",
    MetaData(),
    *(
        Column(c.name, c.type.impl if isinstance(c.type, TypeDecorator) else c.type)
        for c in snapshots_table.c
        if c.name != "id"
    ),
    Column("ordinal", BigInteger(), nullable=False),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DELETE ROWS",
)
_STAGING_COLUMNS = [*_SNAPSHOT_FIELDS, "ordinal"]


@dataclass(frozen=True, slots=True)
class TradeConflict:
    """A trade whose id names a different trade already stored, which stays as it is. ``index``
    is the trade's position in ``write_batch``'s ``trades``; ``fields`` the fields that differ."""

    index: int
    stored: TradeRecord
    fields: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BatchWriteResult:
    """What one ``write_batch`` stored: counts, and the new snapshots (with ids, in id order) and
    new or changed gaps, for the server to publish to live subscribers after commit."""

    counts: WriteCounts
    stored_snapshots: list[SnapshotRecord] = field(default_factory=list)
    stored_gaps: list[FeedGapRecord] = field(default_factory=list)
    # The batch number its commit notices carry (PostgreSQL, when it stored snapshots or gaps).
    notice_batch: int | None = None
    # The new trades (with stream ids, in id order).
    stored_trades: list[StreamedTrade] = field(default_factory=list)
    # The new order-book rows a book stream delivers (with stream ids, in id order).
    stored_books: list[BookStreamRow] = field(default_factory=list)
    # Trades of the batch whose id names a different stored trade: not stored.
    trade_conflicts: list[TradeConflict] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Committed:
    batch: BatchWriteResult
    # The snapshot table's max id when the batch began (None: the batch had no snapshots).
    latest_as_of: int | None


def _without_unchanged(
    batch: Sequence[SnapshotRecord], latest_stored: Sequence[SnapshotRecord]
) -> tuple[list[SnapshotRecord], int]:
    """Drop snapshots that repeat their market's previous state: the latest stored one, then the
    previous one kept from this batch, in exchange-time order. (An exact repeat within the batch
    repeats the state too.)"""
    # Each snapshot's state computed once (this runs for every row of every batch); the dict is
    # keyed by ticker, so the state without the ticker is enough.
    previous = {s.ticker: s.book_and_activity() for s in latest_stored}
    kept: list[SnapshotRecord] = []
    unchanged = 0
    for snapshot in sorted(batch, key=attrgetter("exchange_time", "receive_time")):
        state = snapshot.book_and_activity()
        if previous.get(snapshot.ticker) == state:
            unchanged += 1
            continue
        kept.append(snapshot)
        previous[snapshot.ticker] = state
    return kept, unchanged


async def _insert_snapshots_by_values(
    connection: AsyncConnection, snapshots: Sequence[SnapshotRecord]
) -> list[SnapshotRecord]:
    rows = [dict(zip(_SNAPSHOT_FIELDS, s[:-1], strict=True)) for s in snapshots]
    statement = (
        insert_for(connection, snapshots_table)
        .on_conflict_do_nothing(index_elements=[snapshots_table.c[n] for n in _SNAPSHOT_KEY])
        .returning(*SNAPSHOT_COLUMNS)
    )
    stored: list[SnapshotRecord] = []
    for chunk in chunks(rows, rows_per_statement(len(_SNAPSHOT_FIELDS))):
        result = await connection.execute(statement, list(chunk))
        stored.extend(map(SnapshotRecord._make, result))
    return sorted(stored, key=attrgetter("snapshot_id"))


_COLUMN_LIST = ", ".join(_SNAPSHOT_FIELDS)
_KEY_LIST = ", ".join(_SNAPSHOT_KEY)
# The CTE's join maps each new id back to its staged row by the unique key, so only two integers
# a row come back (decoding full rows cost more than the whole INSERT). Of staged rows repeating
# a key, the first (lowest ordinal) is the one inserted.
_INSERT_STAGED_SQL = f"""
WITH inserted AS (
    INSERT INTO {snapshots_table.name} ({_COLUMN_LIST})
    SELECT {_COLUMN_LIST} FROM {_staging.name} ORDER BY ordinal
    ON CONFLICT ({_KEY_LIST}) DO NOTHING
    RETURNING id, {_KEY_LIST}
)
SELECT DISTINCT ON (inserted.id) staged.ordinal, inserted.id
FROM inserted JOIN {_staging.name} AS staged USING ({_KEY_LIST})
ORDER BY inserted.id, staged.ordinal
"""


def _all_newer_than_stored(
    snapshots: Sequence[SnapshotRecord], latest_stored: Sequence[SnapshotRecord]
) -> bool:
    """True when every snapshot is newer than its market's latest stored one, so none can share
    a stored row's unique key (which includes the exchange time)."""
    newest = {s.ticker: s.exchange_time for s in latest_stored}
    return all(s.exchange_time > newest[s.ticker] for s in snapshots if s.ticker in newest)


async def _insert_snapshots_by_copy(
    connection: AsyncConnection,
    snapshots: Sequence[SnapshotRecord],
    latest_stored: Sequence[SnapshotRecord],
) -> list[SnapshotRecord]:
    """Bulk insert on PostgreSQL with binary COPY, several times faster than INSERTs.

    New data (every snapshot newer than its market's latest stored one: the live case) is copied
    straight into the table with ids reserved from its sequence beforehand, inside a savepoint.
    Older or resent data, or a key repeated within the batch, goes through a temporary staging
    table and ``INSERT … SELECT … ON CONFLICT DO NOTHING``, which skips rows already stored."""
    if any(s.exchange_time.tzinfo is None or s.receive_time.tzinfo is None for s in snapshots):
        # COPY bypasses the column types, which would refuse naive datetimes.
        raise ValueError("snapshot times must be timezone-aware")
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    if _all_newer_than_stored(snapshots, latest_stored):
        stored = await _copy_into_table(driver, snapshots)
        if stored is not None:
            return stored
    await connection.execute(CreateTable(_staging, if_not_exists=True))
    # A record's last field is its id (0 here): the staged row has its ordinal there instead.
    await driver.copy_records_to_table(
        _staging.name,
        records=[(*s[:-1], ordinal) for ordinal, s in enumerate(snapshots)],
        columns=_STAGING_COLUMNS,
    )
    new_ids = await driver.fetch(_INSERT_STAGED_SQL)
    return [snapshots[ordinal].with_id(snapshot_id) for ordinal, snapshot_id in new_ids]


# Reserves $1 consecutive ids and returns the last. Only IngestWriter inserts snapshots, under
# the write lock, so nobody draws from the sequence in between; if something did, the COPY would
# hit the primary key and fall back to the staging path rather than store anything wrong.
_RESERVE_IDS_SQL = f"""
SELECT setval(
    pg_get_serial_sequence('{snapshots_table.name}', 'id'),
    nextval(pg_get_serial_sequence('{snapshots_table.name}', 'id')) + $1 - 1
)
"""


async def _copy_into_table(
    driver: Any, snapshots: Sequence[SnapshotRecord]
) -> list[SnapshotRecord] | None:
    """COPY the snapshots with reserved ids straight into the table; the stored records, or None
    (and nothing stored) when a unique key turns out to repeat."""
    first_id = await driver.fetchval(_RESERVE_IDS_SQL, len(snapshots)) - len(snapshots) + 1
    # Plain tuples: asyncpg reads their items faster than a named tuple's (≈5 ms a 5,000-row
    # batch); each is then the stored record's fields too.
    rows = [(*s[:-1], snapshot_id) for snapshot_id, s in enumerate(snapshots, first_id)]
    await driver.execute("SAVEPOINT kfeed_direct_copy")
    try:
        await driver.copy_records_to_table(snapshots_table.name, records=rows, columns=_COLUMNS)
    except asyncpg.UniqueViolationError:
        await driver.execute("ROLLBACK TO SAVEPOINT kfeed_direct_copy")
        return None
    await driver.execute("RELEASE SAVEPOINT kfeed_direct_copy")
    return list(map(SnapshotRecord._make, rows))


def _refines(
    connection: AsyncConnection, stored: ColumnElement[Any], resent: ColumnElement[Any]
) -> ColumnElement[bool]:
    """A resent trade's time refines the stored one: the stored time is a whole second (Kalshi's
    WebSocket gives trade times in seconds) and the resent one falls later within that second
    (REST gives them exactly). Any other difference keeps the stored time."""
    if is_postgresql(connection):
        return and_(
            func.date_trunc("second", stored) == stored,
            resent > stored,
            resent < stored + literal_column("interval '1 second'"),
        )
    # SQLite keeps times as integer microseconds (UtcDateTime).
    stored_us, resent_us = type_coerce(stored, BigInteger()), type_coerce(resent, BigInteger())
    return and_(
        stored_us % 1_000_000 == 0, resent_us > stored_us, resent_us < stored_us + 1_000_000
    )


# What makes a trade itself, besides its time (which the WebSocket gives to the second only).
_TRADE_FACTS = ("ticker", "yes_price", "no_price", "count", "taker_side")


def trade_differences(stored: TradeRecord, resent: TradeRecord) -> tuple[str, ...]:
    """The fields in which ``resent`` is another trade than ``stored`` under the same id; empty
    when it is the same trade: equal, or equal but for a time one of them gives to the whole
    second only, within that second."""
    differences = [n for n in _TRADE_FACTS if getattr(stored, n) != getattr(resent, n)]
    times = (stored.create_time, resent.create_time)
    same_moment = times[0] == times[1] or (
        times[0].replace(microsecond=0) == times[1].replace(microsecond=0)
        and 0 in (times[0].microsecond, times[1].microsecond)
    )
    if not same_moment:
        differences.append("create_time")
    return tuple(differences)


async def _trade_conflicts(
    connection: AsyncConnection, trades: Sequence[TradeRecord], ids: set[str]
) -> list[TradeConflict]:
    """The trades among ``trades`` with one of ``ids`` (stored already, and neither inserted nor
    refined now) that differ from the stored trade of their id."""
    c = trades_table.c
    stored: dict[str, TradeRecord] = {}
    for chunk in chunks(sorted(ids), rows_per_statement(1)):
        rows = await connection.execute(select(*TRADE_COLUMNS).where(c.trade_id.in_(chunk)))
        stored.update((row.trade_id, TradeRecord(*row)) for row in rows)
    conflicts = []
    for index, trade in enumerate(trades):
        kept = stored.get(trade.trade_id)
        if kept is not None and (fields := trade_differences(kept, trade)):
            conflicts.append(TradeConflict(index, kept, fields))
    return conflicts


def _one_per_trade_id(trades: Sequence[TradeRecord]) -> list[TradeRecord]:
    """A batch's trades with one row per trade id (PostgreSQL refuses to upsert a row twice in
    one statement): the first, or a later one whose time refines it (see ``_refines``)."""
    chosen: dict[str, TradeRecord] = {}
    for trade in trades:
        kept = chosen.setdefault(trade.trade_id, trade)
        whole_second = kept.create_time.microsecond == 0
        if (
            kept is not trade
            and whole_second
            and timedelta(0) < trade.create_time - kept.create_time < timedelta(seconds=1)
        ):
            chosen[trade.trade_id] = trade
    return list(chosen.values())


async def _insert_trades(
    connection: AsyncConnection, trades: Sequence[TradeRecord]
) -> tuple[list[StreamedTrade], int, list[TradeConflict]]:
    """Insert (or refine) ``trades``: the newly stored ones with their stream ids, in id order,
    how many rows were written (refined ones too), and the trades refused because their id names
    a different stored trade (see ``trade_differences``; an identical resend is no conflict).

    Ids are assigned here, above the stored maximum: writes are serialised (the write lock), so
    they increase in commit order. A refined trade keeps its id and is not returned."""
    if not trades:
        return [], 0, []
    unique = (
        _one_per_trade_id(trades) if len({t.trade_id for t in trades}) != len(trades) else trades
    )
    c = trades_table.c
    max_before = (await connection.execute(select(func.max(c.stream_id)))).scalar() or 0
    rows = record_rows(unique)
    for stream_id, row in enumerate(rows, start=max_before + 1):
        row["stream_id"] = stream_id
    insert = insert_for(connection, trades_table)
    statement = insert.on_conflict_do_update(
        index_elements=[c.trade_id],
        set_={"create_time": insert.excluded.create_time},
        # Only the same trade is refined; another one under its id is a conflict, below.
        where=and_(
            _refines(connection, c.create_time, insert.excluded.create_time),
            *(c[name] == insert.excluded[name] for name in _TRADE_FACTS),
        ),
    ).returning(c.stream_id, *TRADE_COLUMNS)
    stored: list[StreamedTrade] = []
    written_ids: set[str] = set()
    for chunk in chunks(rows, rows_per_statement(len(rows[0]))):
        returned = (await connection.execute(statement, list(chunk))).all()
        for stream_id, *trade in returned:
            written_ids.add(trade[0])
            if stream_id > max_before:  # inserted now (a refined one keeps its older id)
                stored.append(StreamedTrade(stream_id, TradeRecord(*trade)))
    stored.sort(key=attrgetter("stream_id"))
    resent = {t.trade_id for t in unique} - written_ids
    conflicts = await _trade_conflicts(connection, trades, resent) if resent else []
    return stored, len(written_ids), conflicts


async def _upsert_gaps(
    connection: AsyncConnection, gaps: Sequence[FeedGapRecord]
) -> list[FeedGapRecord]:
    """Insert gaps, or mark known ones recovered. Recovery only ever moves forward, so a resent
    old report of a gap never un-recovers it."""
    if not gaps:
        return []
    key = ("channel", "subscription_id", "expected_sequence", "detect_time")
    by_key = {attrgetter(*key)(g): g for g in gaps}
    rows = record_rows(list(by_key.values()), exclude=("gap_id",))
    table = feed_gaps_table
    statement = insert_for(connection, table)
    excluded = statement.excluded
    statement = statement.on_conflict_do_update(
        index_elements=[table.c[name] for name in key],
        set_={
            "recovered": or_(table.c.recovered, excluded.recovered),
            "recover_time": func.coalesce(table.c.recover_time, excluded.recover_time),
        },
        where=or_(
            and_(excluded.recovered, ~table.c.recovered),
            and_(table.c.recover_time.is_(None), excluded.recover_time.is_not(None)),
        ),
    ).returning(*FEED_GAP_COLUMNS)
    stored: list[FeedGapRecord] = []
    for chunk in chunks(rows, rows_per_statement(len(rows[0]))):
        stored.extend(
            FeedGapRecord(*row) for row in await connection.execute(statement, list(chunk))
        )
    return sorted(stored, key=attrgetter("gap_id"))


class IngestWriter:
    """Writes ingest batches: one transaction per batch, all or nothing, idempotent."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        # Names this process in its commit notices (see db.commits), so it knows its own.
        self.origin = secrets.token_hex(8)
        self._batches = itertools.count(1)
        # One batch at a time per process: SQLite has one writer anyway, and on PostgreSQL the
        # advisory lock would serialise them all the same, holding a pooled connection each.
        self._lock = asyncio.Lock()
        # Each market's latest stored snapshot (None: it has none), as of this writer's last
        # commit. Asking the database for it cost ≈11 ms per 5,000-row batch; the cache is
        # trusted only while the table's max(id) is still the one this writer left, so a write by
        # anyone else (another process) empties it. kfeed never deletes snapshots; a retention
        # job that did would have to empty it too.
        self._latest: dict[str, SnapshotRecord | None] = {}
        self._latest_as_of_id: int | None = None

    @contextlib.asynccontextmanager
    async def _write_transaction(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that holds SQLite's write lock from its start (``BEGIN IMMEDIATE``),
        committed when the block ends. A connection that does not wait for the lock (the inline
        writer's, db.engine) is told at once that another holds it: it then waits here, without
        blocking the event loop, and tries again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SQLITE_BUSY_TIMEOUT_MS / 1000
        pause = FIRST_BUSY_PAUSE
        while True:
            session = self._sessions()
            try:
                connection = await session.connection(
                    execution_options={SQLITE_BEGIN_MODE: "IMMEDIATE"}
                )
            except OperationalError as error:
                await session.close()
                if not is_sqlite_busy(error):
                    raise
                if loop.time() >= deadline:
                    raise StorageUnavailable("SQLite's write lock is held elsewhere") from error
                await asyncio.sleep(pause)
                pause = min(2 * pause, LAST_BUSY_PAUSE)
                continue
            # Not `async with session`: its exit closes in a shielded task, three turns of the
            # event loop; the inline writer's statements never wait, so nothing can cancel
            # them halfway. Closing rolls back what was not committed.
            try:
                yield connection
                await session.commit()
            finally:
                await session.close()
            return

    async def _latest_stored(
        self, connection: AsyncConnection, tickers: Sequence[str]
    ) -> tuple[list[SnapshotRecord], int]:
        """The latest stored snapshot of each of ``tickers`` that has one; the table's max id."""
        max_id = (await connection.execute(select(func.max(snapshots_table.c.id)))).scalar() or 0
        if max_id != self._latest_as_of_id:
            self._latest.clear()
        missing = [ticker for ticker in tickers if ticker not in self._latest]
        if missing:
            self._latest.update(dict.fromkeys(missing))
            for snapshot in await latest_per_market(connection, missing):
                self._latest[snapshot.ticker] = snapshot
        latest = [s for ticker in tickers if (s := self._latest[ticker]) is not None]
        return latest, max_id

    def _remember_committed(self, stored: Sequence[SnapshotRecord], max_id_before: int) -> None:
        """After commit: the batch's snapshots become their markets' latest where they are."""
        latest = self._latest
        for snapshot in stored:
            current = latest.get(snapshot.ticker)
            if current is None or (snapshot.exchange_time, snapshot.snapshot_id) > (
                current.exchange_time,
                current.snapshot_id,
            ):
                latest[snapshot.ticker] = snapshot
        self._latest_as_of_id = max((s.snapshot_id for s in stored), default=max_id_before)

    async def write_batch(
        self,
        *,
        series: Sequence[SeriesRecord] = (),
        events: Sequence[EventRecord] = (),
        markets: Sequence[MarketRecord] = (),
        snapshots: Sequence[SnapshotRecord] = (),
        trades: Sequence[TradeRecord] = (),
        feed_gaps: Sequence[FeedGapRecord] = (),
        book_changes: Sequence[BookChangeRecord] = (),
        book_checkpoints: Sequence[BookCheckpointRecord] = (),
    ) -> BatchWriteResult:
        """Store one batch in one transaction. Rows already stored (same unique key) and snapshots
        repeating their market's previous state are skipped, so a resent batch stores nothing."""
        async with self._lock:
            result = await self._write_batch(
                series,
                events,
                markets,
                snapshots,
                trades,
                feed_gaps,
                book_changes,
                book_checkpoints,
            )
            if result.latest_as_of is not None:  # committed: the batch is now part of the latest
                self._remember_committed(result.batch.stored_snapshots, result.latest_as_of)
            return result.batch

    async def _write_batch(
        self,
        series: Sequence[SeriesRecord],
        events: Sequence[EventRecord],
        markets: Sequence[MarketRecord],
        snapshots: Sequence[SnapshotRecord],
        trades: Sequence[TradeRecord],
        feed_gaps: Sequence[FeedGapRecord],
        book_changes: Sequence[BookChangeRecord],
        book_checkpoints: Sequence[BookCheckpointRecord],
    ) -> _Committed:
        async with self._write_transaction() as connection:
            if is_postgresql(connection):
                await connection.execute(select(text(f"pg_advisory_xact_lock({_WRITE_LOCK_KEY})")))
            series_count = await upsert_rows(
                connection, series_table, "ticker", series_rows(series)
            )
            events_count = await upsert_rows(
                connection, events_table, "event_ticker", record_rows(events)
            )
            markets_count = await upsert_rows(
                connection, markets_table, "ticker", record_rows(markets, exclude=("update_time",))
            )
            stored_snapshots: list[SnapshotRecord] = []
            unchanged = 0
            max_id_before: int | None = None
            if snapshots:
                tickers = sorted({s.ticker for s in snapshots})
                latest, max_id_before = await self._latest_stored(connection, tickers)
                kept, unchanged = _without_unchanged(snapshots, latest)
                if is_postgresql(connection) and len(kept) >= COPY_THRESHOLD:
                    stored_snapshots = await _insert_snapshots_by_copy(connection, kept, latest)
                else:
                    stored_snapshots = await _insert_snapshots_by_values(connection, kept)
            stored_trades, trades_count, trade_conflicts = await _insert_trades(connection, trades)
            stored_gaps = await _upsert_gaps(connection, feed_gaps)
            books = await insert_book_rows(connection, book_changes, book_checkpoints)
            notice_batch = None
            if is_postgresql(connection) and (
                stored_snapshots or stored_gaps or stored_trades or books.streamed
            ):
                notice_batch = next(self._batches)
                for notice in batch_notices(
                    self.origin,
                    notice_batch,
                    [s.snapshot_id for s in stored_snapshots],
                    [g.gap_id for g in stored_gaps],
                    [t.stream_id for t in stored_trades],
                    [b.stream_id for b in books.streamed],
                ):  # delivered at commit, in commit order
                    await connection.execute(select(func.pg_notify(CHANNEL, notice.payload())))
        counts = WriteCounts(
            series=series_count,
            events=events_count,
            markets=markets_count,
            snapshots=len(stored_snapshots),
            trades=trades_count,
            feed_gaps=len(stored_gaps),
            snapshots_unchanged=unchanged,
            book_changes=books.changes,
            book_checkpoints=books.checkpoints,
        )
        return _Committed(
            BatchWriteResult(
                counts,
                stored_snapshots,
                stored_gaps,
                notice_batch,
                stored_trades,
                books.streamed,
                trade_conflicts,
            ),
            max_id_before,
        )

    async def insert_snapshots(self, snapshots: list[SnapshotRecord]) -> BatchWriteResult:
        """``write_batch`` with snapshots only."""
        return await self.write_batch(snapshots=snapshots)
