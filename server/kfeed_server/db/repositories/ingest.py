"""The write path of ingest: one transaction per batch, idempotent, unchanged states skipped."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    MetaData,
    Table,
    and_,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.schema import CreateTable
from sqlalchemy.types import TypeDecorator

from kfeed_server.db.engine import SQLITE_BEGIN_MODE
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
    require_aware,
    rows_per_statement,
)
from kfeed_server.db.repositories.markets import record_rows, series_rows, upsert_rows
from kfeed_server.db.repositories.snapshots import SNAPSHOT_COLUMNS, latest_per_market
from kfeed_server.db.repositories.trades import FEED_GAP_COLUMNS
from kfeed_server.records import (
    EventRecord,
    FeedGapRecord,
    MarketRecord,
    SeriesRecord,
    SnapshotRecord,
    TradeRecord,
    WriteCounts,
)

# From this many snapshots on, PostgreSQL batches go through COPY into a staging table.
COPY_THRESHOLD = 500
# Held for the rest of a write transaction on PostgreSQL: snapshot ids are then committed in the
# order they are assigned, so a reader tailing by id never skips a row committed late.
_WRITE_LOCK_KEY = 0x6B_66_65_65_64_01

_TAKE_WRITE_LOCK = select(func.pg_advisory_xact_lock(_WRITE_LOCK_KEY))

_SNAPSHOT_KEY = ("ticker", "source", "exchange_time", "receive_time")
_SNAPSHOT_FIELDS = tuple(
    f.name for f in dataclasses.fields(SnapshotRecord) if f.name != "snapshot_id"
)
_snapshot_values = attrgetter(*_SNAPSHOT_FIELDS)

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
class BatchWriteResult:
    """What one ``write_batch`` stored: counts, and the new snapshots (with ids, in id order) and
    new or changed gaps, for the server to publish to live subscribers after commit."""

    counts: WriteCounts
    stored_snapshots: list[SnapshotRecord] = field(default_factory=list)
    stored_gaps: list[FeedGapRecord] = field(default_factory=list)


def _without_unchanged(
    batch: Sequence[SnapshotRecord], latest_stored: Sequence[SnapshotRecord]
) -> tuple[list[SnapshotRecord], int]:
    """Drop snapshots that repeat their market's previous state (the latest stored one, then the
    previous one kept in this batch, in exchange-time order) and exact repeats of a unique key."""
    previous = {s.ticker: s for s in latest_stored}
    seen_keys: set[tuple[object, ...]] = set()
    kept: list[SnapshotRecord] = []
    unchanged = 0
    for snapshot in sorted(batch, key=attrgetter("exchange_time", "receive_time")):
        key = (snapshot.ticker, snapshot.source, snapshot.exchange_time, snapshot.receive_time)
        if key in seen_keys:
            continue
        seen_keys.add(key)
        before = previous.get(snapshot.ticker)
        if before is not None and snapshot.same_market_state(before):
            unchanged += 1
            continue
        kept.append(snapshot)
        previous[snapshot.ticker] = snapshot
    return kept, unchanged


def _insert_snapshots_statement(connection: AsyncConnection) -> Any:
    statement = insert_for(connection, snapshots_table)
    return statement.on_conflict_do_nothing(
        index_elements=[snapshots_table.c[name] for name in _SNAPSHOT_KEY]
    ).returning(*SNAPSHOT_COLUMNS)


async def _insert_snapshots_by_values(
    connection: AsyncConnection, snapshots: Sequence[SnapshotRecord]
) -> list[SnapshotRecord]:
    rows = [dict(zip(_SNAPSHOT_FIELDS, _snapshot_values(s), strict=True)) for s in snapshots]
    statement = _insert_snapshots_statement(connection)
    stored: list[SnapshotRecord] = []
    for chunk in chunks(rows, rows_per_statement(len(_SNAPSHOT_FIELDS))):
        result = await connection.execute(statement, list(chunk))
        stored.extend(SnapshotRecord(*row) for row in result)
    return stored


async def _insert_snapshots_by_copy(
    connection: AsyncConnection, snapshots: Sequence[SnapshotRecord]
) -> list[SnapshotRecord]:
    """COPY into a per-connection temporary table, then one INSERT … SELECT … ON CONFLICT DO
    NOTHING RETURNING: binary COPY is several times faster than parameterised INSERTs."""
    await connection.execute(CreateTable(_staging, if_not_exists=True))
    records = []
    for ordinal, snapshot in enumerate(snapshots):
        require_aware(snapshot.exchange_time, "exchange_time")
        require_aware(snapshot.receive_time, "receive_time")
        values = list(_snapshot_values(snapshot))
        values[3] = int(values[3])  # source
        values[-1] = int(values[-1])  # status
        values.append(ordinal)
        records.append(values)
    raw = await connection.get_raw_connection()
    await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
        _staging.name, records=records, columns=_STAGING_COLUMNS
    )
    staged = select(*(_staging.c[name] for name in _SNAPSHOT_FIELDS)).order_by(_staging.c.ordinal)
    statement = (
        postgresql.insert(snapshots_table)
        .from_select(list(_SNAPSHOT_FIELDS), staged)
        .on_conflict_do_nothing(index_elements=[snapshots_table.c[n] for n in _SNAPSHOT_KEY])
        .returning(*SNAPSHOT_COLUMNS)
    )
    return [SnapshotRecord(*row) for row in await connection.execute(statement)]


async def _insert_trades(connection: AsyncConnection, trades: Sequence[TradeRecord]) -> int:
    if not trades:
        return 0
    rows = record_rows(trades)
    statement = (
        insert_for(connection, trades_table)
        .on_conflict_do_nothing(index_elements=[trades_table.c.trade_id])
        .returning(trades_table.c.trade_id)
    )
    stored = 0
    for chunk in chunks(rows, rows_per_statement(len(rows[0]))):
        stored += len((await connection.execute(statement, list(chunk))).all())
    return stored


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
        # One batch at a time per process: SQLite has one writer anyway, and on PostgreSQL the
        # advisory lock would serialise them all the same, holding a pooled connection each.
        self._lock = asyncio.Lock()

    async def write_batch(
        self,
        *,
        series: Sequence[SeriesRecord] = (),
        events: Sequence[EventRecord] = (),
        markets: Sequence[MarketRecord] = (),
        snapshots: Sequence[SnapshotRecord] = (),
        trades: Sequence[TradeRecord] = (),
        feed_gaps: Sequence[FeedGapRecord] = (),
    ) -> BatchWriteResult:
        """Store one batch in one transaction. Rows already stored (same unique key) and snapshots
        repeating their market's previous state are skipped, so a resent batch stores nothing."""
        async with self._lock, self._sessions.begin() as session:
            connection = await session.connection(
                execution_options={SQLITE_BEGIN_MODE: "IMMEDIATE"}
            )
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
            if snapshots:
                tickers = sorted({s.ticker for s in snapshots})
                latest = await latest_per_market(connection, tickers)
                kept, unchanged = _without_unchanged(snapshots, latest)
                if is_postgresql(connection) and len(kept) >= COPY_THRESHOLD:
                    stored_snapshots = await _insert_snapshots_by_copy(connection, kept)
                else:
                    stored_snapshots = await _insert_snapshots_by_values(connection, kept)
                stored_snapshots.sort(key=attrgetter("snapshot_id"))
            trades_count = await _insert_trades(connection, trades)
            stored_gaps = await _upsert_gaps(connection, feed_gaps)
        counts = WriteCounts(
            series=series_count,
            events=events_count,
            markets=markets_count,
            snapshots=len(stored_snapshots),
            trades=trades_count,
            feed_gaps=len(stored_gaps),
            snapshots_unchanged=unchanged,
        )
        return BatchWriteResult(counts, stored_snapshots, stored_gaps)

    async def insert_snapshots(self, snapshots: list[SnapshotRecord]) -> BatchWriteResult:
        """``write_batch`` with snapshots only."""
        return await self.write_batch(snapshots=snapshots)
