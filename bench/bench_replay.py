"""Replay of stored history: one StreamSnapshots subscriber with max_batch_size 500 receiving
1,000,000 stored snapshots (PostgreSQL), against bare grpc.aio streaming the same snapshots 100
per message.

kfeed: a real `kfeed serve` process; the subscriber (this process) asks for everything from the
start and times the call from its start to the caught-up marker — the database reads, encoding,
framing, gRPC and the subscriber's parse. Baseline: bench/bare_replay_server.py, a bare grpc.aio
server in its own process streaming the same snapshots, prebuilt in memory as messages of 100,
to the same subscriber code. Runs alternate; medians and spread. Target: ratio ≥ 0.5.

    uv run python -m bench.bench_replay [--rows N] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import grpc
from sqlalchemy import text

from bench.support import kfeed_serve, print_summary, sqlalchemy_url, temporary_postgres_database
from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_server.db import create_engine, upgrade_to_head
from kfeed_server.db.repositories import build_repositories
from kfeed_server.records import DataSource, MarketRecord, MarketStatus, SnapshotRecord
from kfeed_server.transport.convert import timestamp

TARGET_RATIO = 0.5
MARKETS = [MarketRecord(ticker=f"KXREPLAY-{i:02d}", status=MarketStatus.OPEN) for i in range(50)]
WRITE_CHUNK = 50_000
START = datetime(2026, 1, 1, tzinfo=UTC)


def _snapshots(start: int, count: int) -> list[SnapshotRecord]:
    return [
        SnapshotRecord(
            ticker=MARKETS[i % len(MARKETS)].ticker,
            exchange_time=START + timedelta(milliseconds=i),
            receive_time=START + timedelta(milliseconds=i, microseconds=250),
            source=DataSource.WEBSOCKET,
            exchange_sequence=i,
            yes_bid=3000 + i % 3000,
            yes_ask=3100 + i % 3000,
            no_bid=6900 - i % 3000,
            no_ask=7000 - i % 3000,
            yes_bid_size=1000 + i % 7,
            yes_ask_size=2000,
            last_price=3050,
            volume=10 * i,
            open_interest=5000,
            status=MarketStatus.OPEN,
        )
        for i in range(start, start + count)
    ]


async def store(url: str, rows: int) -> None:
    engine = create_engine(url)
    try:
        await upgrade_to_head(engine)
        ingest = build_repositories(engine).ingest
        await ingest.write_batch(markets=MARKETS)
        for start in range(0, rows, WRITE_CHUNK):
            result = await ingest.write_batch(snapshots=_snapshots(start, WRITE_CHUNK))
            assert result.counts.snapshots == WRITE_CHUNK, result.counts
        # Statistics, as autovacuum keeps them on a live database: without them the planner
        # may sort the freshly loaded table instead of reading it in id order by its key.
        async with engine.connect() as connection:
            await connection.execute(text("ANALYZE market_snapshots"))
    finally:
        await engine.dispose()


async def replay(address: str, request: pb.StreamSnapshotsRequest) -> tuple[int, float]:
    """Snapshots received up to the caught-up marker, and the seconds it took."""
    received = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.MarketServiceStub(channel)
        started = time.perf_counter()
        call = stub.StreamSnapshots(request)
        async for message in call:
            kind = message.WhichOneof("event")
            if kind == "snapshot_batch":
                received += len(message.snapshot_batch.updates)
            elif kind == "snapshot":
                received += 1
            elif kind == "caught_up":
                break
        seconds = time.perf_counter() - started
        call.cancel()
    return received, seconds


@asynccontextmanager
async def bare_server(url: str) -> AsyncIterator[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.bare_replay_server", "--database-url", url,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 600)).decode().split()
        assert line[:1] == ["ready"], line
        yield f"127.0.0.1:{line[1]}"
    finally:
        process.terminate()
        await process.wait()


async def run_benchmark(rows: int, repeat: int) -> dict[str, object]:
    async with temporary_postgres_database("kfeed_bench_replay") as database:
        url = sqlalchemy_url(database)
        await store(url, rows)
        kfeed_request = pb.StreamSnapshotsRequest(
            start_time=timestamp(START - timedelta(seconds=1)), max_batch_size=500
        )
        unbatched_request = pb.StreamSnapshotsRequest(start_time=timestamp(START))
        kfeed_rates: list[float] = []
        baseline_rates: list[float] = []
        async with bare_server(url) as bare, kfeed_serve(url) as kfeed:
            await replay(kfeed, kfeed_request)  # warm-up: caches of both databases and servers
            await replay(bare, pb.StreamSnapshotsRequest())
            for _ in range(repeat):
                count, seconds = await replay(kfeed, kfeed_request)
                assert count == rows, count
                kfeed_rates.append(count / seconds)
                count, seconds = await replay(bare, pb.StreamSnapshotsRequest())
                assert count == rows, count
                baseline_rates.append(count / seconds)
            # Today's behaviour for reference (one snapshot per message), a tenth of the rows.
            partial = pb.StreamSnapshotsRequest()
            partial.CopyFrom(unbatched_request)
            partial.start_time.CopyFrom(timestamp(START + timedelta(milliseconds=rows * 9 // 10)))
            count, seconds = await replay(kfeed, partial)
            unbatched_rate = count / seconds
    ratios = [k / b for k, b in zip(kfeed_rates, baseline_rates, strict=True)]
    ratio = statistics.median(ratios)
    return {
        "benchmark": "replay",
        "rows": rows,
        "runs": repeat,
        "kfeed_snapshots_per_s": [round(r) for r in kfeed_rates],
        "baseline_snapshots_per_s": [round(r) for r in baseline_rates],
        "ratios": [round(r, 3) for r in ratios],
        "ratio": round(ratio, 3),
        "kfeed_unbatched_snapshots_per_s": round(unbatched_rate),
        "target": f"ratio >= {TARGET_RATIO}",
        "meets_target": ratio >= TARGET_RATIO,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    summary = asyncio.run(run_benchmark(args.rows, args.repeat))
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    print_summary(summary)


if __name__ == "__main__":
    main()
