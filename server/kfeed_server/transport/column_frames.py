"""StreamSnapshots responses for a chunk of replayed history read as columns: every snapshot's
``SnapshotBatch.updates`` entry written by numpy, a field at a time for the whole chunk.

A long replay reads stored snapshots as Arrow columns (``ColumnRun``). Building a
``MarketSnapshot`` per row through the protobuf API costs several microseconds a row in Python;
here each field of the wire format (protobuf encoding: tag, then a varint or a length and bytes)
is written for every row at once with a handful of array operations, so the Python cost per row
is the resume token's MAC alone. The bytes are exactly those ``stream_frames`` produces from
records (a property test compares them), so a replay read as columns and one read as rows send
the same responses.

The layout of one row (``SnapshotBatch.updates`` entry)::

    0x0a len( 0x0a len(MarketSnapshot) MarketSnapshot  0x1a 0x20 token[32] )
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from kfeed_server.streaming.feed import ColumnRun
from kfeed_server.transport.requests import RESUME_TOKEN_LENGTH, RequestTokens
from kfeed_server.transport.wire import (
    TAG_RESUME_TOKEN,
    TAG_SNAPSHOT,
    TAG_SNAPSHOT_BATCH,
    TAG_UPDATE_SNAPSHOT,
    TAG_UPDATE_TOKEN,
    TAG_UPDATES,
    varint,
)

Int64s = npt.NDArray[np.int64]
UInt64s = npt.NDArray[np.uint64]
Bools = npt.NDArray[np.bool_]
Bytes = npt.NDArray[np.uint8]

# A varint takes k + 1 bytes for values from 2^(7k) up to 2^(7(k+1)) - 1.
_VARINT_BOUNDS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)
_NANOS_PER_MICRO = 1_000
_MICROS_PER_SECOND = 1_000_000


def varint_sizes(values: UInt64s) -> Int64s:
    """The encoded size of each value as a varint (1–10 bytes)."""
    sizes = np.ones(values.shape, dtype=np.int64)
    for bound in _VARINT_BOUNDS:
        longer = values >= bound
        if not longer.any():
            break
        sizes += longer
    return sizes


def _put_varints(out: Bytes, at: Int64s, values: UInt64s, sizes: Int64s) -> None:
    """Writes each value as a varint at its position."""
    remaining = values
    for k in range(int(sizes.max(initial=0))):
        byte = (remaining & np.uint64(0x7F)).astype(np.uint8)
        byte |= (sizes > k + 1).astype(np.uint8) << 7
        if k < int(sizes.min()):
            out[at + k] = byte
        else:
            live = sizes > k
            out[at[live] + k] = byte[live]
        remaining = remaining >> np.uint64(7)


class _Field:
    """One field of a message for every row: its bytes per row (0 where absent) and how to
    write it at per-row positions."""

    sizes: Int64s

    def write(self, out: Bytes, at: Int64s) -> None:
        raise NotImplementedError


def _everywhere(present: Bools | None) -> Bools | None:
    """None when ``present`` holds for every row: no mask to apply."""
    return None if present is None or present.all() else present


def _copy_bytes(out: Bytes, at: Int64s, data: Bytes, starts: Int64s, lengths: Int64s) -> None:
    """``out[at[i]:at[i] + lengths[i]] = data[starts[i]:starts[i] + lengths[i]]`` for every row,
    rows of one length at a time (tickers come in few lengths, tokens in one)."""
    distinct = np.unique(lengths).tolist()
    for length in distinct:
        rows: Bools | slice = slice(None) if len(distinct) == 1 else lengths == length
        offsets = np.arange(length, dtype=np.int64)
        out[at[rows][:, None] + offsets] = data[starts[rows][:, None] + offsets]


def _where(present: Bools | None, at: Int64s) -> tuple[Bools | slice, Int64s]:
    rows: Bools | slice = slice(None) if present is None else present
    return rows, at[rows]


def _put_tag(out: Bytes, at: Int64s, tag: bytes) -> None:
    for offset, byte in enumerate(tag):
        out[at + offset] = byte


class _Varint(_Field):
    def __init__(self, tag: bytes, values: Int64s, present: Bools | None) -> None:
        self._tag = tag
        self._values = values.view(np.uint64)  # negative int64: ten bytes, as protobuf does
        self._value_sizes = varint_sizes(self._values)
        self._present = present = _everywhere(present)
        sizes = self._value_sizes + len(tag)
        self.sizes = sizes if present is None else sizes * present

    def write(self, out: Bytes, at: Int64s) -> None:
        rows, where = _where(self._present, at)
        _put_tag(out, where, self._tag)
        _put_varints(out, where + len(self._tag), self._values[rows], self._value_sizes[rows])


class _Blob(_Field):
    """A length-delimited field of raw bytes: ``data[starts[i]:starts[i] + lengths[i]]``, not
    written where empty (proto3)."""

    def __init__(self, tag: bytes, data: Bytes, starts: Int64s, lengths: Int64s) -> None:
        self._tag = tag
        self._data = data
        self._present = None if lengths.all() else lengths != 0
        self._starts = starts
        self._lengths = lengths
        self._length_sizes = varint_sizes(lengths.view(np.uint64))
        self.sizes = (len(tag) + self._length_sizes + lengths) * (lengths != 0)

    def write(self, out: Bytes, at: Int64s) -> None:
        rows, where = _where(self._present, at)
        lengths, length_sizes = self._lengths[rows], self._length_sizes[rows]
        _put_tag(out, where, self._tag)
        where = where + len(self._tag)
        _put_varints(out, where, lengths.view(np.uint64), length_sizes)
        _copy_bytes(out, where + length_sizes, self._data, self._starts[rows], lengths)


class _Message(_Field):
    """A length-delimited sub-message made of ``fields`` (each absent where ``present`` is
    not; their own presence must already imply it)."""

    def __init__(self, tag: bytes, fields: Sequence[_Field], present: Bools | None) -> None:
        self._tag = tag
        self._fields = fields
        self._present = present = _everywhere(present)
        inner_sizes = np.zeros_like(fields[0].sizes)
        for field in fields:
            inner_sizes += field.sizes
        self.inner_sizes = inner_sizes
        self.inner_length_sizes = varint_sizes(self.inner_sizes.view(np.uint64))
        sizes = len(tag) + self.inner_length_sizes + self.inner_sizes
        self.sizes = sizes if present is None else sizes * present

    def write(self, out: Bytes, at: Int64s) -> None:
        rows, where = _where(self._present, at)
        _put_tag(out, where, self._tag)
        _put_varints(
            out, where + len(self._tag), self.inner_sizes[rows].view(np.uint64),
            self.inner_length_sizes[rows],
        )  # fmt: skip
        at = at + len(self._tag) + self.inner_length_sizes
        for field in self._fields:
            field.write(out, at)
            at = at + field.sizes


def _and(present: Bools | None, other: Bools) -> Bools:
    return other if present is None else present & other


def _integer(column: pa.Array[Any]) -> tuple[Int64s, Bools | None]:
    """A nullable integer (or time) column as int64 values (0 where null) and where present
    (None: everywhere)."""
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.int64())
    if column.null_count == 0:
        return column.to_numpy().astype(np.int64, copy=False), None
    present = column.is_valid().to_numpy(zero_copy_only=False)
    return column.fill_null(0).to_numpy().astype(np.int64, copy=False), present


def _nonzero_varint(tag: bytes, column: pa.Array[Any]) -> _Varint:
    """A proto3 scalar without presence: written only when set and not zero."""
    values, present = _integer(column)
    return _Varint(tag, values, _and(present, values != 0))


def _timestamp(tag: bytes, column: pa.Array[Any]) -> _Message:
    micros, present = _integer(column)
    seconds = micros // _MICROS_PER_SECOND
    nanos = micros % _MICROS_PER_SECOND * _NANOS_PER_MICRO
    fields = [
        _Varint(b"\x08", seconds, _and(present, seconds != 0)),
        _Varint(b"\x10", nanos, _and(present, nanos != 0)),
    ]
    return _Message(tag, fields, present)


def _fixed_point(tag: bytes, column: pa.Array[Any]) -> _Message:
    """Dollars / Contracts: a message of one int64 (field 1), present when the column is."""
    values, present = _integer(column)
    return _Message(tag, [_Varint(b"\x08", values, _and(present, values != 0))], present)


def _string(tag: bytes, column: pa.Array[Any]) -> _Blob:
    if column.null_count:
        raise ValueError("a replayed string column has no nulls")
    if not pa.types.is_string(column.type):
        column = column.cast(pa.string())
    _, offsets_buffer, data_buffer = column.buffers()
    assert offsets_buffer is not None
    offsets = np.frombuffer(memoryview(offsets_buffer), dtype=np.int32)[
        column.offset : column.offset + len(column) + 1
    ].astype(np.int64)
    data = (
        np.frombuffer(memoryview(data_buffer), dtype=np.uint8)
        if data_buffer is not None
        else np.zeros(0, dtype=np.uint8)
    )
    return _Blob(tag, data, offsets[:-1], np.diff(offsets))


# MarketSnapshot fields 7–17 (Dollars / Contracts), by column name, with their tags.
_FIXED_POINT_TAGS = {
    "yes_bid": b"\x3a",
    "yes_ask": b"\x42",
    "no_bid": b"\x4a",
    "no_ask": b"\x52",
    "yes_bid_size": b"\x5a",
    "yes_ask_size": b"\x62",
    "last_price": b"\x6a",
    "volume": b"\x72",
    "volume_24h": b"\x7a",
    "open_interest": b"\x82\x01",
    "liquidity": b"\x8a\x01",
}


def _market_snapshot_fields(chunk: pa.RecordBatch) -> list[_Field]:
    """MarketSnapshot's fields in field-number order, as upb writes them."""
    column = chunk.column
    sequence, sequence_present = _integer(column("exchange_sequence"))
    return [
        _nonzero_varint(b"\x08", column("snapshot_id")),
        _string(b"\x12", column("ticker")),
        _timestamp(b"\x1a", column("exchange_time")),
        _timestamp(b"\x22", column("receive_time")),
        _nonzero_varint(b"\x28", column("source")),
        # optional int64: written whenever set, zero included
        _Varint(b"\x30", sequence, sequence_present),
        *(_fixed_point(tag, column(name)) for name, tag in _FIXED_POINT_TAGS.items()),
        _nonzero_varint(b"\x90\x01", column("status")),
    ]


@dataclass(frozen=True, slots=True)
class EncodedColumnRun:
    """A chunk's updates entries, one after another in ``data``: row i's entry is
    ``data[entry_starts[i]:entry_starts[i + 1]]``, its SnapshotUpdate without the token
    ``data[update_starts[i]:update_ends[i]]``, its resume token ``tokens[32 i:32 (i + 1)]``."""

    data: bytes
    entry_starts: list[int]
    update_starts: list[int]
    update_ends: list[int]
    tokens: bytes
    ids: list[int]

    def token(self, index: int) -> bytes:
        return self.tokens[RESUME_TOKEN_LENGTH * index : RESUME_TOKEN_LENGTH * (index + 1)]


def encode_column_run(run: ColumnRun, tokens: RequestTokens) -> EncodedColumnRun:
    """Every snapshot of ``run`` as its SnapshotBatch.updates entry, carrying its resume token."""
    chunk = run.columns
    count = chunk.num_rows
    id_values, _ = _integer(chunk.column("snapshot_id"))
    ids: list[int] = id_values.tolist()
    token_bytes = tokens.encode_resume_tokens(ids)
    token_data = np.frombuffer(token_bytes, dtype=np.uint8)
    token_length = np.full(count, RESUME_TOKEN_LENGTH, dtype=np.int64)
    token_starts = np.arange(count, dtype=np.int64) * RESUME_TOKEN_LENGTH
    snapshot = _Message(TAG_UPDATE_SNAPSHOT, _market_snapshot_fields(chunk), None)
    token = _Blob(TAG_UPDATE_TOKEN, token_data, token_starts, token_length)
    entry = _Message(TAG_UPDATES, [snapshot, token], None)
    ends = np.cumsum(entry.sizes)
    starts = ends - entry.sizes
    out = np.empty(int(ends[-1]) if count else 0, dtype=np.uint8)
    entry.write(out, starts)
    update_starts = starts + len(TAG_UPDATES) + entry.inner_length_sizes
    return EncodedColumnRun(
        data=out.tobytes(),
        entry_starts=[*starts.tolist(), int(ends[-1]) if count else 0],
        update_starts=update_starts.tolist(),
        update_ends=(update_starts + snapshot.sizes).tolist(),
        tokens=token_bytes,
        ids=ids,
    )


def column_frames(
    run: ColumnRun, tokens: RequestTokens, max_batch_size: int
) -> Iterator[tuple[bytes, int]]:
    """The responses that send ``run`` (as ``SnapshotFrames.frames`` sends the same rows), each
    with the snapshot id it resumes after."""
    encoded = encode_column_run(run, tokens)
    data, entry_starts = encoded.data, encoded.entry_starts
    count = len(encoded.ids)
    size = max(max_batch_size, 1)
    for start in range(0, count, size):
        end = min(start + size, count)
        last = end - 1
        token = TAG_RESUME_TOKEN + varint(RESUME_TOKEN_LENGTH) + encoded.token(last)
        if end - start == 1:
            update = data[encoded.update_starts[start] : encoded.update_ends[start]]
            yield token + TAG_SNAPSHOT + varint(len(update)) + update, encoded.ids[last]
            continue
        body = data[entry_starts[start] : entry_starts[end]]
        yield token + TAG_SNAPSHOT_BATCH + varint(len(body)) + body, encoded.ids[last]
