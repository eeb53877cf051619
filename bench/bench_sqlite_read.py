"""A backtest's columnar read of 1,000,000 stored snapshots on SQLite: the ADBC SQLite driver
(what the server runs, ADR 0023) against the standard library's sqlite3 (tuples, then columns:
what it ran before), with SQLite's own share (the same query aggregated in SQL) for scale.

The three reads alternate in each round, on the same database file and query, so they see the
same machine; each round's ratio is kept.

    uv run python -m bench.bench_sqlite_read [--snapshots N] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench.bench_backtest import synthetic_snapshots
from bench.support import print_summary
from kfeed_server.db.engine import create_engine, create_writer_engine
from kfeed_server.db.migrate import upgrade_to_head
from kfeed_server.db.repositories import build_repositories
from kfeed_server.db.repositories.export import (
    SNAPSHOT_BACKTEST,
    SQLITE_BATCH_ROWS,
    ExportFilter,
    _batch_of_rows,
    _SqliteStream,
    backtest_query,
    literal_sql,
)
from kfeed_server.records import MarketRecord, MarketStatus

MARKETS = 10
WRITE_CHUNK = 50_000


async def _store(database: Path, snapshots: int) -> str:
    """Stores the synthetic snapshots through the ingest writer; the backtest's read as SQL."""
    url = f"sqlite+aiosqlite:///{database}"
    engine, writer = create_engine(url), create_writer_engine(url)
    try:
        await upgrade_to_head(engine)
        ingest = build_repositories(engine, writer).ingest
        tickers = [f"BENCH-{m}" for m in range(MARKETS)]
        await ingest.write_batch(
            markets=[MarketRecord(ticker=t, status=MarketStatus.OPEN) for t in tickers]
        )
        records = synthetic_snapshots(snapshots, MARKETS, seed=7)
        for first in range(0, snapshots, WRITE_CHUNK):
            chunk = records[first : first + WRITE_CHUNK]
            await ingest.write_batch(snapshots=[r.with_id(0) for r in chunk])
        rows = ExportFilter(
            tickers=tickers,
            start=datetime(2000, 1, 1, tzinfo=UTC),
            end=datetime(2100, 1, 1, tzinfo=UTC),
            last_row_id=2**62,
        )
        return literal_sql(backtest_query(rows), engine.dialect)
    finally:
        await engine.dispose()
        if writer is not None:
            await writer.dispose()


def _adbc_read(database: Path, sql: str) -> int:
    stream = _SqliteStream.open(str(database), sql, SNAPSHOT_BACKTEST)
    try:
        rows = 0
        while (batch := stream.read_next()) is not None:
            rows += batch.num_rows
        return rows
    finally:
        stream.close()


def _sqlite3_read(database: Path, sql: str) -> int:
    connection = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)
    try:
        cursor = connection.execute(sql)
        rows = 0
        while fetched := cursor.fetchmany(SQLITE_BATCH_ROWS):
            rows += _batch_of_rows(SNAPSHOT_BACKTEST, fetched).num_rows
        return rows
    finally:
        connection.close()


def _sqlite_alone(database: Path, sql: str) -> int:
    """SQLite's own work for the read: every row produced, a few columns summed, none out."""
    connection = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)
    try:
        aggregate = (
            f"SELECT count(*), sum(yes_bid), sum(length(ticker)), sum(liquidity) FROM ({sql})"
        )
        count: int = connection.execute(aggregate).fetchone()[0]
        return count
    finally:
        connection.close()


def run_benchmark(snapshots: int, repeat: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder:
        database = Path(folder) / "read.db"
        sql = asyncio.run(_store(database, snapshots))
        reads: dict[str, Callable[[Path, str], int]] = {
            "sqlite3": _sqlite3_read,
            "adbc": _adbc_read,
            "sqlite_alone": _sqlite_alone,
        }
        seconds: dict[str, list[float]] = {name: [] for name in reads}
        counts = set()
        for _ in range(repeat):
            for name, read in reads.items():
                began = time.perf_counter()
                counts.add(read(database, sql))
                seconds[name].append(time.perf_counter() - began)
    assert len(counts) == 1, counts
    ratios = [old / new for old, new in zip(seconds["sqlite3"], seconds["adbc"], strict=True)]
    return {
        "benchmark": "sqlite_read",
        "rows": counts.pop(),
        "runs": repeat,
        **{f"{name}_seconds": [round(s, 2) for s in runs] for name, runs in seconds.items()},
        "sqlite3_over_adbc_each": [round(r, 2) for r in ratios],
        "sqlite3_over_adbc": round(statistics.median(ratios), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--snapshots", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print_summary(run_benchmark(args.snapshots, args.repeat))


if __name__ == "__main__":
    main()
