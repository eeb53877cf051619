"""StreamSnapshots with max_batch_size: history and live snapshots in snapshot_batch messages,
each resumable exactly; old clients unchanged; stream limits (streams per peer, a subscriber that
stops reading). A real server over loopback, on both databases."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.streaming import feed as feed_module
from kfeed_server.transport.convert import timestamp
from tests.server.test_stream_snapshots import (
    A,
    B,
    Messages,
    Stream,
    caught_up,
    kinds,
    millis,
    read,
    read_until,
    snapshots,
)
from tests.support.factories import at
from tests.support.servers import PublishSession, bad_request_fields, serving
from tests.support.waiting import eventually


def batched_ids(messages: Messages) -> list[int]:
    """Snapshot ids in arrival order, whether they came alone or in batches."""
    ids: list[int] = []
    for message in messages:
        if message.HasField("snapshot"):
            ids.append(message.snapshot.snapshot.snapshot_id)
        elif message.HasField("snapshot_batch"):
            ids.extend(u.snapshot.snapshot_id for u in message.snapshot_batch.updates)
    return ids


def delivered_updates(messages: Messages) -> list[pb.SnapshotUpdate]:
    """Every snapshot delivered, as its update with the token resuming right after it."""
    updates: list[pb.SnapshotUpdate] = []
    for message in messages:
        if message.HasField("snapshot"):
            alone = pb.SnapshotUpdate()
            alone.CopyFrom(message.snapshot)
            alone.resume_token = message.resume_token
            updates.append(alone)
        else:
            updates.extend(message.snapshot_batch.updates)
    return updates


def has_batched(n: int) -> Callable[[Messages], bool]:
    return lambda messages: len(batched_ids(messages)) >= n


@pytest.fixture
async def stub(channel: grpc.aio.Channel) -> pb_grpc.MarketServiceAsyncStub:
    return pb_grpc.MarketServiceStub(channel)


@pytest.fixture
async def stored_ids(publisher: PublishSession, kfeed_server: KfeedServer) -> list[int]:
    """Twenty snapshots of A and ten of B stored, interleaved in id order; all their ids."""
    await publisher.publish(markets=[A, B])
    for start in range(0, 10, 5):
        await publisher.publish(snapshots=snapshots(A.ticker, 2 * start, 2 * start + 10))
        await publisher.publish(snapshots=snapshots(B.ticker, start, start + 5))
    rows = await kfeed_server.repositories.snapshots.list_after_id(0, tickers=None, limit=100)
    return [r.snapshot_id for r in rows]


async def test_history_arrives_in_batches_and_every_token_resumes_exactly(
    stub: pb_grpc.MarketServiceAsyncStub, stored_ids: list[int]
) -> None:
    stream = stub.StreamSnapshots(
        pb.StreamSnapshotsRequest(start_time=timestamp(at(0)), max_batch_size=7)
    )
    history = await read_until(stream, caught_up)
    stream.cancel()
    assert batched_ids(history) == stored_ids
    assert [len(m.snapshot_batch.updates) for m in history[:-1]] == [7, 7, 7, 7, 2]
    assert history[-1].caught_up.replayed_count == len(stored_ids)
    updates = [u for m in history[:-1] for u in m.snapshot_batch.updates]
    for message in history[:-1]:
        assert message.resume_token == message.snapshot_batch.updates[-1].resume_token
    # The token of any update resumes right after it, inside a batch or at its end.
    for delivered in (1, 3, 7, 8, 28, 30):
        resumed = stub.StreamSnapshots(
            pb.StreamSnapshotsRequest(
                resume_token=updates[delivered - 1].resume_token, max_batch_size=7
            )
        )
        rest = await read_until(resumed, caught_up)
        resumed.cancel()
        assert batched_ids(rest) == stored_ids[delivered:]


@pytest.mark.parametrize("max_batch_size", [0, 4])
async def test_a_long_replay_read_as_columns_sends_what_a_replay_of_rows_sends(
    stub: pb_grpc.MarketServiceAsyncStub,
    stored_ids: list[int],
    monkeypatch: pytest.MonkeyPatch,
    max_batch_size: int,
) -> None:
    request = pb.StreamSnapshotsRequest(start_time=timestamp(at(0)), max_batch_size=max_batch_size)
    of_rows = stub.StreamSnapshots(request)
    expected = await read_until(of_rows, caught_up)
    of_rows.cancel()
    # A page of 7 rows, then the rest (23) as columns, 10 rows a query on the server's own
    # columnar connection (ADBC on PostgreSQL, a read-only sqlite3 one on SQLite).
    monkeypatch.setattr(feed_module, "ROWS_BEFORE_COLUMNS", 7)
    monkeypatch.setattr(feed_module, "COLUMN_REPLAY_ROWS", 10)
    of_columns = stub.StreamSnapshots(request)
    received = await read_until(of_columns, caught_up)
    of_columns.cancel()
    assert batched_ids(received) == stored_ids
    # Messages are cut per chunk read, so compare what each snapshot arrived with.
    assert delivered_updates(received) == delivered_updates(expected)
    assert received[-1] == expected[-1]


async def test_live_snapshots_ready_together_share_a_message(
    stub: pb_grpc.MarketServiceAsyncStub, publisher: PublishSession, stored_ids: list[int]
) -> None:
    stream = stub.StreamSnapshots(pb.StreamSnapshotsRequest(max_batch_size=100))
    await read_until(stream, caught_up)
    # One Publish batch reaches the hub at once: the subscriber finds all six queued together.
    await publisher.publish(snapshots=[*snapshots(A.ticker, 50, 53), *snapshots(B.ticker, 50, 53)])
    live = await read_until(stream, has_batched(6))
    stream.cancel()
    assert kinds(live) == ["snapshot_batch"]
    ids = batched_ids(live)
    assert ids == sorted(ids)
    assert ids[0] > stored_ids[-1]
    resumed = stub.StreamSnapshots(
        pb.StreamSnapshotsRequest(resume_token=live[0].resume_token, max_batch_size=100)
    )
    assert kinds(await read_until(resumed, caught_up)) == ["caught_up"]
    resumed.cancel()


@pytest.mark.parametrize("max_batch_size", [0, 1])
async def test_without_batching_every_snapshot_is_its_own_message(
    stub: pb_grpc.MarketServiceAsyncStub,
    publisher: PublishSession,
    stored_ids: list[int],
    max_batch_size: int,
) -> None:
    stream = stub.StreamSnapshots(
        pb.StreamSnapshotsRequest(start_time=timestamp(at(0)), max_batch_size=max_batch_size)
    )
    history = await read_until(stream, caught_up)
    await publisher.publish(snapshots=snapshots(A.ticker, 50, 55))
    live = await read_until(stream, has_batched(5))
    stream.cancel()
    assert set(kinds(history[:-1]) + kinds(live)) == {"snapshot"}
    assert batched_ids(history) == stored_ids


async def test_conflated_snapshots_keep_their_counts_in_batches(
    stub: pb_grpc.MarketServiceAsyncStub, publisher: PublishSession, stored_ids: list[int]
) -> None:
    stream = stub.StreamSnapshots(
        pb.StreamSnapshotsRequest(conflation_interval=millis(300), max_batch_size=10)
    )
    await read_until(stream, caught_up)
    await publisher.publish(snapshots=[*snapshots(A.ticker, 50, 54), *snapshots(B.ticker, 50, 53)])
    live = await read_until(stream, has_batched(2))
    stream.cancel()
    updates = [u for m in live for u in m.snapshot_batch.updates] + [
        m.snapshot for m in live if m.HasField("snapshot")
    ]
    counts = {u.snapshot.ticker: u.coalesced_count for u in updates}
    assert counts == {A.ticker: 3, B.ticker: 2}


@pytest.mark.parametrize("bad", [-1, 10_001, 2**31 - 1])
async def test_bad_max_batch_size_is_invalid_argument_naming_it(
    stub: pb_grpc.MarketServiceAsyncStub, stored_ids: list[int], bad: int
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await read(stub.StreamSnapshots(pb.StreamSnapshotsRequest(max_batch_size=bad)))
    assert bad_request_fields(error.value) == ["max_batch_size"]


@pytest.fixture
async def limited_server(database_url: str) -> AsyncIterator[KfeedServer]:
    config = ServerConfig(
        listen="127.0.0.1:0",
        database_url=database_url,
        max_streams_per_peer=2,
        subscriber_idle_timeout=0.5,
    )
    async with serving(config) as server:
        yield server


async def _admitted_stream(stub: pb_grpc.MarketServiceAsyncStub) -> Stream:
    """A stream that got past the per-peer cap (retried while refused, for up to 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        stream = stub.StreamSnapshots(pb.StreamSnapshotsRequest())
        try:
            await read_until(stream, caught_up)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
        else:
            return stream


async def test_streams_per_peer_are_capped(limited_server: KfeedServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited_server.port}") as channel:
        stub = pb_grpc.MarketServiceStub(channel)
        first, second = (stub.StreamSnapshots(pb.StreamSnapshotsRequest()) for _ in range(2))
        for stream in (first, second):
            await read_until(stream, caught_up)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await read(stub.StreamSnapshots(pb.StreamSnapshotsRequest()))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_peer" in (refused.value.details() or "")
        first.cancel()
        third = await _admitted_stream(stub)  # once the server has seen the cancellation
        third.cancel()
        second.cancel()


async def test_a_subscriber_that_stops_reading_is_ended_with_a_clear_status(
    limited_server: KfeedServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited_server.port}") as channel:
        publisher = PublishSession(channel)
        await publisher.publish(markets=[A])
        # History of ≈9 MB: far more than the transport buffers between the two ends hold.
        for start in range(0, 60_000, 10_000):
            await publisher.publish(snapshots=snapshots(A.ticker, start, start + 10_000))
        await publisher.close()
        stub = pb_grpc.MarketServiceStub(channel)
        stream: Stream = stub.StreamSnapshots(
            pb.StreamSnapshotsRequest(tickers=[A.ticker], start_time=timestamp(at(0)))
        )
        await read(stream)  # then reads nothing more
        await eventually(
            lambda: not limited_server.hub.subscriber_count, 30, what="the stream was ended"
        )
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await _read_to_the_end(stream)
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = ended.value.details() or ""
        assert "subscriber_idle_timeout" in details
        assert "resume_token" in details


async def _read_to_the_end(stream: Stream) -> None:
    while True:
        await read(stream)
