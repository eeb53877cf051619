"""The columnar reads of stored rows (ArrowExportReader), on SQLite and PostgreSQL: every value
exactly as stored, whatever the first rows of a read hold.

SQLite's driver (ADBC) infers a column's type from the first batch it reads, so these tests cut
reads into batches of a few rows and put what inference could get wrong first: a nullable column
NULL throughout the first batch, then values at the edges of int64."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pyarrow as pa
import pytest

from kfeed_server.db import create_engine, create_writer_engine, upgrade_to_head
from kfeed_server.db.models import snapshots_table
from kfeed_server.db.repositories import Repositories, build_repositories
from kfeed_server.db.repositories import export as export_module
from kfeed_server.db.repositories.export import (
    BOOK_CHANGE_EXPORT,
    SNAPSHOT_BACKTEST,
    SNAPSHOT_EXPORT,
    SNAPSHOT_REPLAY,
    TRADE_EXPORT,
    ExportFilter,
    ExportSpec,
)
from kfeed_server.records import DataSource, MarketStatus, SnapshotRecord
from tests.support.factories import at, exported_row, make_market, make_snapshot

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
# The snapshot columns that may be NULL (all of them integers).
NULLABLE = tuple(c.name for c in snapshots_table.c if c.nullable)
BATCH_ROWS = 4


def _stored(ticker: str) -> list[SnapshotRecord]:
    """A snapshot with every nullable column NULL, then values at the edges of int64, then
    NULLs again."""
    empty = dict.fromkeys(NULLABLE)
    edges = [
        make_snapshot(
            ticker,
            1 + i,
            **dict.fromkeys(NULLABLE, edge),
            source=DataSource.POLL,
            status=MarketStatus.FINALIZED,
        )
        for i, edge in enumerate((INT64_MAX, INT64_MIN, 0, -1, 1))
    ]
    return [make_snapshot(ticker, 0, **empty), *edges, make_snapshot(ticker, 20, **empty)]


@pytest.fixture
async def stored(repositories: Repositories) -> list[SnapshotRecord]:
    """The snapshots of BATCH_ROWS markets as stored: the first batch of a read in id order (one
    row of each market, the earliest) is NULL in every nullable column."""
    markets = [make_market(f"KXCOL-{m}") for m in range(BATCH_ROWS - 1)]
    markets.append(make_market("KXCOL-'Q\"; --"))
    snapshots = [s for m in markets for s in _stored(m.ticker)]
    await repositories.ingest.write_batch(markets=markets, snapshots=snapshots)
    page = [
        await repositories.snapshots.list_range(m.ticker, start=None, end=None, limit=100)
        for m in markets
    ]
    return sorted((s for p in page for s in p.items), key=lambda s: s.snapshot_id)


async def _table(batches: AsyncIterator[pa.RecordBatch], spec: ExportSpec) -> pa.Table:
    received = [batch async for batch in batches]
    for batch in received:
        assert batch.schema == spec.schema
    return pa.Table.from_batches(received, spec.schema)


async def test_a_column_null_throughout_the_first_batch_keeps_every_later_value(
    repositories: Repositories, stored: list[SnapshotRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "SQLITE_BATCH_ROWS", BATCH_ROWS)
    exports = repositories.exports
    assert all(s.yes_bid is None for s in stored[:BATCH_ROWS])
    table = await _table(exports.batches(SNAPSHOT_EXPORT, ExportFilter()), SNAPSHOT_EXPORT)
    assert table.to_pylist() == [exported_row(s) for s in stored]
    assert table.column("yes_bid").null_count == 2 * BATCH_ROWS


async def test_a_backtest_read_has_the_stored_numbers_in_replay_order(
    repositories: Repositories, stored: list[SnapshotRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "SQLITE_BATCH_ROWS", BATCH_ROWS)
    tickers = sorted({s.ticker for s in stored})
    batches = repositories.exports.snapshots_for_backtest(
        tickers, at(0), at(100), max_snapshot_id=stored[-1].snapshot_id
    )
    table = await _table(batches, SNAPSHOT_BACKTEST)
    in_order = sorted(stored, key=lambda s: (s.exchange_time, s.snapshot_id))
    assert table.column("snapshot_id").to_pylist() == [s.snapshot_id for s in in_order]
    assert table.column("source").to_pylist() == [int(s.source) for s in in_order]
    assert table.column("status").to_pylist() == [int(s.status) for s in in_order]
    for name in NULLABLE:
        assert table.column(name).to_pylist() == [getattr(s, name) for s in in_order], name


async def test_an_empty_read_has_no_batches(repositories: Repositories) -> None:
    rows = ExportFilter(tickers=["KXNONE-1"])
    assert [b async for b in repositories.exports.batches(SNAPSHOT_EXPORT, rows)] == []


@pytest.mark.parametrize(
    "spec",
    [SNAPSHOT_EXPORT, SNAPSHOT_REPLAY, SNAPSHOT_BACKTEST, TRADE_EXPORT, BOOK_CHANGE_EXPORT],
    ids=["snapshots", "replay", "backtest", "trades", "book-changes"],
)
def test_every_text_column_read_is_not_null(spec: ExportSpec) -> None:
    # SQLite's driver types a column NULL throughout the first batch as int64: a text column
    # there would fail on its first value. Only integer columns may be nullable.
    for column in spec.columns:
        if column.arrow_type == pa.string() and column.enum_type is None:
            assert getattr(column.source, "nullable", True) is False, column.name


async def test_a_database_file_at_an_awkward_path_is_read(tmp_path: Path) -> None:
    # The columnar read opens the file again by URI: characters a URI gives meaning to must
    # still name the same file. (A database URL spells "%" and "?" percent-encoded.)
    folder = tmp_path / "a dir #1 ?mode=rw&x=é 100%"
    folder.mkdir()
    path = str(folder / "k feed.db")
    url = "sqlite+aiosqlite:///" + path.replace("%", "%25").replace("?", "%3F")
    engine, writer = create_engine(url), create_writer_engine(url)
    try:
        await upgrade_to_head(engine)
        repositories = build_repositories(engine, writer)
        market = make_market("KXPATH-1")
        stored = [make_snapshot(market.ticker, i) for i in range(3)]
        await repositories.ingest.write_batch(markets=[market], snapshots=stored)
        table = await _table(
            repositories.exports.batches(SNAPSHOT_EXPORT, ExportFilter()), SNAPSHOT_EXPORT
        )
        assert table.column("exchange_time").to_pylist() == [s.exchange_time for s in stored]
        assert engine.url.database == path
    finally:
        await engine.dispose()
        if writer is not None:
            await writer.dispose()
