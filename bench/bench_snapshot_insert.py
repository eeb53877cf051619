"""Bulk insert of 100,000 snapshots: ``IngestWriter.write_batch`` vs raw asyncpg COPY.

Both run in the same process against the same PostgreSQL (127.0.0.1:5432), in a database created
for the run and dropped afterwards. The baseline is asyncpg's ``copy_records_to_table`` of the
same rows, already as tuples, into an equivalent plain table: ``LIKE market_snapshots INCLUDING
ALL`` (same columns, identity, unique key and indexes; no kfeed code in the way). The ratio
against it is the target (>= 0.5). For scale, COPY into a table without any index is reported
too (``unindexed_copy_rows_per_s``): index maintenance alone costs more than half of the time.
The repository path also checks times, drops unchanged states, maps ids and returns the stored
records. Each side runs ``--repeat`` times on an emptied table; the best run counts. The process
runs with the garbage-collector settings of ``kfeed serve`` (``kfeed_server.gc_tuning``).

    uv run python -m bench.bench_snapshot_insert [--rows N] [--repeat N]

The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg

from kfeed_server.db import create_engine, upgrade_to_head
from kfeed_server.db.repositories import build_repositories
from kfeed_server.gc_tuning import tune_for_throughput
from kfeed_server.records import DataSource, MarketStatus, SnapshotRecord

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
TARGET_RATIO = 0.5
MARKETS = 200
_START = datetime(2025, 1, 1, tzinfo=UTC)
_COLUMNS = list(SnapshotRecord._fields[:-1])  # all but the id


def make_snapshots(count: int) -> list[SnapshotRecord]:
    """``count`` snapshots over ``MARKETS`` markets, each a new state of its market."""
    snapshots = []
    for i in range(count):
        exchange_time = _START + timedelta(microseconds=1_000 * i + 7)
        snapshots.append(
            SnapshotRecord(
                ticker=f"KXBENCH-{i % MARKETS:04d}",
                exchange_time=exchange_time,
                receive_time=exchange_time + timedelta(microseconds=1_500),
                source=DataSource.WEBSOCKET,
                exchange_sequence=i,
                yes_bid=3_000 + i % 4_000,
                yes_ask=3_100 + i % 4_000,
                no_bid=6_900 - i % 4_000,
                no_ask=7_000 - i % 4_000,
                yes_bid_size=10_000 + i,
                yes_ask_size=20_000,
                last_price=3_050,
                volume=i,
                volume_24h=i,
                open_interest=50_000,
                liquidity=123_456_789,
                status=MarketStatus.OPEN,
            )
        )
    return snapshots


async def _best_rate(
    rows: int, repeat: int, run: Callable[[], Awaitable[None]], reset: Callable[[], Awaitable[None]]
) -> float:
    best = float("inf")
    for _ in range(repeat):
        await reset()
        started = time.perf_counter()
        await run()
        best = min(best, time.perf_counter() - started)
    return rows / best


async def run_benchmark(rows: int, repeat: int) -> dict[str, object]:
    """Measure both paths in a fresh database and return the summary."""
    database = f"kfeed_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{database}"')
    engine = create_engine(f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}")
    try:
        await upgrade_to_head(engine)
        repositories = build_repositories(engine)
        snapshots = make_snapshots(rows)
        tuples = [(*s[:3], int(s.source), *s[4:-2], int(s.status)) for s in snapshots]
        raw = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}")
        try:
            await raw.execute(
                "CREATE TABLE baseline_snapshots (LIKE market_snapshots INCLUDING ALL)"
            )
            await raw.execute(
                "CREATE TABLE unindexed_snapshots"
                " (LIKE market_snapshots INCLUDING DEFAULTS INCLUDING IDENTITY)"
            )

            async def copy_baseline() -> None:
                await raw.copy_records_to_table(
                    "baseline_snapshots", records=tuples, columns=_COLUMNS
                )

            async def copy_unindexed() -> None:
                await raw.copy_records_to_table(
                    "unindexed_snapshots", records=tuples, columns=_COLUMNS
                )

            async def empty_unindexed() -> None:
                await raw.execute("TRUNCATE unindexed_snapshots")
                await raw.execute("VACUUM unindexed_snapshots")

            async def write_through_repository() -> None:
                result = await repositories.ingest.write_batch(snapshots=snapshots)
                assert result.counts.snapshots == rows, result.counts

            async def empty_baseline() -> None:
                await raw.execute("TRUNCATE baseline_snapshots")
                await raw.execute("VACUUM baseline_snapshots")

            async def empty_snapshots() -> None:
                await raw.execute("TRUNCATE market_snapshots RESTART IDENTITY")
                await raw.execute("VACUUM market_snapshots")

            copy_rate = await _best_rate(rows, repeat, copy_baseline, empty_baseline)
            unindexed_rate = await _best_rate(rows, repeat, copy_unindexed, empty_unindexed)
            repository_rate = await _best_rate(
                rows, repeat, write_through_repository, empty_snapshots
            )
        finally:
            await raw.close()
    finally:
        await engine.dispose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
    ratio = repository_rate / copy_rate
    return {
        "benchmark": "snapshot_insert",
        "rows": rows,
        "repository_rows_per_s": round(repository_rate),
        "copy_rows_per_s": round(copy_rate),
        "unindexed_copy_rows_per_s": round(unindexed_rate),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
    }


def main() -> None:
    """Run the benchmark and print the result, JSON last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()
    tune_for_throughput()  # the garbage-collector settings `kfeed serve` runs the writer with
    summary = asyncio.run(run_benchmark(arguments.rows, arguments.repeat))
    print(f"raw asyncpg COPY, equivalent table:  {summary['copy_rows_per_s']:>10,} rows/s")
    print(
        f"raw asyncpg COPY, no index (scale):  {summary['unindexed_copy_rows_per_s']:>10,} rows/s"
    )
    print(f"IngestWriter.write_batch:            {summary['repository_rows_per_s']:>10,} rows/s")
    print(f"ratio: {summary['ratio']} (target >= {TARGET_RATIO})")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
