"""A database that cannot serve a call now (SQLite's write lock held past the busy timeout) gives
UNAVAILABLE — retryable, no exception text — not INTERNAL; the call succeeds once it is free.

SQLite only: its write lock is the transient condition a kfeed server meets in practice (a
PostgreSQL connection lost between calls is replaced by the pool's pre-ping before use)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2

from kfeed_server.app import ServerConfig
from kfeed_server.db import engine as engine_module
from kfeed_server.db.repositories import ingest as ingest_writer_module
from tests.support.factories import make_market, make_snapshot
from tests.support.servers import PublishSession, serving, status_details


async def test_write_lock_held_elsewhere_is_unavailable_then_the_batch_is_stored(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "SQLITE_BUSY_TIMEOUT_MS", 200)
    monkeypatch.setattr(ingest_writer_module, "SQLITE_BUSY_TIMEOUT_MS", 200)
    market = make_market("KXLOCK-1")
    async with (
        serving(ServerConfig(listen="127.0.0.1:0", database_url=sqlite_url)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        async with PublishSession(channel) as publisher:
            await publisher.publish(markets=[market])
        other_writer = sqlite3.connect(Path(sqlite_url.split("///", 1)[1]), isolation_level=None)
        other_writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async with PublishSession(channel) as publisher:
                    await publisher.publish(snapshots=[make_snapshot(market.ticker, 1)])
        finally:
            other_writer.rollback()
            other_writer.close()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert status_details(refused.value).code == code_pb2.UNAVAILABLE
        assert "locked" not in (refused.value.details() or "")
        async with PublishSession(channel) as publisher:
            ack = await publisher.publish(snapshots=[make_snapshot(market.ticker, 1)])
        assert (ack.code, ack.snapshots_stored) == (code_pb2.OK, 1)
