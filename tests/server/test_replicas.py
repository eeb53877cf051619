"""Two servers on one PostgreSQL database: whatever either ingests streams live from both, once
each and in id order (commit notices, db.commits and streaming.follower)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import asyncpg
import grpc
import pytest

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.db.commits import asyncpg_dsn
from tests.server.test_stream_snapshots import (
    caught_up,
    has_snapshots,
    read_until,
    snapshot_ids,
    snapshots,
)
from tests.support.factories import make_gap, make_market
from tests.support.servers import PublishSession, serving

A = make_market("KXREPLICA-A")
LATER = make_market("KXREPLICA-LATER", event_ticker="EV-REPLICA", series_ticker="SER-REPLICA")


class Replica:
    """A running server with a channel, a MarketService stub and a Publish stream."""

    def __init__(self, server: KfeedServer, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.stub = pb_grpc.MarketServiceStub(channel)
        self.publisher = PublishSession(channel)

    def stream(
        self, **fields: object
    ) -> grpc.aio.UnaryStreamCall[pb.StreamSnapshotsRequest, pb.StreamSnapshotsResponse]:
        return self.stub.StreamSnapshots(pb.StreamSnapshotsRequest(**fields))  # type: ignore[arg-type]


@pytest.fixture
async def replicas(postgres_url: str) -> AsyncIterator[tuple[Replica, Replica]]:
    async with AsyncExitStack() as stack:
        pair = []
        for _ in range(2):
            config = ServerConfig(listen="127.0.0.1:0", database_url=postgres_url)
            server = await stack.enter_async_context(serving(config))
            channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
            )
            pair.append(Replica(server, channel))
        yield pair[0], pair[1]


async def test_what_one_ingests_streams_live_from_both_once_in_order(
    replicas: tuple[Replica, Replica],
) -> None:
    writer, reader = replicas
    on_writer, on_reader = writer.stream(), reader.stream()
    for stream in (on_writer, on_reader):
        await read_until(stream, caught_up)
    await writer.publisher.publish(markets=[A], snapshots=snapshots(A.ticker, 0, 30))
    await reader.publisher.publish(snapshots=snapshots(A.ticker, 30, 40))  # either may ingest
    await writer.publisher.publish(snapshots=snapshots(A.ticker, 40, 50))
    stored = await writer.server.repositories.snapshots.list_after_id(0, tickers=None, limit=100)
    expected = [s.snapshot_id for s in stored]
    assert len(expected) == 50
    for stream in (on_writer, on_reader):
        received = snapshot_ids(await read_until(stream, has_snapshots(50)))
        assert received == expected
        stream.cancel()


async def test_a_market_stored_through_another_server_matches_event_selectors(
    replicas: tuple[Replica, Replica],
) -> None:
    writer, reader = replicas
    by_event = reader.stream(event_ticker=LATER.event_ticker)
    await read_until(by_event, caught_up)
    await writer.publisher.publish(markets=[A, LATER])
    await writer.publisher.publish(
        snapshots=[*snapshots(A.ticker, 0, 3), *snapshots(LATER.ticker, 0, 2)]
    )
    received = await read_until(by_event, has_snapshots(2))
    assert {m.snapshot.snapshot.ticker for m in received if m.HasField("snapshot")} == {
        LATER.ticker
    }
    by_event.cancel()


async def test_feed_gaps_reach_the_other_server(replicas: tuple[Replica, Replica]) -> None:
    writer, reader = replicas
    await writer.publisher.publish(markets=[A])
    stream = reader.stream(tickers=[A.ticker])
    await read_until(stream, caught_up)
    await writer.publisher.publish(gaps=[make_gap(0, ticker=A.ticker)])
    messages = await read_until(stream, lambda m: bool(m) and m[-1].HasField("feed_gap"))
    assert messages[-1].feed_gap.ticker == A.ticker
    stream.cancel()


async def test_streams_keep_flowing_after_the_listening_connections_are_cut(
    replicas: tuple[Replica, Replica], postgres_url: str
) -> None:
    writer, reader = replicas
    stream = reader.stream()
    await read_until(stream, caught_up)
    await writer.publisher.publish(markets=[A], snapshots=snapshots(A.ticker, 0, 5))
    before = await read_until(stream, has_snapshots(5))
    admin = await asyncpg.connect(asyncpg_dsn(postgres_url))
    try:  # cut every listening connection: both servers listen again and go on
        cut = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        )
        assert cut == 2
        await writer.publisher.publish(snapshots=snapshots(A.ticker, 5, 12))
    finally:
        await admin.close()
    after = await read_until(stream, has_snapshots(7))
    stored = await reader.server.repositories.snapshots.list_after_id(0, tickers=None, limit=100)
    assert snapshot_ids(before) + snapshot_ids(after) == [s.snapshot_id for s in stored]
    stream.cancel()
