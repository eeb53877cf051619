"""StreamSnapshots under load: ingest during replay, slow subscribers, many subscribers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.transport.convert import timestamp
from tests.server.test_stream_snapshots import (
    Messages,
    Stream,
    caught_up,
    has_snapshots,
    read,
    read_until,
    snapshot_ids,
    snapshots,
)
from tests.support.factories import at, make_market
from tests.support.servers import PublishSession, serving

MARKETS = [make_market(f"KXFAN-{i}") for i in range(3)]
# Larger than one published batch (250), far smaller than what a stalled reader falls behind.
SMALL_QUEUE = 1_000
# Without BDP probing a client that stops reading lets the server write only ~100 KB before
# grpc's flow control blocks the handler: that is what makes a subscriber "stalled" here.
STALLED_CLIENT_OPTIONS = [("grpc.http2.bdp_probe", 0)]


async def all_stored_ids(server: KfeedServer) -> list[int]:
    rows = await server.repositories.snapshots.list_after_id(0, tickers=None, limit=1_000_000)
    return [r.snapshot_id for r in rows]


@pytest.mark.parametrize("seed", range(6))
async def test_replay_to_live_under_concurrent_ingest_has_no_gap_and_no_duplicate(
    seed: int, kfeed_server: KfeedServer, channel: grpc.aio.Channel, publisher: PublishSession
) -> None:
    rng = random.Random(seed)
    await publisher.publish(markets=MARKETS, snapshots=snapshots(MARKETS[0].ticker, 0, 20))
    stub = pb_grpc.MarketServiceStub(channel)
    total_batches = 12

    async def ingest() -> None:
        next_index = 20
        for _ in range(total_batches):
            size = rng.randint(1, 40)
            market = rng.choice(MARKETS).ticker
            await publisher.publish(snapshots=snapshots(market, next_index, next_index + size))
            next_index += size
            await asyncio.sleep(rng.random() * 0.01)

    writer = asyncio.create_task(ingest())
    await asyncio.sleep(rng.random() * 0.05)  # subscribe at a random point of the ingest
    stream = stub.StreamSnapshots(pb.StreamSnapshotsRequest(start_time=timestamp(at(0))))
    await writer
    expected = await all_stored_ids(kfeed_server)
    received = await read_until(stream, has_snapshots(len(expected)))
    stream.cancel()
    assert snapshot_ids(received) == expected
    assert [m.WhichOneof("event") for m in received].count("caught_up") == 1


@pytest.fixture
async def small_queue_server(database_url: str) -> AsyncIterator[KfeedServer]:
    config = ServerConfig(
        listen="127.0.0.1:0", database_url=database_url, subscriber_queue_capacity=SMALL_QUEUE
    )
    async with serving(config) as server:
        yield server


async def _publish_many(
    server: KfeedServer,
    count: int,
    after_each_batch: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """Publish ``count`` snapshots in batches of 250, each acked (so never held up by readers)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        session = PublishSession(channel)
        await session.publish(markets=MARKETS)
        for start in range(0, count, 250):
            ack = await session.publish(snapshots=snapshots(MARKETS[1].ticker, start, start + 250))
            assert ack.snapshots_stored == 250
            if after_each_batch is not None:
                await after_each_batch(start + 250)
        await session.close()


async def _subscribe_stalled(
    server: KfeedServer, policy: pb.OverflowPolicy.ValueType
) -> tuple[grpc.aio.Channel, Stream]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=STALLED_CLIENT_OPTIONS)
    stream = pb_grpc.MarketServiceStub(channel).StreamSnapshots(
        pb.StreamSnapshotsRequest(overflow_policy=policy)
    )
    await read_until(stream, caught_up)
    return channel, stream


async def test_stalled_subscriber_gets_a_gap_marker_and_the_fast_one_everything(
    small_queue_server: KfeedServer,
) -> None:
    server = small_queue_server
    total = 6_000
    stalled_channel, stalled = await _subscribe_stalled(server, pb.OVERFLOW_POLICY_GAP_MARKER)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as fast_channel:
        fast = pb_grpc.MarketServiceStub(fast_channel).StreamSnapshots(pb.StreamSnapshotsRequest())
        await read_until(fast, caught_up)
        fast_received: Messages = []

        async def fast_reader_keeps_up(published: int) -> None:
            # The fast subscriber reads each batch as it comes; the stalled one reads nothing.
            fast_received.extend(
                await read_until(fast, has_snapshots(published - len(snapshot_ids(fast_received))))
            )

        await _publish_many(server, total, after_each_batch=fast_reader_keeps_up)
        fast.cancel()
    expected = await all_stored_ids(server)
    assert snapshot_ids(fast_received) == expected
    assert "subscriber_gap" not in [m.WhichOneof("event") for m in fast_received]

    # Now the stalled subscriber reads: what it was sent, then a gap marker.
    before_gap = await read_until(stalled, lambda m: bool(m) and m[-1].HasField("subscriber_gap"))
    gap = before_gap[-1]
    delivered = snapshot_ids(before_gap)
    assert gap.subscriber_gap.dropped_count > 0
    assert len(delivered) + gap.subscriber_gap.dropped_count == total
    assert delivered == expected[: len(delivered)]
    stalled.cancel()
    await stalled_channel.close()

    # The marker's token resumes exactly the snapshots that were dropped.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        resumed = pb_grpc.MarketServiceStub(channel).StreamSnapshots(
            pb.StreamSnapshotsRequest(resume_token=gap.resume_token)
        )
        rest: Messages = await read_until(resumed, caught_up)
        resumed.cancel()
    assert delivered + snapshot_ids(rest) == expected


async def test_stalled_subscriber_choosing_resource_exhausted_is_ended_with_it(
    small_queue_server: KfeedServer,
) -> None:
    channel, stalled = await _subscribe_stalled(
        small_queue_server, pb.OVERFLOW_POLICY_RESOURCE_EXHAUSTED
    )
    await _publish_many(small_queue_server, 4_000)

    async def read_to_the_end() -> None:
        while True:
            await read(stalled)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_to_the_end()
    await channel.close()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "resume_token" in (caught.value.details() or "")
    assert small_queue_server.hub.subscriber_count == 0


async def test_two_hundred_subscribers_each_receive_every_snapshot(
    kfeed_server: KfeedServer, channel: grpc.aio.Channel, publisher: PublishSession
) -> None:
    await publisher.publish(markets=MARKETS)
    stub = pb_grpc.MarketServiceStub(channel)
    streams = [stub.StreamSnapshots(pb.StreamSnapshotsRequest()) for _ in range(200)]
    await asyncio.gather(*(read_until(s, caught_up) for s in streams))
    await publisher.publish(snapshots=snapshots(MARKETS[2].ticker, 0, 50))
    received = await asyncio.gather(*(read_until(s, has_snapshots(50)) for s in streams))
    expected = await all_stored_ids(kfeed_server)
    assert all(snapshot_ids(r) == expected for r in received)
    for stream in streams:
        stream.cancel()
