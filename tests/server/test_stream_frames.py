"""The StreamSnapshots responses assembled from encoded bytes equal the messages the protobuf API
builds, for any run of snapshots and any max_batch_size."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import types_pb2
from kfeed_server.records import (
    OPTIONAL_SNAPSHOT_FIELDS,
    DataSource,
    FeedGapRecord,
    MarketStatus,
    SnapshotRecord,
)
from kfeed_server.streaming.feed import (
    CaughtUpEvent,
    ColumnRun,
    Delivery,
    FeedGapEvent,
    SnapshotRun,
)
from kfeed_server.transport.convert import snapshot_to_proto
from kfeed_server.transport.requests import RequestTokens, new_token_key
from kfeed_server.transport.stream_frames import SnapshotFrames
from kfeed_server.transport.wire import varint
from tests.support.factories import make_gap, make_snapshot, replay_columns

TOKENS = RequestTokens(new_token_key())


def _run(size: int, conflated: bool, fixed: int | None, first_id: int) -> SnapshotRun:
    records = [
        make_snapshot(f"KX-{i % 3}", i, yes_bid=None if i % 4 == 0 else 100 + i).with_id(
            first_id + 2 * i
        )
        for i in range(size)
    ]
    counts = [i % 3 for i in range(size)] if conflated else None
    return SnapshotRun(records, counts, fixed)


def _expected_update(run: SnapshotRun, index: int, in_batch: bool) -> pb.SnapshotUpdate:
    return pb.SnapshotUpdate(
        snapshot=snapshot_to_proto(run.rows[index]),
        coalesced_count=run.coalesced_count(index),
        resume_token=TOKENS.encode_resume_token(run.resume_after_id(index)) if in_batch else "",
    )


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 40),
    max_batch_size=st.integers(0, 12),
    conflated=st.booleans(),
    fixed=st.one_of(st.none(), st.integers(1, 10**12)),
    first_id=st.integers(1, 2**62),
)
def test_frames_equal_the_messages_the_protobuf_api_builds(
    size: int, max_batch_size: int, conflated: bool, fixed: int | None, first_id: int
) -> None:
    run = _run(size, conflated, fixed, first_id)
    frames = SnapshotFrames(TOKENS, cache_size=8)
    index = 0
    for frame, resume_after_id in frames.frames(run, max_batch_size):
        message = pb.StreamSnapshotsResponse.FromString(frame)
        if message.HasField("snapshot_batch"):
            updates = list(message.snapshot_batch.updates)
            assert 1 < len(updates) <= max_batch_size
            expected = [_expected_update(run, index + i, True) for i in range(len(updates))]
        else:
            assert message.HasField("snapshot")
            updates = [message.snapshot]
            expected = [_expected_update(run, index, False)]
        assert updates == expected
        index += len(updates)
        assert resume_after_id == run.resume_after_id(index - 1)
        assert TOKENS.decode_resume_token(message.resume_token) == resume_after_id
        if max_batch_size > 1:
            assert len(updates) == min(max_batch_size, size - index + len(updates))
    assert index == size


def test_other_events_are_single_messages() -> None:
    frames = SnapshotFrames(TOKENS)
    gap: FeedGapRecord = make_gap(3)
    [(caught_up, after)] = frames.frames(Delivery(CaughtUpEvent(12), 40), 100)
    assert pb.StreamSnapshotsResponse.FromString(caught_up) == pb.StreamSnapshotsResponse(
        resume_token=TOKENS.encode_resume_token(40), caught_up=pb.CaughtUp(replayed_count=12)
    )
    assert after == 40
    [(feed_gap, _)] = frames.frames(Delivery(FeedGapEvent(gap), 41), 100)
    assert pb.StreamSnapshotsResponse.FromString(feed_gap).feed_gap.expected_sequence == (
        gap.expected_sequence
    )


def test_varint_matches_the_wire_format() -> None:
    for value in (1, 127, 128, 300, 2**31, 2**63 - 1):
        encoded = types_pb2.MarketSnapshot(snapshot_id=value).SerializeToString()
        assert encoded == b"\x08" + varint(value)


INT64 = st.integers(-(2**63), 2**63 - 1)
OPTIONAL_VALUE = st.one_of(st.none(), st.just(0), st.integers(-5, 300), INT64)
TIMES = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)


@st.composite
def stored_snapshots(draw: st.DrawFn) -> list[SnapshotRecord]:
    count = draw(st.integers(1, 30))
    first_id = draw(st.integers(1, 2**62))
    steps = draw(st.lists(st.integers(1, 2**20), min_size=count, max_size=count))
    rows = []
    snapshot_id = first_id
    for step in steps:
        values = {name: draw(OPTIONAL_VALUE) for name in OPTIONAL_SNAPSHOT_FIELDS}
        record = SnapshotRecord(
            ticker=draw(st.text(min_size=1, max_size=20)),
            exchange_time=draw(TIMES),
            receive_time=draw(TIMES),
            source=draw(st.sampled_from(DataSource)),
            status=draw(st.sampled_from(MarketStatus)),
            snapshot_id=snapshot_id,
            **values,
        )
        rows.append(record)
        snapshot_id += step
    return rows


@settings(max_examples=300, deadline=None)
@given(rows=stored_snapshots(), max_batch_size=st.integers(0, 12))
def test_a_replay_read_as_columns_sends_the_bytes_a_replay_of_rows_sends(
    rows: list[SnapshotRecord], max_batch_size: int
) -> None:
    from_rows = SnapshotFrames(TOKENS).frames(SnapshotRun(rows), max_batch_size)
    run = ColumnRun(replay_columns(rows), rows[-1].snapshot_id)
    from_columns = SnapshotFrames(TOKENS).frames(run, max_batch_size)
    assert list(from_columns) == list(from_rows)


@settings(max_examples=100, deadline=None)
@given(
    ids=st.lists(st.integers(0, 2**63 - 1), max_size=20),
    stream=st.sampled_from(["", "trades", "books"]),
    key=st.binary(min_size=16, max_size=100),
)
def test_resume_tokens_issued_together_are_the_tokens_issued_one_by_one(
    ids: list[int], stream: str, key: bytes
) -> None:
    tokens = RequestTokens(key)
    together = tokens.resume_token_array(np.array(ids, dtype=np.int64), stream=stream)
    assert together.shape == (len(ids), 32)
    one_by_one = [tokens.encode_resume_token(i, stream) for i in ids]
    assert [bytes(row).decode() for row in together] == one_by_one
    assert [tokens.decode_resume_token(t, stream=stream) for t in one_by_one] == ids
