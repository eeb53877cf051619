"""StreamSnapshots responses for a chunk of replayed history read as columns, written by one
compiled loop straight from the columns.

A long replay reads stored snapshots as Arrow columns (``ColumnRun``). Building a
``MarketSnapshot`` per row through the protobuf API costs several microseconds a row in Python,
and writing each field for all rows with numpy array operations still cost ≈1.5 µs a row in
dozens of passes over the chunk. Here a numba kernel walks the rows once to size every message
(protobuf's length prefixes come before their payload) and once to write the responses — the
batch's resume token, then each snapshot's ``SnapshotBatch.updates`` entry with its own token —
into one buffer, with the GIL released, so the event loop keeps serving while a chunk is
encoded in a worker thread. The resume tokens come from ``resume_macs`` (also compiled). The
bytes are exactly those ``stream_frames`` produces from records (a property test compares them
for any values), so a replay read as columns and one read as rows send the same responses.

One response of several snapshots::

    0x0a 0x20 token[last]  0x3a len( entry entry … )
    entry = 0x0a len( 0x0a len(MarketSnapshot) MarketSnapshot  0x1a 0x20 token[32] )

A response of one snapshot: ``0x0a 0x20 token  0x12 len( 0x0a len(MarketSnapshot) … )``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from numba import njit

from kfeed_server.streaming.feed import ColumnRun
from kfeed_server.transport.requests import RequestTokens
from kfeed_server.transport.resume_macs import TOKEN_BYTES

Int64s = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]
Bytes = npt.NDArray[np.uint8]

# How each of MarketSnapshot's fields 3–18 is written.
_TIMESTAMP = 0  # google.protobuf.Timestamp (seconds, nanos) from microseconds; present when set
_NONZERO = 1  # an enum: written when set and not zero (proto3)
_OPTIONAL = 2  # optional int64: written when set, zero included
_FIXED_POINT = 3  # Dollars / Contracts: a message of one int64 (field 1); present when set

# MarketSnapshot fields 3–18 in field-number order (as upb writes them): column, tag, kind.
_FIELDS: tuple[tuple[str, bytes, int], ...] = (
    ("exchange_time", b"\x1a", _TIMESTAMP),
    ("receive_time", b"\x22", _TIMESTAMP),
    ("source", b"\x28", _NONZERO),
    ("exchange_sequence", b"\x30", _OPTIONAL),
    ("yes_bid", b"\x3a", _FIXED_POINT),
    ("yes_ask", b"\x42", _FIXED_POINT),
    ("no_bid", b"\x4a", _FIXED_POINT),
    ("no_ask", b"\x52", _FIXED_POINT),
    ("yes_bid_size", b"\x5a", _FIXED_POINT),
    ("yes_ask_size", b"\x62", _FIXED_POINT),
    ("last_price", b"\x6a", _FIXED_POINT),
    ("volume", b"\x72", _FIXED_POINT),
    ("volume_24h", b"\x7a", _FIXED_POINT),
    ("open_interest", b"\x82\x01", _FIXED_POINT),
    ("liquidity", b"\x8a\x01", _FIXED_POINT),
    ("status", b"\x90\x01", _NONZERO),
)
_KINDS = np.array([kind for _, _, kind in _FIELDS], dtype=np.int64)
_TAG_SIZES = np.array([len(tag) for _, tag, _ in _FIELDS], dtype=np.int64)
_TAGS = np.array([[*tag, 0][:2] for _, tag, _ in _FIELDS], dtype=np.uint8)

# The framing bytes (transport/wire.py names them): StreamSnapshotsResponse.resume_token,
# .snapshot, .snapshot_batch; SnapshotBatch.updates; SnapshotUpdate.snapshot, .resume_token;
# MarketSnapshot.snapshot_id, .ticker; Timestamp.seconds, .nanos; Dollars/Contracts.value.
_RESPONSE_TOKEN, _SNAPSHOT, _SNAPSHOT_BATCH = 0x0A, 0x12, 0x3A
_UPDATES, _UPDATE_SNAPSHOT, _UPDATE_TOKEN = 0x0A, 0x0A, 0x1A
_SNAPSHOT_ID, _TICKER, _FIRST_FIELD, _SECOND_FIELD = 0x08, 0x12, 0x08, 0x10
# A token field: tag, length (32), the token.
_TOKEN_FIELD = 2 + TOKEN_BYTES
_MICROS_PER_SECOND = 1_000_000
_NANOS_PER_MICRO = 1_000


@njit(inline="always")
def _varint_size(value: int) -> int:
    """Bytes of ``value`` as a varint (a negative int64: ten, as protobuf writes it)."""
    remaining = np.uint64(value)
    size = 1
    while remaining >= np.uint64(0x80):
        remaining >>= np.uint64(7)
        size += 1
    return size


@njit(inline="always")
def _put_varint(out: Bytes, at: int, value: int) -> int:
    remaining = np.uint64(value)
    while remaining >= np.uint64(0x80):
        out[at] = np.uint8((remaining & np.uint64(0x7F)) | np.uint64(0x80))
        remaining >>= np.uint64(7)
        at += 1
    out[at] = np.uint8(remaining)
    return at + 1


@njit(inline="always")
def _scalar_size(value: int) -> int:
    """A varint field written when not zero: its tag (one byte) and value, or nothing."""
    return 0 if value == 0 else 1 + _varint_size(value)


@njit(inline="always")
def _inner_size(kind: int, value: int) -> int:
    """The payload size of a Timestamp / fixed-point message holding ``value``."""
    if kind == _TIMESTAMP:
        seconds = value // _MICROS_PER_SECOND
        nanos = value % _MICROS_PER_SECOND * _NANOS_PER_MICRO
        return _scalar_size(seconds) + _scalar_size(nanos)
    return _scalar_size(value)


@njit(cache=True, nogil=True)
def _snapshot_sizes(ids: Int64s, offsets: Int64s, values: Int64s, valid: Bools) -> Int64s:
    """Each row's MarketSnapshot size in bytes."""
    count = len(ids)
    sizes = np.empty(count, dtype=np.int64)
    for row in range(count):
        ticker = offsets[row + 1] - offsets[row]
        size = _scalar_size(ids[row])
        if ticker:
            size += 1 + _varint_size(ticker) + ticker
        for field in range(len(_KINDS)):
            if not valid[field, row]:
                continue
            kind = _KINDS[field]
            value = values[field, row]
            if kind == _NONZERO:
                size += 0 if value == 0 else _TAG_SIZES[field] + _varint_size(value)
            elif kind == _OPTIONAL:
                size += _TAG_SIZES[field] + _varint_size(value)
            else:
                inner = _inner_size(kind, value)
                size += _TAG_SIZES[field] + _varint_size(inner) + inner
        sizes[row] = size
    return sizes


@njit(inline="always")
def _put_scalar(out: Bytes, at: int, tag: int, value: int) -> int:
    if value == 0:
        return at
    out[at] = tag
    return _put_varint(out, at + 1, value)


@njit(inline="always")
def _put_snapshot(
    out: Bytes,
    at: int,
    row: int,
    ids: Int64s,
    offsets: Int64s,
    text: Bytes,
    values: Int64s,
    valid: Bools,
) -> int:
    at = _put_scalar(out, at, _SNAPSHOT_ID, ids[row])
    start, end = offsets[row], offsets[row + 1]
    if end > start:
        out[at] = _TICKER
        at = _put_varint(out, at + 1, end - start)
        out[at : at + end - start] = text[start:end]
        at += end - start
    for field in range(len(_KINDS)):
        if not valid[field, row]:
            continue
        kind = _KINDS[field]
        value = values[field, row]
        if kind == _NONZERO and value == 0:
            continue
        for k in range(_TAG_SIZES[field]):
            out[at + k] = _TAGS[field, k]
        at += _TAG_SIZES[field]
        if kind in (_NONZERO, _OPTIONAL):
            at = _put_varint(out, at, value)
        elif kind == _TIMESTAMP:
            seconds = value // _MICROS_PER_SECOND
            nanos = value % _MICROS_PER_SECOND * _NANOS_PER_MICRO
            at = _put_varint(out, at, _scalar_size(seconds) + _scalar_size(nanos))
            at = _put_scalar(out, at, _FIRST_FIELD, seconds)
            at = _put_scalar(out, at, _SECOND_FIELD, nanos)
        else:
            at = _put_varint(out, at, _scalar_size(value))
            at = _put_scalar(out, at, _FIRST_FIELD, value)
    return at


@njit(inline="always")
def _put_token(out: Bytes, at: int, tag: int, tokens: Bytes, row: int) -> int:
    out[at] = tag
    out[at + 1] = TOKEN_BYTES
    out[at + 2 : at + _TOKEN_FIELD] = tokens[row]
    return at + _TOKEN_FIELD


@njit(cache=True, nogil=True)
def _encode(
    ids: Int64s,
    offsets: Int64s,
    text: Bytes,
    values: Int64s,
    valid: Bools,
    tokens: Bytes,
    batch_size: int,
) -> tuple[Bytes, Int64s]:
    """The responses sending the rows ``batch_size`` at a time, one after another in one
    buffer, and where each ends."""
    count = len(ids)
    snapshot = _snapshot_sizes(ids, offsets, values, valid)
    # SnapshotUpdate{snapshot}, and that with its token as a SnapshotBatch.updates entry.
    update = np.empty(count, dtype=np.int64)
    entry = np.empty(count, dtype=np.int64)
    for row in range(count):
        update[row] = 1 + _varint_size(snapshot[row]) + snapshot[row]
        inner = update[row] + _TOKEN_FIELD
        entry[row] = 1 + _varint_size(inner) + inner
    frames = (count + batch_size - 1) // batch_size
    ends = np.empty(frames, dtype=np.int64)
    total = 0
    for frame in range(frames):
        first = frame * batch_size
        last = min(first + batch_size, count) - 1
        body = update[first] if first == last else entry[first : last + 1].sum()
        total += _TOKEN_FIELD + 1 + _varint_size(body) + body
        ends[frame] = total
    out = np.empty(total, dtype=np.uint8)
    at = 0
    for frame in range(frames):
        first = frame * batch_size
        last = min(first + batch_size, count) - 1
        at = _put_token(out, at, _RESPONSE_TOKEN, tokens, last)
        if first == last:
            out[at] = _SNAPSHOT
            at = _put_varint(out, at + 1, update[first])
            out[at] = _UPDATE_SNAPSHOT
            at = _put_varint(out, at + 1, snapshot[first])
            at = _put_snapshot(out, at, first, ids, offsets, text, values, valid)
            continue
        out[at] = _SNAPSHOT_BATCH
        at = _put_varint(out, at + 1, entry[first : last + 1].sum())
        for row in range(first, last + 1):
            out[at] = _UPDATES
            at = _put_varint(out, at + 1, update[row] + _TOKEN_FIELD)
            out[at] = _UPDATE_SNAPSHOT
            at = _put_varint(out, at + 1, snapshot[row])
            at = _put_snapshot(out, at, row, ids, offsets, text, values, valid)
            at = _put_token(out, at, _UPDATE_TOKEN, tokens, row)
    return out, ends


def _int64s(column: pa.Array[Any]) -> Int64s:
    """A non-null integer (or time) column's values as int64, without a copy where it is one."""
    if pa.types.is_timestamp(column.type):
        column = column.view(pa.int64())
    elif column.type != pa.int64():
        column = column.cast(pa.int64())
    buffer = column.buffers()[1]
    assert buffer is not None
    values = np.frombuffer(memoryview(buffer), dtype=np.int64)
    return values[column.offset : column.offset + len(column)]


def _ticker_column(column: pa.Array[Any]) -> tuple[Int64s, Bytes]:
    """Every row's ticker as UTF-8: row i is ``text[offsets[i]:offsets[i + 1]]``."""
    if column.null_count:
        raise ValueError("a replayed ticker is never null")
    if not pa.types.is_large_string(column.type):
        column = column.cast(pa.large_string())
    _, offsets_buffer, data_buffer = column.buffers()
    assert offsets_buffer is not None
    offsets = np.frombuffer(memoryview(offsets_buffer), dtype=np.int64)
    # Read-only either way: the kernel is compiled for one kind of array.
    text = np.frombuffer(memoryview(data_buffer) if data_buffer is not None else b"", np.uint8)
    return offsets[column.offset : column.offset + len(column) + 1], text


def _field_columns(chunk: pa.RecordBatch) -> tuple[Int64s, Bools]:
    """MarketSnapshot fields 3–18 for every row: values (anything where null) and whether set,
    a row per field."""
    count = chunk.num_rows
    values = np.zeros((len(_FIELDS), count), dtype=np.int64)
    valid = np.ones((len(_FIELDS), count), dtype=np.bool_)
    for field, (name, _, _) in enumerate(_FIELDS):
        column = chunk.column(name)
        if column.null_count:
            valid[field] = column.is_valid().to_numpy(zero_copy_only=False)
            column = column.fill_null(0)
        values[field] = _int64s(column)
    return values, valid


def column_frames(
    run: ColumnRun, tokens: RequestTokens, max_batch_size: int
) -> Iterator[tuple[bytes, int]]:
    """The responses that send ``run`` (as ``SnapshotFrames.frames`` sends the same rows), each
    with the snapshot id it resumes after."""
    chunk = run.columns
    count = chunk.num_rows
    if not count:
        return
    ids = _int64s(chunk.column("snapshot_id")).copy()  # writable, as the kernels are compiled for
    offsets, text = _ticker_column(chunk.column("ticker"))
    values, valid = _field_columns(chunk)
    size = max(max_batch_size, 1)
    data, ends = _encode(
        ids, offsets, text, values, valid, tokens.resume_token_array(ids), size
    )  # fmt: skip
    last_rows = np.minimum(np.arange(1, len(ends) + 1) * size, count) - 1
    view = data.data
    start = 0
    for end, resume_after_id in zip(ends.tolist(), ids[last_rows].tolist(), strict=True):
        yield bytes(view[start:end]), resume_after_id
        start = end


def warm_up() -> None:
    """Compiles the kernels (or loads them from numba's disk cache: seconds either way) by
    encoding a two-row chunk, so that the first long replay does not wait for them."""
    fields: list[pa.Field[Any]] = [
        pa.field("snapshot_id", pa.int64()),
        pa.field("ticker", pa.string()),
    ]
    columns: list[pa.Array[Any]] = [pa.array([1, 2], pa.int64()), pa.array(["W", "W"])]
    for name, _, kind in _FIELDS:
        arrow_type = pa.timestamp("us", tz="UTC") if kind == _TIMESTAMP else pa.int64()
        fields.append(pa.field(name, arrow_type))
        columns.append(pa.array([1, None], arrow_type))
    chunk = pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields))
    tokens = RequestTokens(bytes(TOKEN_BYTES))
    for _ in column_frames(ColumnRun(chunk, 2), tokens, 2):
        pass
