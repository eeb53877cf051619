"""A compact, canonical byte encoding of snapshot rows: what the fingerprint hashes and what the
service ships to a worker process.

One encoding serves both purposes, so the rows are serialised once: the service encodes each chunk
it reads (in the server process, in parallel with the worker replaying the previous chunk), hashes
the encoded market data as it goes, and the worker decodes the chunk back into records.

A chunk's *market data* is ``marshal`` format version 2 (no object references, so the bytes depend
only on the values, never on object identity) of the triple ``(columns, times, statuses)``:
``columns`` one list per field of ``MARKET_COLUMNS`` (snapshot_id, ticker, exchange_sequence,
yes_bid, yes_ask, no_bid, no_ask, yes_bid_size, yes_ask_size, last_price, volume, volume_24h,
open_interest, liquidity) with None for a missing value, ``times`` the exchange times as POSIX
seconds (float), ``statuses`` the market statuses as ints. Ingest metadata (receive_time, source)
travels beside it, unhashed. Columns, not rows: the worker's compiled path turns them into numpy
arrays without building a record per row.
"""

from __future__ import annotations

import marshal
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

import numpy as np
import pyarrow as pa

from kfeed_server.records import (
    OPTIONAL_SNAPSHOT_FIELDS,
    DataSource,
    MarketStatus,
    SnapshotRecord,
)

# Version 2 is the last marshal version without back-references (added in version 3), so equal
# values always encode to equal bytes.
MARSHAL_VERSION = 2

MARKET_COLUMNS = ("snapshot_id", "ticker", *OPTIONAL_SNAPSHOT_FIELDS)
"""The market-data columns of a chunk, in order."""
_COLUMN_GETTERS = [attrgetter(name) for name in MARKET_COLUMNS]
_EXCHANGE_TIME = attrgetter("exchange_time")
_RECEIVE_TIME = attrgetter("receive_time")
_STATUS = attrgetter("status")
_SOURCE = attrgetter("source")
_timestamp = datetime.timestamp


@dataclass(frozen=True, slots=True)
class EncodedChunk:
    """Consecutive snapshot rows, encoded (see the module docstring). ``market_data`` is what the
    fingerprint hashes; ``metadata`` holds (receive times, sources)."""

    market_data: bytes
    metadata: bytes
    row_count: int
    first_snapshot_id: int
    last_snapshot_id: int


def encode_market_data(rows: Sequence[SnapshotRecord]) -> bytes:
    """The canonical bytes of ``rows``' market data, column by column (C-level maps, no per-row
    bytecode)."""
    return marshal.dumps(
        (
            [list(map(getter, rows)) for getter in _COLUMN_GETTERS],
            list(map(_timestamp, map(_EXCHANGE_TIME, rows))),
            list(map(int, map(_STATUS, rows))),
        ),
        MARSHAL_VERSION,
    )


def market_columns(chunk: EncodedChunk) -> tuple[list[list[Any]], list[float]]:
    """The chunk's market-data columns (in ``MARKET_COLUMNS`` order: snapshot id, ticker, then
    the optional fields) and exchange times (POSIX seconds), as the worker receives them."""
    columns, times, _ = marshal.loads(chunk.market_data)
    return columns, times


def encode_chunk(rows: Sequence[SnapshotRecord]) -> EncodedChunk:
    """``rows`` (not empty) as one chunk."""
    if not rows:
        raise ValueError("cannot encode an empty chunk")
    metadata = marshal.dumps(
        (
            list(map(_timestamp, map(_RECEIVE_TIME, rows))),
            list(map(int, map(_SOURCE, rows))),
        ),
        MARSHAL_VERSION,
    )
    return EncodedChunk(
        encode_market_data(rows),
        metadata,
        len(rows),
        rows[0].snapshot_id,
        rows[-1].snapshot_id,
    )


# Microsecond counts up to 2^53 convert to float exactly, and then one division by 10^6 rounds as
# ``datetime.timestamp()`` does (an exact integer division, correctly rounded): ±285 years of 1970.
_EXACT_MICROS = 2**53


def _seconds(times: pa.ChunkedArray[Any]) -> list[float]:
    """Times as POSIX seconds, equal to ``datetime.timestamp()`` of each."""
    micros = times.cast(pa.int64()).to_numpy()
    if len(micros) and int(np.abs(micros).max()) >= _EXACT_MICROS:
        return [m / 1_000_000 for m in micros.tolist()]
    return (micros / 1_000_000).tolist()  # type: ignore[no-any-return]


def _values(column: pa.ChunkedArray[Any]) -> list[Any]:
    """A column's Python values, None where null."""
    if column.null_count:
        return column.to_pylist()
    return column.to_numpy().tolist()  # type: ignore[no-any-return]


def _encode_columns(rows: pa.Table) -> EncodedChunk:
    """``rows`` (not empty; the replay schema of db.repositories.export) as one chunk, byte for
    byte what ``encode_chunk`` makes of the same rows as records."""
    column = rows.column
    ids = _values(column("snapshot_id"))
    market_data = marshal.dumps(
        (
            [ids, *(_values(column(name)) for name in MARKET_COLUMNS[1:])],
            _seconds(column("exchange_time")),
            _values(column("status")),
        ),
        MARSHAL_VERSION,
    )
    metadata = marshal.dumps(
        (_seconds(column("receive_time")), _values(column("source"))), MARSHAL_VERSION
    )
    return EncodedChunk(market_data, metadata, rows.num_rows, ids[0], ids[-1])


@dataclass(frozen=True, slots=True)
class TimedChunk:
    """An encoded chunk and the exchange time of its last row (books and trades up to it are
    sent before it)."""

    chunk: EncodedChunk
    last_exchange_time: datetime


def _timed(rows: pa.Table) -> TimedChunk:
    last_time: datetime = rows.column("exchange_time")[-1].as_py()
    return TimedChunk(_encode_columns(rows), last_time)


class ColumnChunker:
    """Cuts snapshots read as columns (record batches of the replay schema, of any sizes, in the
    run's order) into encoded chunks of ``size`` rows: no record per row on the way."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def add(self, batch: pa.RecordBatch) -> list[TimedChunk]:
        """The chunks completed by ``batch``."""
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if self._pending_rows < self._size:
            return []
        rows = pa.Table.from_batches(self._pending)
        whole = self._pending_rows - self._pending_rows % self._size
        chunks = [_timed(rows.slice(start, self._size)) for start in range(0, whole, self._size)]
        self._pending = rows.slice(whole).to_batches()
        self._pending_rows -= whole
        return chunks

    def finish(self) -> TimedChunk | None:
        """The last, shorter chunk (None when nothing is left)."""
        if not self._pending_rows:
            return None
        chunk = _timed(pa.Table.from_batches(self._pending))
        self._pending, self._pending_rows = [], 0
        return chunk


def decode_chunk(chunk: EncodedChunk) -> list[SnapshotRecord]:
    """The records ``chunk`` was encoded from (equal field by field)."""
    columns, times, statuses = marshal.loads(chunk.market_data)
    receive_times, sources = marshal.loads(chunk.metadata)
    from_timestamp = datetime.fromtimestamp
    statuses_by_value = {int(s): s for s in MarketStatus}
    sources_by_value = {int(s): s for s in DataSource}
    make = SnapshotRecord._make
    ids, tickers, *optional = columns
    # A record is (ticker, exchange_time, receive_time, source, *the optional fields, status, id).
    return [
        make((ticker, from_timestamp(time, UTC), from_timestamp(received, UTC),
              sources_by_value[source], *values, statuses_by_value[status], snapshot_id))
        for snapshot_id, ticker, time, received, source, status, *values in zip(
            ids, tickers, times, receive_times, sources, statuses, *optional, strict=True
        )
    ]  # fmt: skip
