"""Snapshot rows as Arrow record batches: what the service reads, ships to a worker process and
fingerprints (ADR 0021).

A *replay batch* has the columns of ``db.repositories.export.SNAPSHOT_BACKTEST``, by name:
snapshot_id, ticker, exchange_time, receive_time, source, the optional fields
(``OPTIONAL_SNAPSHOT_FIELDS``), status — integers as int64 (the enums as their stored int16
numbers), times as ``timestamp[us, UTC]``, the ticker as a string. It crosses the pipe to the
worker as one Arrow IPC stream (schema and batch), which the worker maps without copying; the
compiled path takes numpy views of the columns and the event engine builds records from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

import numpy as np
import pyarrow as pa

from kfeed_server.records import OPTIONAL_SNAPSHOT_FIELDS, DataSource, MarketStatus, SnapshotRecord

UTC_MICROS = pa.timestamp("us", tz="UTC")

_FIELDS: list[pa.Field[Any]] = [
    pa.field("snapshot_id", pa.int64()),
    pa.field("ticker", pa.string()),
    pa.field("exchange_time", UTC_MICROS),
    pa.field("receive_time", UTC_MICROS),
    pa.field("source", pa.int16()),
    *(pa.field(name, pa.int64()) for name in OPTIONAL_SNAPSHOT_FIELDS),
    pa.field("status", pa.int16()),
]
REPLAY_SCHEMA = pa.schema(_FIELDS)
"""The replay batch's columns (the export spec's schema without its unit metadata)."""

# An Arrow IPC stream message starts with the continuation marker; a pickle starts with its
# PROTO opcode (0x80), so the worker tells the two apart by the first four bytes.
IPC_MARKER = b"\xff\xff\xff\xff"

_GETTERS = {name: attrgetter(name) for name in SnapshotRecord._fields}
_STATUSES = {int(s): s for s in MarketStatus}
_SOURCES = {int(s): s for s in DataSource}


def batch_from_records(rows: Sequence[SnapshotRecord]) -> pa.RecordBatch:
    """``rows`` as a replay batch (the columns built in C from one list per field)."""
    arrays: list[pa.Array[Any]] = []
    for field in REPLAY_SCHEMA:
        values = list(map(_GETTERS[field.name], rows))
        if field.type == pa.int16():
            values = list(map(int, values))
        arrays.append(pa.array(values, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=REPLAY_SCHEMA)


def _micros(column: pa.Array[Any]) -> np.ndarray:
    """A time column as int64 microseconds since the epoch (no copy)."""
    return column.cast(pa.int64()).to_numpy()


def _datetimes(column: pa.Array[Any]) -> list[datetime]:
    """A time column as UTC datetimes (converted in C, then given the zone)."""
    naive = _micros(column).astype("datetime64[us]").astype(object)
    return [moment.replace(tzinfo=UTC) for moment in naive]


def _values(column: pa.Array[Any]) -> list[Any]:
    """A column's Python values, None where null."""
    if column.null_count:
        return column.to_pylist()
    return column.to_numpy(zero_copy_only=False).tolist()  # type: ignore[no-any-return]


def records_from_batch(batch: pa.RecordBatch) -> list[SnapshotRecord]:
    """The records of a replay batch, equal field by field to the stored rows."""
    column = batch.column
    sources = [_SOURCES[s] for s in _values(column("source"))]
    statuses = [_STATUSES[s] for s in _values(column("status"))]
    optional = [_values(column(name)) for name in OPTIONAL_SNAPSHOT_FIELDS]
    make = SnapshotRecord._make
    # A record is (ticker, exchange_time, receive_time, source, *the optional fields, status, id).
    return [
        make((ticker, time, received, source, *values, status, snapshot_id))
        for snapshot_id, ticker, time, received, source, status, *values in zip(
            _values(column("snapshot_id")), _values(column("ticker")),
            _datetimes(column("exchange_time")), _datetimes(column("receive_time")),
            sources, statuses, *optional, strict=True,
        )
    ]  # fmt: skip


def to_ipc(batch: pa.RecordBatch) -> pa.Buffer:
    """``batch`` as one Arrow IPC stream (its schema, then the batch)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def from_ipc(data: bytes) -> pa.RecordBatch:
    """The batch of an IPC stream made by ``to_ipc`` (its buffers point into ``data``)."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_next_batch()


def last_exchange_time(batch: pa.RecordBatch) -> datetime:
    """The exchange time of the batch's last row (not empty)."""
    moment: datetime = batch.column("exchange_time")[-1].as_py()
    return moment
