"""The Publish client against a real grpc.aio peer: acks, refusals, reconnects, the window."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from kfeed.v1 import ingest_service_pb2, types_pb2
from kfeed_ingest.dead_letters import DeadLetterFile
from kfeed_ingest.publisher import Backoff, Publisher
from kfeed_ingest.spool import Spool
from tests.support.fake_ingest_server import FakeIngestServer
from tests.support.waiting import eventually

FAST = Backoff(initial=0.02, maximum=0.1)


def _batch(ticker: str) -> ingest_service_pb2.PublishRequest:
    return ingest_service_pb2.PublishRequest(snapshots=[types_pb2.MarketSnapshot(ticker=ticker)])


def _publisher(target: str, spool: Spool, window: int = 8) -> Publisher:
    return Publisher(target, spool, producer="test-producer", window=window, backoff=FAST)


async def test_batches_are_acked_and_leave_the_spool(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    spool = Spool.open(tmp_path)
    async with _publisher(server.target, spool) as publisher:
        ids = [await publisher.publish(_batch(f"M{i}")) for i in range(5)]
        async with asyncio.timeout(10):
            await publisher.flush()
    assert ids == [1, 2, 3, 4, 5]
    assert sorted(server.service.stored) == ids
    assert {r.producer for r in server.service.stored.values()} == {"test-producer"}
    assert publisher.stats.acked == 5
    assert publisher.stats.snapshots_stored == 5
    assert len(spool) == 0


async def test_a_refused_batch_is_logged_and_dropped_while_others_go_through(
    server: FakeIngestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.service.refuse_tickers = {"BAD"}
    spool = Spool.open(tmp_path / "spool")
    dead_letters = DeadLetterFile(tmp_path / "dead-letter.jsonl", "test-producer")
    publisher = Publisher(
        server.target, spool, producer="test-producer", backoff=FAST, dead_letters=dead_letters
    )
    async with publisher:
        await publisher.publish(_batch("OK1"))
        refused = await publisher.publish(_batch("BAD"))
        await publisher.publish(_batch("OK2"))
        async with asyncio.timeout(10):
            await publisher.flush()
    assert refused not in server.service.stored
    assert len(server.service.stored) == 2
    assert publisher.stats.rejected == 1
    assert len(spool) == 0
    assert "snapshots[0].ticker: no such market" in caplog.text
    # The whole refused batch is kept, with the reason, in the dead-letter file.
    (letter,) = [json.loads(line) for line in dead_letters.path.read_text().splitlines()]
    assert (letter["batch_id"], letter["field"]) == (refused, "batch")
    assert letter["violations"] == [
        {"field": "snapshots[0].ticker", "description": "no such market"}
    ]
    assert letter["row"]["snapshots"] == [{"ticker": "BAD"}]


async def test_a_dropped_stream_resends_every_unacked_batch_in_order(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    server.service.drop_after = 3  # the third batch arrives, then the stream dies unacked
    spool = Spool.open(tmp_path)
    async with _publisher(server.target, spool, window=4) as publisher:
        ids = [await publisher.publish(_batch(f"M{i}")) for i in range(6)]
        async with asyncio.timeout(10):
            await publisher.flush()
    streams = server.service.received_by_stream
    assert len(streams) >= 2
    assert sorted(server.service.stored) == ids  # every batch stored exactly once
    assert set(streams[0]) & set(streams[1])  # the unacked ones came again...
    assert streams[1] == sorted(streams[1])  # ...in order
    assert set(streams[0]) | set(streams[1]) == set(ids)


async def test_batches_published_while_the_server_is_down_arrive_after_it_starts(
    tmp_path: Path,
) -> None:
    server = FakeIngestServer()
    await server.start()
    await server.stop()  # reserve a port, then leave it closed
    spool = Spool.open(tmp_path)
    async with _publisher(server.target, spool) as publisher:
        await publisher.publish(_batch("A"))
        await publisher.publish(_batch("B"))
        await eventually(lambda: publisher.stats.failed_streams >= 1, what="a failed stream")
        assert publisher.pending == 2
        await server.start()
        try:
            async with asyncio.timeout(10):
                await publisher.flush()
        finally:
            await server.stop()
    assert sorted(server.service.stored) == [1, 2]


async def test_a_restarted_ingest_resends_what_the_last_one_left_spooled(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    server.service.acks_allowed.clear()  # the server receives but never acks
    spool = Spool.open(tmp_path)
    async with _publisher(server.target, spool) as publisher:
        await publisher.publish(_batch("A"))
        await publisher.publish(_batch("B"))
        await eventually(lambda: server.service.received == [1, 2], what="both batches sent")
    spool.close()

    server.service.acks_allowed.set()
    reopened = Spool.open(tmp_path)
    assert len(reopened) == 2
    async with _publisher(server.target, reopened) as publisher:
        async with asyncio.timeout(10):
            await publisher.flush()
        assert await publisher.publish(_batch("C")) == 3  # numbering continues
        async with asyncio.timeout(10):
            await publisher.flush()
    assert sorted(server.service.stored) == [1, 2, 3]
    assert len(reopened) == 0


async def test_no_more_than_the_window_is_in_flight(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    server.service.acks_allowed.clear()
    spool = Spool.open(tmp_path)
    async with _publisher(server.target, spool, window=3) as publisher:
        for index in range(10):
            await publisher.publish(_batch(f"M{index}"))
        await eventually(lambda: len(server.service.received) >= 3, what="three arrivals")
        # The sender holds batch 4 and waits for a window slot: nothing more can be written.
        await eventually(lambda: _waiting_for_a_slot(publisher, queued=6), what="a full window")
        assert server.service.received == [1, 2, 3]
        server.service.acks_allowed.set()
        async with asyncio.timeout(10):
            await publisher.flush()
    assert len(server.service.stored) == 10


async def test_close_leaves_unacked_batches_spooled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    spool = Spool.open(tmp_path)
    async with _publisher("127.0.0.1:1", spool) as publisher:
        await publisher.publish(_batch("A"))
    assert [r.snapshots[0].ticker for r in Spool.open(tmp_path).pending()] == ["A"]


def _waiting_for_a_slot(publisher: Publisher, *, queued: int) -> bool:
    """The open stream's sender took the next batch and waits for the window (``queued`` left)."""
    connection = publisher._connection
    return (
        connection is not None
        and connection.to_send.qsize() == queued
        and connection.slots.locked()
    )
