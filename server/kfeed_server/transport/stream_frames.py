"""StreamSnapshots responses built as wire bytes, each snapshot encoded once.

A streamed snapshot is the same for every subscriber; only the message around it (its resume
token, and whether it travels alone or in a ``snapshot_batch``) differs. So each snapshot is
encoded once into its ``SnapshotUpdate`` bytes (kept by id while live subscribers need them), and
a response is put together by concatenation, following the protobuf wire format: a
length-delimited field is its tag, the varint length and the payload, and a message is its fields
one after another. Building the same response with the protobuf API copies every sub-message
into it (≈3 µs a snapshot, per subscriber) instead of joining bytes (≈0.1 µs).

The gRPC server sends these bytes as they are (``stream_writer``); the web listener decodes them
for its codecs. Tests parse the bytes back and compare them with messages built the ordinary
way.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar, cast

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import types_pb2
from kfeed_server.records import SnapshotRecord
from kfeed_server.streaming.feed import (
    CaughtUpEvent,
    ColumnRun,
    Delivery,
    FeedGapEvent,
    FeedItem,
    HeartbeatEvent,
    SnapshotRun,
    SubscriberGapEvent,
)
from kfeed_server.streaming.hub import LiveChunk
from kfeed_server.transport.convert import feed_gap_to_proto, snapshot_fields, timestamp
from kfeed_server.transport.requests import RequestTokens
from kfeed_server.transport.wire import (
    TAG_COALESCED_COUNT,
    TAG_RESUME_TOKEN,
    TAG_SNAPSHOT,
    TAG_SNAPSHOT_BATCH,
    TAG_UPDATE_SNAPSHOT,
    TAG_UPDATE_TOKEN,
    TAG_UPDATES,
    length_delimited,
    varint,
)

MAX_BATCH_SIZE = 10_000
# Encoded snapshots kept for live subscribers: several seconds of a busy feed.
ENCODED_CACHE_SIZE = 65_536
# Encoded live chunks (a batch, or one market's part of it) kept for the subscribers they reach.
ENCODED_CHUNK_CACHE_SIZE = 4_096


def _snapshot_update(snapshot: SnapshotRecord) -> bytes:
    """SnapshotUpdate{snapshot} as bytes (its coalesced count, when any, is appended later)."""
    encoded = types_pb2.MarketSnapshot(**snapshot_fields(snapshot)).SerializeToString()
    return length_delimited(TAG_UPDATE_SNAPSHOT, encoded)


class SnapshotFrames:
    """Turns a feed's items into StreamSnapshots responses (wire bytes).

    ``max_batch_size`` ≤ 1: one snapshot per message, as before batching existed. Above 1: a run
    of several ready snapshots goes out in ``snapshot_batch`` messages of up to that many, each
    update carrying the token that resumes right after it and the message the token of its last;
    a snapshot ready alone still goes out as ``snapshot``. One instance serves all streams of a
    server: its cache holds each recent snapshot encoded once."""

    def __init__(self, tokens: RequestTokens, cache_size: int = ENCODED_CACHE_SIZE) -> None:
        self._tokens = tokens
        self._cache_size = cache_size
        # snapshot id -> (SnapshotUpdate bytes; its batch entry, the update with its own token as
        # a SnapshotBatch.updates field; that token, resuming right after the snapshot).
        self._encoded: OrderedDict[int, tuple[bytes, bytes, bytes]] = OrderedDict()
        # live chunk serial -> its snapshots as consecutive SnapshotBatch.updates fields.
        self._chunk_entries: OrderedDict[int, bytes] = OrderedDict()

    def _token(self, resume_after_id: int) -> bytes:
        return self._tokens.encode_resume_token(resume_after_id).encode()

    def _encoded_snapshot(self, snapshot: SnapshotRecord) -> tuple[bytes, bytes, bytes]:
        cache = self._encoded
        snapshot_id = snapshot.snapshot_id
        encoded = cache.get(snapshot_id)
        if encoded is None:
            update = _snapshot_update(snapshot)
            token = self._token(snapshot_id)
            entry = length_delimited(
                TAG_UPDATES, update + length_delimited(TAG_UPDATE_TOKEN, token)
            )
            encoded = cache[snapshot_id] = (update, entry, token)
            if len(cache) > self._cache_size:
                cache.popitem(last=False)
        return encoded

    def _resume_token(self, run: SnapshotRun, index: int) -> bytes:
        """The token resuming after the run's snapshot at ``index`` (signed once per id)."""
        if run.fixed_resume_after_id is not None:
            return self._token(run.fixed_resume_after_id)
        return self._encoded_snapshot(run.rows[index])[2]

    def _entry(self, run: SnapshotRun, index: int) -> bytes:
        """The run's snapshot at ``index`` as a SnapshotBatch.updates field."""
        update, entry, _ = self._encoded_snapshot(run.rows[index])
        coalesced = run.coalesced_count(index)
        if not coalesced and run.fixed_resume_after_id is None:
            return entry
        if coalesced:
            update += TAG_COALESCED_COUNT + varint(coalesced)
        token = length_delimited(TAG_UPDATE_TOKEN, self._resume_token(run, index))
        return length_delimited(TAG_UPDATES, update + token)

    def _chunk_body(self, chunk: LiveChunk) -> bytes:
        """The snapshots of a live chunk as SnapshotBatch.updates fields, joined once per chunk
        for every subscriber it reaches."""
        if chunk.serial is None:
            return self._joined_entries(chunk)
        cache = self._chunk_entries
        body = cache.get(chunk.serial)
        if body is None:
            body = cache[chunk.serial] = self._joined_entries(chunk)
            if len(cache) > ENCODED_CHUNK_CACHE_SIZE:
                cache.popitem(last=False)
        return body

    def _joined_entries(self, chunk: LiveChunk) -> bytes:
        snapshots = cast(Sequence[SnapshotRecord], chunk.items)
        return b"".join([self._encoded_snapshot(snapshot)[1] for snapshot in snapshots])

    def _alone(self, run: SnapshotRun, index: int) -> bytes:
        """The run's snapshot at ``index`` as a StreamSnapshotsResponse.snapshot field."""
        update = self._encoded_snapshot(run.rows[index])[0]
        coalesced = run.coalesced_count(index)
        if coalesced:
            update += TAG_COALESCED_COUNT + varint(coalesced)
        return length_delimited(TAG_SNAPSHOT, update)

    def frames(
        self, item: FeedItem[SnapshotRecord], max_batch_size: int
    ) -> Iterator[tuple[bytes, int]]:
        """The responses that send ``item``, each with the snapshot id it resumes after."""
        if isinstance(item, Delivery):
            message = event_message(
                item, self._tokens.encode_resume_token, pb.StreamSnapshotsResponse
            )
            yield message.SerializeToString(), item.resume_after_id
            return
        if isinstance(item, ColumnRun):
            # numba, imported when the first replay is read as columns, not at start-up
            from kfeed_server.transport.column_frames import column_frames

            yield from column_frames(item, self._tokens, max_batch_size)
            return
        count = len(item.rows)
        size = max(max_batch_size, 1)
        if item.chunks is not None and 1 < count <= size:  # whole live chunks, one message
            token = length_delimited(TAG_RESUME_TOKEN, self._resume_token(item, count - 1))
            body = b"".join([self._chunk_body(chunk) for chunk in item.chunks])
            yield (
                token + length_delimited(TAG_SNAPSHOT_BATCH, body),
                item.resume_after_id(count - 1),
            )
            return
        for start in range(0, count, size):
            end = min(start + size, count)
            resume_after_id = item.resume_after_id(end - 1)
            token = length_delimited(TAG_RESUME_TOKEN, self._resume_token(item, end - 1))
            if end - start == 1:
                yield token + self._alone(item, start), resume_after_id
                continue
            body = b"".join([self._entry(item, index) for index in range(start, end)])
            yield token + length_delimited(TAG_SNAPSHOT_BATCH, body), resume_after_id


StreamResponse = TypeVar(
    "StreamResponse",
    pb.StreamSnapshotsResponse,
    pb.StreamTradesResponse,
    pb.StreamOrderBooksResponse,
)


def event_message(
    delivery: Delivery, resume_token: Callable[[int], str], response: type[StreamResponse]
) -> StreamResponse:
    """The response (of a snapshot, trade or order-book stream) for an event other than a row.
    Feed gaps of order-book streams are sent by ``book_stream``."""
    token = resume_token(delivery.resume_after_id)
    event = delivery.event
    if isinstance(event, CaughtUpEvent):
        return response(
            resume_token=token, caught_up=pb.CaughtUp(replayed_count=event.replayed_count)
        )
    if isinstance(event, HeartbeatEvent):
        return response(
            resume_token=token, heartbeat=pb.Heartbeat(server_time=timestamp(event.server_time))
        )
    if isinstance(event, SubscriberGapEvent):
        return response(
            resume_token=token, subscriber_gap=pb.SubscriberGap(dropped_count=event.dropped_count)
        )
    assert isinstance(event, FeedGapEvent)
    gap = pb.StreamSnapshotsResponse(resume_token=token, feed_gap=feed_gap_to_proto(event.gap))
    assert isinstance(gap, response)  # the hub routes feed gaps to snapshot streams only
    return gap
