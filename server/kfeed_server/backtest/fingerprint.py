"""The data fingerprint: what a run read, so that a stored result shows when the data changed.

See docs/BACKTESTING.md ("Fingerprint")."""

from __future__ import annotations

import hashlib
import marshal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from kfeed_server.backtest.books import BookState
from kfeed_server.backtest.chunks import MARSHAL_VERSION, encode_market_data
from kfeed_server.backtest.fees import DEFAULT_MARKET_FEES, MarketFees
from kfeed_server.backtest.replay_batches import batch_from_records, records_from_batch
from kfeed_server.records import OPTIONAL_SNAPSHOT_FIELDS, MarketRecord, SnapshotRecord, TradeRecord
from kfeed_server.records.backtest import FEE_SCHEDULE_VERSION

FINGERPRINT_VERSION = 2
"""The version new runs fingerprint with (``DataFingerprint.version``). Hashes of different
versions never compare equal, even over the same data: compare a stored run with a rerun of the
same version (``Fingerprinter(version=...)``)."""
FINGERPRINT_VERSIONS = (1, 2)

FINGERPRINT_CHUNK = 4_096
"""Rows per SHA-256 update of a version 1 fingerprint (part of its definition)."""
_RECORDS_PER_BATCH = 65_536
"""Records turned into columns at a time by a version 2 fingerprinter (any size hashes alike)."""

_INT64_LE = np.dtype("<i8")

COLUMN_STREAMS: tuple[str, ...] = (
    "snapshot_id",
    "ticker.length",
    "ticker.utf8",
    "exchange_time",
    "status",
    *(f"{name}{part}" for name in OPTIONAL_SNAPSHOT_FIELDS for part in (".valid", "")),
)
"""Version 2's column streams, in the order their digests are combined (see
``fingerprint_columns``)."""


def _int64_le(column: pa.Array[Any]) -> np.ndarray:
    """An integer or time column's values as little-endian int64 (a time as microseconds since
    the epoch), 0 where null."""
    if column.null_count:
        column = column.fill_null(0)
    if column.type != pa.int64():
        column = column.cast(pa.int64())
    return np.ascontiguousarray(column.to_numpy(), dtype=_INT64_LE)


def _required(batch: pa.RecordBatch, name: str) -> pa.Array[Any]:
    column = batch.column(name)
    if column.null_count:
        raise ValueError(f"a replay batch's {name} column has nulls")
    return column


def fingerprint_columns(batch: pa.RecordBatch) -> list[memoryview]:
    """The bytes each of ``COLUMN_STREAMS`` takes from ``batch`` (a replay batch), in order.

    The layout is fixed, whatever the database or the machine: every integer is a little-endian
    int64 (prices and counts in their fixed-point units, statuses as their stored numbers,
    exchange times as microseconds since the epoch, UTC); a ticker is its UTF-8 byte length (an
    int64) in ``ticker.length`` and its bytes in ``ticker.utf8``; an optional field is one byte a
    row in ``<field>.valid`` (1: present, 0: None) and its value in ``<field>`` (0 for None).
    Streams are the concatenation of the rows' values, so cutting the rows into batches
    differently gives the same bytes."""
    tickers = _required(batch, "ticker")
    if not pa.types.is_string(tickers.type):
        tickers = tickers.cast(pa.string())
    _, offsets_buffer, data = tickers.buffers()
    assert offsets_buffer is not None
    offsets = np.frombuffer(
        memoryview(offsets_buffer), dtype="<i4", count=len(tickers) + 1, offset=4 * tickers.offset
    )
    utf8 = memoryview(data)[offsets[0] : offsets[-1]] if data is not None else memoryview(b"")
    streams = [
        _int64_le(_required(batch, "snapshot_id")).data,
        np.diff(offsets).astype(_INT64_LE).data,
        utf8,
        _int64_le(_required(batch, "exchange_time")).data,
        _int64_le(_required(batch, "status")).data,
    ]
    for name in OPTIONAL_SNAPSHOT_FIELDS:
        column = batch.column(name)
        if column.null_count:
            valid = column.is_valid().to_numpy(zero_copy_only=False).view(np.uint8)
        else:
            valid = np.ones(len(column), dtype=np.uint8)
        streams += [valid.data, _int64_le(column).data]
    return streams


@dataclass(frozen=True, slots=True)
class DataFingerprint:
    """What a run read: snapshot rows replayed, their id range, books and trades replayed
    (``event_count``) and a SHA-256 over all of it and the markets' terms (see
    ``Fingerprinter``), by the definition ``version`` names. Ids are 0 when no row was
    replayed."""

    row_count: int
    first_snapshot_id: int
    last_snapshot_id: int
    content_hash: str
    event_count: int = 0
    version: int = FINGERPRINT_VERSION


class _MarshalRows:
    """Version 1's row part: SHA-256 over the rows in chunks of 4,096, each chunk the ``marshal``
    bytes of ``chunks.encode_market_data``."""

    __slots__ = ("_hash",)
    records_per_update = FINGERPRINT_CHUNK

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add_records(self, rows: list[SnapshotRecord]) -> None:
        """Adds one whole chunk (the last one may be shorter)."""
        self._hash.update(encode_market_data(rows))

    def copy(self) -> _MarshalRows:
        twin = _MarshalRows()
        twin._hash = self._hash.copy()
        return twin

    def digest(self) -> bytes:
        return self._hash.digest()


class _ColumnRows:
    """Version 2's row part: one SHA-256 per column stream (``fingerprint_columns``), so the
    hash depends on the rows and their order only, never on how they were cut into batches; the
    part's digest is the SHA-256 of the streams' digests in their order."""

    __slots__ = ("_streams",)
    records_per_update = _RECORDS_PER_BATCH

    def __init__(self) -> None:
        self._streams = [hashlib.sha256() for _ in COLUMN_STREAMS]

    def add_records(self, rows: list[SnapshotRecord]) -> None:
        self.add_batch(batch_from_records(rows))

    def add_batch(self, batch: pa.RecordBatch) -> None:
        for stream, data in zip(self._streams, fingerprint_columns(batch), strict=True):
            stream.update(data)

    def copy(self) -> _ColumnRows:
        twin = _ColumnRows()
        twin._streams = [stream.copy() for stream in self._streams]
        return twin

    def digest(self) -> bytes:
        combined = hashlib.sha256()
        for stream in self._streams:
            combined.update(stream.digest())
        return combined.digest()


class Fingerprinter:
    """SHA-256 over everything a run read: snapshot rows in replay order (with their count and
    id range), the books and trades replayed, and each market's terms (result, settlement time
    and value, fee type and multiplier, the fee schedule's version). The content hash is the
    SHA-256 of the three parts' digests, so a market that settles after a run changes the
    fingerprint of a rerun over the same rows.

    The rows' part depends on ``version`` (docs/BACKTESTING.md, "Fingerprint"): version 2 hashes
    the columns in a fixed little-endian layout (``fingerprint_columns``), version 1 the
    ``marshal`` encoding of 4,096-row chunks (``chunks.encode_market_data``). Both leave ingest
    metadata (receive_time, source) out, so re-recording the same market data keeps the
    fingerprint. Rows come one at a time (``add`` keeps a reference; they are hashed a batch at a
    time) or as a replay batch of columns (``add_batch``), in any mix: the hash is the same.
    """

    __slots__ = (
        "_event_count",
        "_events",
        "_first_id",
        "_last_id",
        "_pending",
        "_row_count",
        "_rows",
        "_terms",
        "version",
    )

    def __init__(self, version: int = FINGERPRINT_VERSION) -> None:
        if version not in FINGERPRINT_VERSIONS:
            raise ValueError(f"unknown fingerprint version {version}")
        self.version = version
        self._rows: _MarshalRows | _ColumnRows = _MarshalRows() if version == 1 else _ColumnRows()
        self._pending: list[SnapshotRecord] = []
        self._events = hashlib.sha256()
        self._terms = hashlib.sha256()
        self._event_count = 0
        self._row_count = 0
        self._first_id = 0
        self._last_id = 0

    def add(self, s: SnapshotRecord) -> None:
        """Adds one row."""
        pending = self._pending
        pending.append(s)
        if len(pending) >= self._rows.records_per_update:
            self._flush()

    def add_batch(self, batch: pa.RecordBatch) -> None:
        """Adds the rows of a replay batch (``replay_batches``), in order."""
        rows = self._rows
        if isinstance(rows, _MarshalRows):
            for record in records_from_batch(batch):
                self.add(record)
            return
        if not batch.num_rows:
            return
        self._flush()
        ids = batch.column("snapshot_id")
        self._count(batch.num_rows, ids[0].as_py(), ids[-1].as_py())
        rows.add_batch(batch)

    def _flush(self) -> None:
        pending = self._pending
        if pending:
            self._count(len(pending), pending[0].snapshot_id, pending[-1].snapshot_id)
            self._rows.add_records(pending)
            self._pending = []

    def add_event(self, event: BookState | TradeRecord) -> None:
        """Adds a book or a trade the run replayed."""
        if isinstance(event, BookState):
            values: tuple[Any, ...] = (
                "book",
                event.ticker,
                event.exchange_time.timestamp(),
                event.yes_bids,
                event.no_bids,
            )
        else:
            values = (
                "trade",
                event.ticker,
                event.trade_id,
                event.create_time.timestamp(),
                event.yes_price,
                event.no_price,
                event.count,
                int(event.taker_side),
            )
        self._events.update(marshal.dumps(values, MARSHAL_VERSION))
        self._event_count += 1

    def add_terms(
        self,
        tickers: Sequence[str],
        markets: Mapping[str, MarketRecord],
        fees: Mapping[str, MarketFees],
        fee_schedule_version: str,
    ) -> None:
        """Adds what the run knew of its markets: result, settlement time and value, and fee
        terms (of each ticker, in the order given), and the fee schedule's version."""
        values: list[Any] = [fee_schedule_version]
        for ticker in tickers:
            market = markets.get(ticker)
            terms = fees.get(ticker, DEFAULT_MARKET_FEES)
            values.append(
                (
                    ticker,
                    None if market is None else int(market.result),
                    None
                    if market is None or market.settlement_time is None
                    else market.settlement_time.timestamp(),
                    None if market is None else market.settlement_value,
                    str(terms.fee_type),
                    terms.multiplier,
                )
            )
        self._terms.update(marshal.dumps(values, MARSHAL_VERSION))

    def _count(self, rows: int, first_id: int, last_id: int) -> None:
        if not self._row_count:
            self._first_id = first_id
        self._last_id = last_id
        self._row_count += rows

    def copy(self) -> Fingerprinter:
        """An independent fingerprinter holding what this one holds (a sweep's points share the
        rows, then each adds its own terms)."""
        self._flush()
        twin = Fingerprinter(self.version)
        twin._rows = self._rows.copy()
        twin._events = self._events.copy()
        twin._terms = self._terms.copy()
        twin._event_count = self._event_count
        twin._count(self._row_count, self._first_id, self._last_id)
        return twin

    def result(self) -> DataFingerprint:
        """The fingerprint of the rows added so far."""
        self._flush()
        combined = hashlib.sha256()
        combined.update(self._rows.digest())
        for part in (self._events, self._terms):
            combined.update(part.digest())
        return DataFingerprint(
            self._row_count,
            self._first_id,
            self._last_id,
            combined.hexdigest(),
            self._event_count,
            self.version,
        )


def fingerprint(
    events: Iterable[SnapshotRecord | BookState | TradeRecord],
    *,
    tickers: Sequence[str] = (),
    markets: Mapping[str, MarketRecord] | None = None,
    fees: Mapping[str, MarketFees] | None = None,
    fee_schedule_version: str = FEE_SCHEDULE_VERSION,
    version: int = FINGERPRINT_VERSION,
) -> DataFingerprint:
    """The fingerprint of ``events`` as given and of the markets' terms (a run fingerprints the
    events it replays and its tickers' terms), by the definition ``version`` names: a stored
    run's fingerprint is checked against the same version over the same data."""
    fingerprinter = Fingerprinter(version)
    for event in events:
        if isinstance(event, SnapshotRecord):
            fingerprinter.add(event)
        else:
            fingerprinter.add_event(event)
    fingerprinter.add_terms(tickers, markets or {}, fees or {}, fee_schedule_version)
    return fingerprinter.result()
