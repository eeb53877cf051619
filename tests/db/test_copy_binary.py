"""PostgreSQL's binary COPY stream decoded by the compiled decoder equals the values stored, for
any values (NULLs, extremes, times before 1970 and 2000, any text) and wherever the stream is cut
into pieces."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from kfeed_server.db.copy_binary import CopyDecoder, CopyFormatError, CopyType
from kfeed_server.db.repositories.export import copy_dsn

TYPES = [CopyType.INT64, CopyType.TEXT, CopyType.TIMESTAMP, CopyType.INT16, CopyType.BOOL]
NAMES = ["big", "label", "at", "small", "flag"]
TABLE = (
    "CREATE TEMP TABLE t (n serial, big bigint, label text, at timestamptz, small smallint,"
    " flag boolean)"
)
SELECT = "SELECT big, label, at, small, flag FROM t ORDER BY n"

TIMES = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
ROWS = st.lists(
    st.tuples(
        st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
        st.one_of(st.none(), st.text(alphabet=st.characters(exclude_characters="\x00"))),
        st.one_of(st.none(), TIMES),
        st.one_of(st.none(), st.integers(-(2**15), 2**15 - 1)),
        st.one_of(st.none(), st.booleans()),
    ),
    max_size=40,
)


async def _copy(connection: asyncpg.Connection) -> bytes:
    pieces: list[bytes] = []

    async def received(data: bytes) -> None:
        pieces.append(data)

    await connection.copy_from_query(SELECT, output=received, format="binary")
    return b"".join(pieces)


def _decoded(stream: bytes, cuts: list[int]) -> pa.Table:
    decoder = CopyDecoder(TYPES, NAMES)
    batches = []
    start = 0
    for end in [*sorted(cuts), len(stream)]:
        batch = decoder.feed(stream[start:end])
        start = end
        if batch is not None:
            batches.append(batch)
    assert decoder.finished
    fields: list[pa.Field[Any]] = [
        pa.field("big", pa.int64()),
        pa.field("label", pa.string()),
        pa.field("at", pa.timestamp("us", tz="UTC")),
        pa.field("small", pa.int16()),
        pa.field("flag", pa.bool_()),
    ]
    schema = pa.schema(fields)
    return pa.Table.from_batches(batches, schema=schema)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=ROWS, seed=st.integers(0, 2**32))
async def test_the_decoded_stream_holds_the_stored_values(
    postgres_url: str, rows: list[tuple[object, ...]], seed: int
) -> None:
    connection = await asyncpg.connect(copy_dsn(make_url(postgres_url)))
    try:
        await connection.execute(TABLE)
        await connection.executemany(
            "INSERT INTO t (big, label, at, small, flag) VALUES ($1, $2, $3, $4, $5)", rows
        )
        stream = await _copy(connection)
    finally:
        await connection.close()
    generator = random.Random(seed)
    cuts = [generator.randrange(len(stream) + 1) for _ in range(generator.randrange(6))]
    table = _decoded(stream, cuts)
    assert table.to_pylist() == [dict(zip(NAMES, row, strict=True)) for row in rows]


async def test_times_keep_their_microseconds_across_both_epochs(postgres_url: str) -> None:
    times = [datetime(1999, 12, 31, 23, 59, 59, 999_999, UTC), datetime(1969, 12, 31, tzinfo=UTC)]
    times.append(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=1))
    connection = await asyncpg.connect(copy_dsn(make_url(postgres_url)))
    try:
        await connection.execute(TABLE)
        await connection.executemany("INSERT INTO t (at) VALUES ($1)", [(t,) for t in times])
        stream = await _copy(connection)
    finally:
        await connection.close()
    assert _decoded(stream, [1, 20, 50]).column("at").to_pylist() == times


def test_a_stream_of_other_columns_is_refused() -> None:
    header = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
    two_fields = (2).to_bytes(2, "big") + (8).to_bytes(4, "big") + bytes(8) * 2
    with pytest.raises(CopyFormatError, match="fields"):
        CopyDecoder(TYPES, NAMES).feed(header + two_fields)
    five_fields_narrow = (5).to_bytes(2, "big") + (4).to_bytes(4, "big") + bytes(4)
    with pytest.raises(CopyFormatError, match="width"):
        CopyDecoder(TYPES, NAMES).feed(header + five_fields_narrow + bytes(40))
    with pytest.raises(CopyFormatError, match="not a binary COPY"):
        CopyDecoder(TYPES, NAMES).feed(b"big,label\n" + bytes(20))
