"""ExportSnapshots of 1,000,000 stored snapshots (PostgreSQL) into a client-side pyarrow.Table,
against a raw columnar read of the same rows into Arrow in the same process.

kfeed: a real ``kfeed serve`` process on loopback; the client (this process) calls
``KfeedClient.export_snapshots()`` — the server reads COPY binary through asyncpg and decodes
it into Arrow (compiled), turns enum numbers into names, cuts ≈3 MiB IPC record batches into the
stream; the client decodes them into one ``pyarrow.Table``. Baseline: the same SQL read into a
``pyarrow.Table`` here, no gRPC — what no export can avoid — by the fastest raw read found: the
same COPY reader in this process (the ADBC PostgreSQL driver, slower, is timed too for
reference). Runs are interleaved; each pair's ratio (baseline seconds / kfeed seconds, higher
is better) and rows/s are reported with their spread. Targets: ratio >= 0.5, and kfeed >=
1,000,000 rows/s.

    uv run python -m bench.bench_export [--rows N] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import adbc_driver_postgresql.dbapi as adbc_postgresql
import asyncpg
import pyarrow as pa

from bench.support import (
    asyncpg_dsn,
    kfeed_serve,
    median,
    print_summary,
    sqlalchemy_url,
    temporary_postgres_database,
)
from kfeed_client import connect
from kfeed_server.db import create_engine, upgrade_to_head
from kfeed_server.db.repositories.export import (
    SNAPSHOT_EXPORT,
    ExportFilter,
    copy_batches,
    export_query,
    literal_sql,
)

TARGET_RATIO = 0.5
TARGET_ROWS_PER_SECOND = 1_000_000
MARKETS = 100

# 1,000,000 snapshots of 100 markets, a millisecond apart, with the NULLs a live feed has (no
# sequence on polled rows, an empty side now and then).
FILL_SQL = f"""
INSERT INTO markets (ticker, event_ticker, series_ticker, title, subtitle, yes_sub_title,
    no_sub_title, market_type, status, result, price_level_structure,
    fractional_trading_enabled, rules_primary, update_time)
SELECT 'KXBENCH-26NOV01-T' || m, 'KXBENCH-26NOV01', 'KXBENCH', 'bench', '', '', '', 'binary',
    2, 0, 'linear_cent', false, '', now()
FROM generate_series(0, {MARKETS - 1}) m;
INSERT INTO market_snapshots (ticker, source, exchange_time, receive_time, exchange_sequence,
    yes_bid, yes_ask, no_bid, no_ask, yes_bid_size, yes_ask_size, last_price, volume,
    volume_24h, open_interest, liquidity, status)
SELECT 'KXBENCH-26NOV01-T' || (g % {MARKETS}),
    CASE WHEN g % 10 = 0 THEN 1 ELSE 2 END,
    timestamptz '2026-11-01' + g * interval '1 ms',
    timestamptz '2026-11-01' + g * interval '1 ms' + interval '900 us',
    CASE WHEN g % 10 = 0 THEN NULL ELSE g END,
    CASE WHEN g % 97 = 0 THEN NULL ELSE 3000 + g % 4000 END, 3100 + g % 4000,
    6900 - g % 4000, CASE WHEN g % 89 = 0 THEN NULL ELSE 7000 - g % 4000 END,
    1000 + g % 5000, 2000 + g % 3000, 3050 + g % 4000, 10 * g, 10 * g, 500000, 12345678, 2
FROM generate_series(1, $1::bigint) g;
"""


async def fill(database: str, rows: int) -> str:
    """Stores the snapshots; returns the SQL the export runs for them (the baseline's query)."""
    engine = create_engine(sqlalchemy_url(database))
    try:
        await upgrade_to_head(engine)
        sql = literal_sql(export_query(SNAPSHOT_EXPORT, ExportFilter()), engine.dialect)
    finally:
        await engine.dispose()
    connection = await asyncpg.connect(asyncpg_dsn(database))
    try:
        markets_sql, snapshots_sql = FILL_SQL.strip().split(";\n", 1)
        await connection.execute(markets_sql)
        await connection.execute(snapshots_sql.rstrip(";\n"), rows)
        await connection.execute("VACUUM ANALYZE market_snapshots")
    finally:
        await connection.close()
    return sql


def adbc_read(database: str, sql: str) -> int:
    """For reference: the export's query through the ADBC PostgreSQL driver into a
    pyarrow.Table, in this process (the server's reader before the compiled COPY decoder)."""
    with adbc_postgresql.connect(asyncpg_dsn(database)) as connection:
        cursor = connection.cursor()
        cursor.execute(sql)
        table = cursor.fetch_arrow_table()
        cursor.close()
    return int(table.num_rows)


async def raw_read(database: str, sql: str) -> int:
    """The baseline: the fastest raw read of the export's query into Arrow found here — COPY
    binary through asyncpg, decoded by the compiled decoder in a worker thread while the next
    piece arrives (the server's own reader, ``copy_batches``) — into a pyarrow.Table in this
    process, no gRPC."""
    batches = [b async for b in copy_batches(asyncpg_dsn(database), sql, SNAPSHOT_EXPORT)]
    return int(pa.Table.from_batches(batches).num_rows)


async def run_benchmark(rows: int, repeat: int) -> dict[str, object]:
    kfeed_seconds: list[float] = []
    baseline_seconds: list[float] = []
    adbc_seconds: list[float] = []
    load: list[float] = []
    async with temporary_postgres_database("kfeed_bench_export") as database:
        sql = await fill(database, rows)
        async with (
            kfeed_serve(sqlalchemy_url(database)) as address,
            connect(address) as client,
        ):

            async def through_kfeed() -> int:
                return int((await client.export_snapshots()).num_rows)

            assert await through_kfeed() == rows  # warm-up, checked
            assert await raw_read(database, sql) == rows
            assert await asyncio.to_thread(adbc_read, database, sql) == rows
            for _ in range(repeat):  # interleaved, so drift hits both sides alike
                started = time.perf_counter()
                await raw_read(database, sql)
                baseline_seconds.append(time.perf_counter() - started)
                started = time.perf_counter()
                await through_kfeed()
                kfeed_seconds.append(time.perf_counter() - started)
                started = time.perf_counter()
                await asyncio.to_thread(adbc_read, database, sql)
                adbc_seconds.append(time.perf_counter() - started)
                load.append(os.getloadavg()[0])
    ratios = [b / k for b, k in zip(baseline_seconds, kfeed_seconds, strict=True)]
    kfeed_rates = [rows / s for s in kfeed_seconds]
    baseline_rates = [rows / s for s in baseline_seconds]
    ratio = median(ratios)
    rate = median(kfeed_rates)
    return {
        "benchmark": "export_snapshots",
        "rows": rows,
        "runs": repeat,
        "kfeed_rows_per_s": round(rate),
        "kfeed_rows_per_s_min_max": [round(min(kfeed_rates)), round(max(kfeed_rates))],
        "baseline_rows_per_s": round(median(baseline_rates)),
        "baseline_rows_per_s_min_max": [round(min(baseline_rates)), round(max(baseline_rates))],
        "adbc_rows_per_s_min_max": [
            round(rows / max(adbc_seconds)),
            round(rows / min(adbc_seconds)),
        ],
        "ratio": round(ratio, 3),
        "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
        "load_average_1m_min_max": [round(min(load), 1), round(max(load), 1)],
        "target": f"ratio >= {TARGET_RATIO} and >= {TARGET_ROWS_PER_SECOND:,} rows/s",
        "meets_ratio": ratio >= TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO and rate >= TARGET_ROWS_PER_SECOND,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print_summary(asyncio.run(run_benchmark(args.rows, args.repeat)))


if __name__ == "__main__":
    main()
