"""The ingest sends snapshots as SnapshotColumns, and a real kfeed server stores them as sent."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kfeed.v1 import types_pb2
from kfeed_ingest.publisher import Backoff, Publisher
from kfeed_ingest.runner import BatchSink
from kfeed_ingest.spool import Spool
from kfeed_server.app import ServerConfig
from kfeed_server.records import DataSource
from kfeed_server.transport.convert import market_to_proto, snapshot_to_proto
from tests.support.factories import make_market, make_snapshot
from tests.support.fake_ingest_server import FakeIngestServer
from tests.support.servers import serving

MARKET = make_market("KXCOL-1")


def _snapshots() -> list[types_pb2.MarketSnapshot]:
    """A feed's snapshots: all fields set, and some with optional fields unset."""
    return [
        snapshot_to_proto(make_snapshot(MARKET.ticker, 0)),
        snapshot_to_proto(
            make_snapshot(MARKET.ticker, 1, exchange_sequence=None, yes_bid=None, volume=None)
        ),
        snapshot_to_proto(make_snapshot(MARKET.ticker, 2, source=DataSource.POLL, liquidity=None)),
    ]


async def _send(target: str, tmp_path: Path) -> None:
    """The market and the snapshots through a BatchSink and a Publisher, until acked."""
    async with Publisher(
        target,
        Spool.open(tmp_path),
        producer="columns-test",
        backoff=Backoff(initial=0.02, maximum=0.1),
    ) as publisher:
        sink = BatchSink(publisher, batch_rows=100)
        await sink.add(market_to_proto(MARKET))
        for snapshot in _snapshots():
            await sink.add(snapshot)
        await sink.flush()
        async with asyncio.timeout(10):
            await publisher.flush()
        assert (publisher.stats.rejected, publisher.stats.snapshots_stored) == (0, 3)


async def test_the_batch_sink_sends_snapshots_as_columns(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    await _send(server.target, tmp_path)
    assert server.service.columnar_batches == 1
    [request] = server.service.stored.values()
    assert list(request.snapshots) == _snapshots()


async def test_a_kfeed_server_stores_the_columns_as_the_snapshots_sent(
    database_url: str, tmp_path: Path
) -> None:
    config = ServerConfig(listen="127.0.0.1:0", database_url=database_url)
    async with serving(config) as kfeed_server:
        await _send(f"127.0.0.1:{kfeed_server.port}", tmp_path)
        page = await kfeed_server.repositories.snapshots.list_range(
            MARKET.ticker, start=None, end=None, limit=10
        )
    stored = [snapshot_to_proto(record.with_id(0)) for record in page.items]
    assert stored == _snapshots()
