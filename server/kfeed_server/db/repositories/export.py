"""Bulk reads as Apache Arrow record batches, for the Export RPCs (ADR 0016).

A table is exported through an :class:`ExportSpec`: which columns, under which names and Arrow
types, filtered by ticker / event / series and a time window, in which order. The rows never
become Python objects. On PostgreSQL the query runs as ``COPY … TO STDOUT (FORMAT binary)`` on a
connection of its own, and a compiled decoder turns the stream into Arrow in a worker thread
(ADR 0022). On SQLite a read-only connection of the ADBC SQLite driver steps the query and fills
Arrow arrays in C, in a worker thread (ADR 0023).

Either way the batches have exactly the spec's schema: prices and counts as int64 fixed point
(1/10,000 USD, 1/100 contract), times as ``timestamp[us, UTC]``, enums as their lowercase names.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import adbc_driver_sqlite.dbapi as adbc_sqlite
import asyncpg
import pyarrow as pa
import pyarrow.compute as pc
from adbc_driver_sqlite import StatementOptions as SqliteStatementOptions
from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    CompoundSelect,
    Select,
    SmallInteger,
    Text,
    select,
    union_all,
)
from sqlalchemy import type_coerce as coerce
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.types import TypeEngine

from kfeed_server.db.engine import SQLITE_BUSY_TIMEOUT_MS
from kfeed_server.db.models import (
    book_changes_table,
    markets_table,
    snapshots_table,
    trades_table,
)
from kfeed_server.records import DataSource, MarketStatus, Side

if TYPE_CHECKING:
    from kfeed_server.db.copy_binary import CopyType

UTC_MICROS = pa.timestamp("us", tz="UTC")
PRICE_UNIT = "USD/10000"
COUNT_UNIT = "contracts/100"
# Rows per batch read from SQLite (PostgreSQL batches are the driver's, ≈16 MiB).
SQLITE_BATCH_ROWS = 65_536
EXPORT_APPLICATION_NAME = "kfeed-export"
# A columnar read's connection: named in pg_stat_activity, and the literal SQL's strings read
# with standard quoting.
_COPY_SETTINGS = {
    "application_name": EXPORT_APPLICATION_NAME,
    "standard_conforming_strings": "on",
}
# PostgreSQL's COPY stream is decoded in pieces of about this many bytes (≈40,000 snapshots),
# up to this many received ahead of the decoder.
COPY_PIECE_BYTES = 8 * 1024 * 1024
COPY_PIECES_AHEAD = 2
# Stream replays read as columns at once per server (each on a connection of its own).
MAX_COLUMN_REPLAYS = 4


def _enum_names(members: type[enum.IntEnum]) -> pa.Array[Any]:
    """The lowercase names of an IntEnum whose values are 0, 1, 2, …, indexed by value."""
    ordered = sorted(members, key=int)
    if [int(m) for m in ordered] != list(range(len(ordered))):
        raise ValueError(f"{members.__name__} values are not 0..n-1")
    return pa.array([m.name.lower() for m in ordered], pa.string())


@dataclass(frozen=True)
class ExportColumn:
    """One exported column: its name, the table column it reads, its Arrow type, and for an
    enum column the enum whose names replace the stored numbers."""

    name: str
    source: ColumnElement[Any]
    arrow_type: pa.DataType
    enum_type: type[enum.IntEnum] | None = None
    unit: str | None = None
    names: pa.Array[Any] | None = field(init=False, default=None, compare=False)

    def __post_init__(self) -> None:
        if self.enum_type is not None:
            object.__setattr__(self, "names", _enum_names(self.enum_type))

    @property
    def field(self) -> pa.Field[Any]:
        metadata = {"unit": self.unit} if self.unit else None
        return pa.field(self.name, self.arrow_type, nullable=True, metadata=metadata)

    def raw_type(self) -> TypeEngine[Any]:
        """The SQL type read without SQLAlchemy's conversions (a time is its stored integer on
        SQLite, an enum its number)."""
        if self.enum_type is not None or self.arrow_type == pa.int16():
            return SmallInteger()
        if self.arrow_type == pa.string():
            return Text()
        if self.arrow_type == pa.bool_():
            return Boolean()
        return BigInteger()

    def from_values(self, values: Sequence[Any]) -> pa.Array[Any]:
        """This column from Python values as SQLite returns them."""
        if self.enum_type is not None:
            return self.from_codes(pa.array(values, pa.int16()))
        if self.arrow_type == UTC_MICROS:
            return pa.array(values, pa.int64()).cast(UTC_MICROS)
        return pa.array(values, self.arrow_type)

    def from_codes(self, codes: pa.Array[Any]) -> pa.Array[Any]:
        """An enum column's names from its stored numbers (nulls stay null)."""
        assert self.names is not None
        return pc.take(self.names, codes)


@dataclass(frozen=True)
class ExportSpec:
    """How one table is exported: columns, the time the window applies to, and the order."""

    columns: tuple[ExportColumn, ...]
    ticker: ColumnElement[str]
    time: ColumnElement[datetime]
    order_by: tuple[ColumnElement[Any], ...]
    # The stored row id (increasing in commit order), for reads that continue after one.
    row_id: ColumnElement[int] | None = None
    schema: pa.Schema = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "schema", pa.schema([c.field for c in self.columns]))


@dataclass(frozen=True, slots=True)
class ExportFilter:
    """Which rows: of ``tickers`` (None: any), of the markets of ``event_ticker`` and/or
    ``series_ticker``, with ``start <= time < end``; with ``after_row_id`` / ``last_row_id``
    only rows of a higher / not higher id (the spec's ``row_id``); at most ``limit`` of them."""

    tickers: Sequence[str] | None = None
    event_ticker: str | None = None
    series_ticker: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    after_row_id: int | None = None
    last_row_id: int | None = None
    limit: int | None = None


_s = snapshots_table.c
_t = trades_table.c


def _price(name: str, source: ColumnElement[Any]) -> ExportColumn:
    return ExportColumn(name, source, pa.int64(), unit=PRICE_UNIT)


def _count(name: str, source: ColumnElement[Any]) -> ExportColumn:
    return ExportColumn(name, source, pa.int64(), unit=COUNT_UNIT)


SNAPSHOT_EXPORT = ExportSpec(
    columns=(
        ExportColumn("snapshot_id", _s.id, pa.int64()),
        ExportColumn("ticker", _s.ticker, pa.string()),
        ExportColumn("exchange_time", _s.exchange_time, UTC_MICROS),
        ExportColumn("receive_time", _s.receive_time, UTC_MICROS),
        ExportColumn("source", _s.source, pa.string(), enum_type=DataSource),
        ExportColumn("exchange_sequence", _s.exchange_sequence, pa.int64()),
        _price("yes_bid", _s.yes_bid),
        _price("yes_ask", _s.yes_ask),
        _price("no_bid", _s.no_bid),
        _price("no_ask", _s.no_ask),
        _count("yes_bid_size", _s.yes_bid_size),
        _count("yes_ask_size", _s.yes_ask_size),
        _price("last_price", _s.last_price),
        _count("volume", _s.volume),
        _count("volume_24h", _s.volume_24h),
        _count("open_interest", _s.open_interest),
        _price("liquidity", _s.liquidity),
        ExportColumn("status", _s.status, pa.string(), enum_type=MarketStatus),
    ),
    ticker=_s.ticker,
    time=_s.exchange_time,
    # The order they were stored in (the stream's resume-token order): a scan of the primary
    # key, which on PostgreSQL reads the heap in order; (ticker, time) order costs a sort or
    # random heap reads and is one sort_by away on the client.
    order_by=(_s.id,),
)

TRADE_EXPORT = ExportSpec(
    columns=(
        ExportColumn("trade_id", _t.trade_id, pa.string()),
        ExportColumn("ticker", _t.ticker, pa.string()),
        ExportColumn("create_time", _t.create_time, UTC_MICROS),
        _price("yes_price", _t.yes_price),
        _price("no_price", _t.no_price),
        _count("count", _t.count),
        ExportColumn("taker_side", _t.taker_side, pa.string(), enum_type=Side),
    ),
    ticker=_t.ticker,
    time=_t.create_time,
    order_by=(_t.create_time, _t.trade_id),
)


SNAPSHOT_REPLAY = ExportSpec(
    # A stream's replay (transport/column_frames.py encodes it): the snapshot columns with the
    # enums as their stored numbers, in id order.
    columns=tuple(
        ExportColumn(c.name, c.source, pa.int16()) if c.enum_type is not None else c
        for c in SNAPSHOT_EXPORT.columns
    ),
    ticker=_s.ticker,
    time=_s.exchange_time,
    order_by=(_s.id,),
    row_id=_s.id,
)

# A backtest's read: the same columns in replay order, (exchange time, id).
SNAPSHOT_BACKTEST = replace(SNAPSHOT_REPLAY, order_by=(_s.exchange_time, _s.id))
# PostgreSQL settings of a backtest's read (its connection's own): the merge of ordered index
# reads is what the query is written for, but the default costs (spinning disks) make the planner
# prefer a sequential scan and a sort of the whole window, which holds back the first row until
# every row is sorted; and JIT compiling costs ≈ 80 ms a read and saves nothing here.
_MERGE_SETTINGS = ("SET enable_sort = off", "SET jit = off")

_b = book_changes_table.c

BOOK_CHANGE_EXPORT = ExportSpec(
    columns=(
        ExportColumn("ticker", _b.ticker, pa.string()),
        ExportColumn("exchange_time", _b.exchange_time, UTC_MICROS),
        ExportColumn("receive_time", _b.receive_time, UTC_MICROS),
        # The exchange's sequence number of the frame; 0 when unknown.
        ExportColumn("sequence", _b.sequence, pa.int64()),
        ExportColumn("side", _b.side, pa.string(), enum_type=Side),
        _price("price", _b.price),
        # The level's new size; 0: the level is gone.
        _count("size", _b.size),
    ),
    ticker=_b.ticker,
    time=_b.exchange_time,
    # A market's changes in the order they apply (the key's order, the frame's sequence first).
    order_by=(_b.ticker, _b.exchange_time, _b.sequence, _b.side, _b.price),
)


def export_query(spec: ExportSpec, rows: ExportFilter) -> Select[Any]:
    """The spec's SELECT for ``rows``, every column read in its raw SQL type."""
    statement = select(*(coerce(c.source, c.raw_type()) for c in spec.columns))
    if rows.tickers is not None:
        statement = statement.where(spec.ticker.in_(list(rows.tickers)))
    if rows.event_ticker is not None or rows.series_ticker is not None:
        markets = select(markets_table.c.ticker)
        if rows.event_ticker is not None:
            markets = markets.where(markets_table.c.event_ticker == rows.event_ticker)
        if rows.series_ticker is not None:
            markets = markets.where(markets_table.c.series_ticker == rows.series_ticker)
        statement = statement.where(spec.ticker.in_(markets))
    if rows.start is not None:
        statement = statement.where(spec.time >= rows.start)
    if rows.end is not None:
        statement = statement.where(spec.time < rows.end)
    if rows.after_row_id is not None or rows.last_row_id is not None:
        assert spec.row_id is not None, "a row id bound needs a spec with a row id"
        if rows.after_row_id is not None:
            statement = statement.where(spec.row_id > rows.after_row_id)
        if rows.last_row_id is not None:
            statement = statement.where(spec.row_id <= rows.last_row_id)
    return statement.order_by(*spec.order_by).limit(rows.limit)


MAX_MERGED_MARKETS = 64
"""Up to this many markets, a backtest's read merges one ordered read per market."""


def backtest_query(rows: ExportFilter) -> Select[Any] | CompoundSelect[Any]:
    """``SNAPSHOT_BACKTEST``'s query for ``rows``: for a few markets, each market's rows read in
    (exchange_time, id) order along its index, merged in that order (PostgreSQL's Merge Append,
    SQLite's MERGE (UNION ALL)). The rows stream from the first one: a single query over the
    markets is sorted by the database first, on disk at a million rows, before any arrives."""
    tickers = rows.tickers
    if tickers is None or not 1 < len(tickers) <= MAX_MERGED_MARKETS:
        return export_query(SNAPSHOT_BACKTEST, rows)
    markets = [
        select(export_query(SNAPSHOT_BACKTEST, replace(rows, tickers=[ticker])).subquery())
        for ticker in tickers
    ]
    merged = union_all(*markets)
    merged_columns = merged.selected_columns
    return merged.order_by(merged_columns.exchange_time, merged_columns.id)


def literal_sql(statement: Select[Any] | CompoundSelect[Any], dialect: Dialect) -> str:
    """An export's query as one SQL string with its values inlined, for ADBC.

    The driver reads through COPY only without bind parameters (with them it returns the whole
    result as one batch), so SQLAlchemy renders the values as literals: strings quoted with
    ``''`` (read under standard_conforming_strings, which the reader sets), times as ISO-8601."""
    return str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def copy_dsn(url: URL) -> str:
    """The libpq URI of a ``postgresql+asyncpg://`` SQLAlchemy URL, for a columnar read's own
    connection."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class ArrowExportReader:
    """Reads an export spec's rows as record batches of its schema, on either database."""

    def __init__(self, engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._engine = engine
        self._sessions = sessions
        # Each columnar read holds a connection of its own: stream replays, which many
        # subscribers may start at once, take turns for a few (the others wait, as they would
        # for a pooled connection).
        self._replay_slots = asyncio.Semaphore(MAX_COLUMN_REPLAYS)

    def batches(self, spec: ExportSpec, rows: ExportFilter) -> AsyncIterator[pa.RecordBatch]:
        """The rows of ``spec`` that ``rows`` selects, in the spec's order, as record batches
        (possibly none)."""
        return self._query_batches(spec, export_query(spec, rows))

    def _query_batches(
        self,
        spec: ExportSpec,
        statement: Select[Any] | CompoundSelect[Any],
        settings: Sequence[str] = (),
    ) -> AsyncIterator[pa.RecordBatch]:
        """``statement``'s rows (the columns of ``spec``) as record batches; ``settings`` are
        run first on PostgreSQL's connection (the read's own)."""
        sql = literal_sql(statement, self._engine.dialect)
        if self._engine.dialect.name == "postgresql":
            return copy_batches(copy_dsn(self._engine.url), sql, spec, settings)
        database = self._engine.url.database
        if database and database != ":memory:" and not database.startswith("file:"):
            return _threaded_batches(partial(_SqliteStream.open, database, sql, spec))
        return self._sqlalchemy_batches(spec, statement)

    def snapshots_after_id(
        self,
        after_id: int,
        *,
        tickers: Sequence[str] | None,
        min_exchange_time: datetime | None,
        limit: int,
    ) -> AsyncIterator[pa.RecordBatch]:
        """Up to ``limit`` snapshots with ``snapshot_id > after_id`` in id order, of ``tickers``
        (None: every market), not older than ``min_exchange_time``: a stream's replay read as
        columns (``SNAPSHOT_REPLAY`` batches; streaming.feed.ColumnHistory)."""
        rows = ExportFilter(
            tickers=tickers, start=min_exchange_time, after_row_id=after_id, limit=limit
        )
        return self._taking_turns(self.batches(SNAPSHOT_REPLAY, rows))

    async def _taking_turns(
        self, batches: AsyncIterator[pa.RecordBatch]
    ) -> AsyncIterator[pa.RecordBatch]:
        async with self._replay_slots:
            async for batch in batches:
                yield batch

    def snapshots_for_backtest(
        self, tickers: Sequence[str], start: datetime, end: datetime, *, max_snapshot_id: int
    ) -> AsyncIterator[pa.RecordBatch]:
        """The snapshots of ``tickers`` with ``start <= exchange_time < end`` and an id up to
        ``max_snapshot_id`` (the run's pinned data set), in (exchange_time, snapshot_id) order,
        as ``SNAPSHOT_BACKTEST`` batches: one query, sorted by the database."""
        rows = ExportFilter(tickers=tickers, start=start, end=end, last_row_id=max_snapshot_id)
        return self._query_batches(SNAPSHOT_BACKTEST, backtest_query(rows), _MERGE_SETTINGS)

    async def _sqlalchemy_batches(
        self, spec: ExportSpec, statement: Select[Any] | CompoundSelect[Any]
    ) -> AsyncIterator[pa.RecordBatch]:
        """An in-memory (or URI-named) SQLite database has no second connection to read from:
        its rows come through the engine's own."""
        async with self._sessions() as session:
            connection = await session.connection()
            result = await connection.stream(statement)
            async for rows in result.partitions(SQLITE_BATCH_ROWS):
                yield _batch_of_rows(spec, rows)


class _BatchStream(Protocol):
    """A running export query on a connection of its own; every call blocks, and all come from
    one thread."""

    def read_next(self) -> pa.RecordBatch | None:
        """The next batch in the spec's schema; None at the end."""

    def close(self) -> None: ...


async def _threaded_batches(
    open_stream: Callable[[], _BatchStream],
) -> AsyncIterator[pa.RecordBatch]:
    # One thread runs every driver call of this export in turn: a driver connection is not
    # thread-safe, and a cancelled export must not close it under a read still in flight (the
    # close is queued behind it, and not awaited, so a cancellation cannot skip it). The next
    # batch is read while the caller handles this one: the driver decodes without the GIL, and
    # the database produces rows meanwhile.
    loop = asyncio.get_running_loop()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kfeed-export")
    try:
        stream = await loop.run_in_executor(worker, open_stream)
        try:
            reading = loop.run_in_executor(worker, stream.read_next)
            while (batch := await reading) is not None:
                reading = loop.run_in_executor(worker, stream.read_next)
                yield batch
        finally:
            worker.submit(stream.close)
    finally:
        worker.shutdown(wait=False)


def _batch_of_rows(spec: ExportSpec, rows: Sequence[Sequence[Any]]) -> pa.RecordBatch:
    """Rows as SQLite returns them (raw types: integer times, enum numbers), one array per
    column."""
    columns = zip(spec.columns, zip(*rows, strict=True), strict=True)
    return pa.RecordBatch.from_arrays(
        [column.from_values(values) for column, values in columns], schema=spec.schema
    )


def _copy_type(column: ExportColumn) -> CopyType:
    """How ``column`` comes in the binary COPY of ``export_query`` (its stored SQL type)."""
    from kfeed_server.db.copy_binary import CopyType

    if column.arrow_type == UTC_MICROS:
        return CopyType.TIMESTAMP
    raw = column.raw_type()
    if isinstance(raw, SmallInteger):
        return CopyType.INT16
    if isinstance(raw, Text):
        return CopyType.TEXT
    if isinstance(raw, Boolean):
        return CopyType.BOOL
    return CopyType.INT64


def _spec_batch(spec: ExportSpec, batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch of the stored values as the spec's schema: enum numbers become names, and other
    columns take the spec's type (nothing to do for the COPY decoder's; SQLite's driver gives
    int64, which becomes a time without a copy)."""
    arrays = [
        column.from_codes(array) if column.enum_type is not None else array.cast(column.arrow_type)
        for column, array in zip(spec.columns, batch.columns, strict=True)
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=spec.schema)


async def copy_batches(
    dsn: str, sql: str, spec: ExportSpec, settings: Sequence[str] = ()
) -> AsyncIterator[pa.RecordBatch]:
    """``sql`` read on a connection of its own (``settings`` run on it first) as
    ``COPY (sql) TO STDOUT (FORMAT binary)``: asyncpg receives the stream on the event loop, and
    each piece of about ``COPY_PIECE_BYTES`` is decoded into a record batch of the spec's schema
    in a worker thread (copy_binary, compiled, without the GIL) while the next piece arrives."""
    from kfeed_server.db.copy_binary import CopyDecoder, CopyFormatError  # numba: at first use

    decoder = CopyDecoder([_copy_type(c) for c in spec.columns], [c.name for c in spec.columns])
    connection = await asyncpg.connect(dsn, server_settings=_COPY_SETTINGS)
    try:
        for setting in settings:
            await connection.execute(setting)
    except BaseException:
        connection.terminate()
        raise
    pieces: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=COPY_PIECES_AHEAD)
    gathered: list[bytes] = []
    gathered_bytes = 0

    async def received(data: bytes) -> None:
        nonlocal gathered_bytes
        gathered.append(data)
        gathered_bytes += len(data)
        if gathered_bytes >= COPY_PIECE_BYTES:
            piece = b"".join(gathered)
            gathered.clear()
            gathered_bytes = 0
            await pieces.put(piece)

    async def copy() -> None:
        try:
            await connection.copy_from_query(sql, output=received, format="binary")
            if gathered:
                await pieces.put(b"".join(gathered))
        finally:
            await pieces.put(None)

    def decode(piece: bytes) -> pa.RecordBatch | None:
        batch = decoder.feed(piece)
        return None if batch is None else _spec_batch(spec, batch)

    copying = asyncio.create_task(copy())
    try:
        while (piece := await pieces.get()) is not None:
            batch = await asyncio.to_thread(decode, piece)
            if batch is not None:
                yield batch
        await copying  # its error, if it failed
        if not decoder.finished:
            raise CopyFormatError("the binary COPY stream ended before its end marker")
    finally:
        if not copying.done():
            copying.cancel()
            with contextlib.suppress(BaseException):
                await copying
        connection.terminate()


class _SqliteStream:
    """The query on its own read-only connection to the database file (WAL: a consistent
    snapshot beside the server's writers), through the ADBC SQLite driver, which steps SQLite
    and fills Arrow arrays in C: no Python object per row (ADR 0023). Every call runs in the
    export's thread; the driver works without the GIL.

    The driver types each column from the values of the first batch: integers as int64 (times
    and enum numbers too), text as strings, a column NULL throughout that batch as int64. Only
    integer columns of an export may be NULL (every text column is NOT NULL), so the types hold
    for the whole result; ``_spec_batch`` casts them to the spec's."""

    def __init__(
        self, spec: ExportSpec, connection: adbc_sqlite.AdbcSqliteConnection, sql: str
    ) -> None:
        self._spec = spec
        self._connection = connection
        self._cursor = connection.cursor()
        self._cursor.adbc_statement.set_options(
            **{SqliteStatementOptions.BATCH_ROWS.value: str(SQLITE_BATCH_ROWS)}
        )
        self._cursor.execute(sql)
        self._reader = self._cursor.fetch_record_batch()

    @classmethod
    def open(cls, database: str, sql: str, spec: ExportSpec) -> _SqliteStream:
        path = Path(database).expanduser().resolve()
        # autocommit: no transaction of the driver's around the query (which is its own).
        connection = adbc_sqlite.connect(f"{path.as_uri()}?mode=ro", autocommit=True)
        try:
            # A transient lock (another process recovering the WAL, say) is waited out as the
            # server's own connections wait it out.
            with connection.cursor() as cursor:
                cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            return cls(spec, connection, sql)
        except BaseException:
            connection.close()
            raise

    def read_next(self) -> pa.RecordBatch | None:
        while True:
            try:
                stored = self._reader.read_next_batch()
            except StopIteration:
                return None
            if stored.num_rows:
                return _spec_batch(self._spec, stored)

    def close(self) -> None:
        self._cursor.close()
        self._connection.close()
