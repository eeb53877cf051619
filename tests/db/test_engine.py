"""create_engine: SQLite gets its folder, WAL, foreign keys and a busy timeout.
create_writer_engine: SQLite ingest batches written on the event loop's thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from kfeed_server.db import create_engine, create_writer_engine, schema_is_current, upgrade_to_head
from kfeed_server.db.engine import SQLITE_BUSY_TIMEOUT_MS
from kfeed_server.db.repositories import IngestWriter, build_repositories
from kfeed_server.records import DataSource, MarketRecord, MarketStatus, SnapshotRecord


async def test_sqlite_engine_creates_folder_and_sets_pragmas(tmp_path: Path) -> None:
    database = tmp_path / "nested" / "folder" / "kfeed.db"
    engine = create_engine(f"sqlite+aiosqlite:///{database}")
    try:
        async with engine.connect() as connection:
            journal = await connection.scalar(text("PRAGMA journal_mode"))
            foreign_keys = await connection.scalar(text("PRAGMA foreign_keys"))
            busy_timeout = await connection.scalar(text("PRAGMA busy_timeout"))
        assert (journal, foreign_keys, busy_timeout) == ("wal", 1, SQLITE_BUSY_TIMEOUT_MS)
        assert database.exists()
        assert not await schema_is_current(engine)
        await upgrade_to_head(engine)
        assert await schema_is_current(engine)
    finally:
        await engine.dispose()


async def _writer_repositories(url: str) -> tuple[AsyncEngine, AsyncEngine, IngestWriter]:
    engine = create_engine(url)
    writer = create_writer_engine(url)
    assert writer is not None
    return engine, writer, build_repositories(engine, writer).ingest


async def test_writer_engine_is_for_sqlite_files_only(postgres_url: str) -> None:
    assert create_writer_engine(postgres_url) is None
    assert create_writer_engine("sqlite+aiosqlite:///:memory:") is None


async def test_sqlite_writer_runs_statements_on_the_loop_thread_and_commits_on_its_own(
    sqlite_url: str,
) -> None:
    """Each of the inline writer's statements runs on the event loop's thread (no round trip),
    its COMMIT (the disk write) on the connection's thread."""
    engine, writer, ingest = await _writer_repositories(sqlite_url)
    try:
        async with writer.connect() as connection:
            busy_timeout = await connection.scalar(text("PRAGMA busy_timeout"))
            raw = (await connection.get_raw_connection()).driver_connection
        assert raw is not None
        assert busy_timeout == 0  # never waits for SQLite's lock on the event loop's thread
        await ingest.write_batch(markets=[MarketRecord(ticker="KXW-A")])
        ran: list[tuple[str, bool]] = []
        loop_thread = threading.get_ident()
        raw._conn.set_trace_callback(
            lambda statement: ran.append(
                (statement.split()[0], threading.get_ident() == loop_thread)
            )
        )
        result = await ingest.write_batch(snapshots=[_snapshot("KXW-A")])
        assert result.counts.snapshots == 1
        assert ran[0] == ("BEGIN", True)
        assert ran[-1] == ("COMMIT", False)
        assert ("INSERT", True) in ran
        assert all(on_loop for _, on_loop in ran[:-1])
    finally:
        await writer.dispose()
        await engine.dispose()


async def test_sqlite_writer_waits_for_another_writer_and_the_loop_goes_on(
    sqlite_url: str,
) -> None:
    """While another connection holds the write lock, the batch waits (retrying) and the event
    loop keeps running; once the lock is free the batch commits."""
    engine, writer, ingest = await _writer_repositories(sqlite_url)
    path = make_url(sqlite_url).database
    assert path is not None
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        write = asyncio.create_task(ingest.write_batch(markets=[MarketRecord(ticker="KXW-B")]))
        # The loop is not blocked: this sleep ends while the batch still waits for the lock.
        await asyncio.sleep(0.2)
        assert not write.done()
        other.execute("COMMIT")
        result = await asyncio.wait_for(write, 10)
        assert result.counts.markets == 1
        async with engine.connect() as connection:
            stored = await connection.scalar(text("SELECT count(*) FROM markets"))
        assert stored == 1
    finally:
        other.close()
        await writer.dispose()
        await engine.dispose()


def _snapshot(ticker: str) -> SnapshotRecord:
    now = datetime.now(UTC)
    return SnapshotRecord(
        ticker=ticker,
        exchange_time=now,
        receive_time=now,
        source=DataSource.WEBSOCKET,
        yes_bid=4000,
        status=MarketStatus.OPEN,
    )


async def test_a_statement_cancelled_midway_raises_cancelled_not_an_error(
    engine: AsyncEngine,
) -> None:
    # SQLAlchemy reports a cancellation met inside a statement to the engine's error listener
    # as a disconnect; the listener must let it through, or a cancelled task would carry on
    # (a server's stop would wait for it forever).
    slow = (
        "SELECT pg_sleep(30)"
        if engine.dialect.name == "postgresql"
        else "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000000)"
        " SELECT count(*) FROM n"
    )
    started = asyncio.Event()

    def statement_sent(*_: object) -> None:
        started.set()  # the driver call follows at once; the test runs again once it waits

    async def run_slow_statement() -> None:
        async with engine.connect() as connection:
            event.listen(connection.sync_connection, "before_cursor_execute", statement_sent)
            await connection.execute(text(slow))

    running = asyncio.create_task(run_slow_statement())
    await started.wait()
    running.cancel()
    done, _ = await asyncio.wait([running], timeout=30)
    assert done, "the cancelled statement did not end"
    assert running.cancelled(), running.exception()
    # The engine still serves statements afterwards.
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT 1"))).scalar_one() == 1
