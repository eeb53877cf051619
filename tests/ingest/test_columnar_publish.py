"""The ingest sends snapshots as SnapshotColumns, and a real kfeed server stores them as sent."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from kfeed.v1 import types_pb2
from kfeed_ingest.kalshi.books import BookChange
from kfeed_ingest.publisher import Backoff, Publisher
from kfeed_ingest.runner import BatchSink
from kfeed_ingest.spool import JOURNAL_NAME, Spool
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


async def test_rows_reach_the_spool_together_once_the_loop_turns(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    """The rows added while the loop is busy are one spool record, written when the ingest next
    waits (not one write a row): a copy of the journal taken before that has none of them, one
    taken after recovers them as their batch, book changes as columns."""
    journals = {name: tmp_path / name for name in ("live", "before", "after")}
    changes = [
        BookChange(MARKET.ticker, 1_000 + n, 2_000 + n, n + 1, types_pb2.SIDE_YES, 4_200 + n, n)
        for n in range(3)
    ]
    async with Publisher(server.target, Spool.open(journals["live"]), producer="rows") as publisher:
        sink = BatchSink(publisher, batch_rows=100)
        await sink.add(market_to_proto(MARKET))
        for change in changes:
            await sink.add(change)
        for copy in ("before", "after"):
            if copy == "after":
                await asyncio.sleep(0)
            journals[copy].mkdir()
            shutil.copy(journals["live"] / JOURNAL_NAME, journals[copy] / JOURNAL_NAME)
        await sink.flush()
    with Spool.open(journals["before"]) as spool:
        assert spool.pending() == []
    with Spool.open(journals["after"]) as spool:
        [batch] = spool.pending()
    assert batch.producer == "rows"
    assert list(batch.markets) == [market_to_proto(MARKET)]
    assert list(batch.book_changes.tickers) == [MARKET.ticker] * 3
    assert list(batch.book_changes.price) == [4_200, 4_201, 4_202]
    assert list(batch.book_changes.exchange_sequence) == [1, 2, 3]
