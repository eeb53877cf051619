"""Two `kfeed serve` processes on one PostgreSQL database: live latency through a replica.

Batches are published to server A (`IngestService.Publish`), paced; a subscriber process reads
`StreamSnapshots` from A (the writer, which gets its own batches through their commit notice) and
another from B (a replica, which reads each batch back by id when the notice arrives). Latency is
receipt − the snapshot's exchange time, stamped just before Publish (as in bench_fanout). Both
must receive every snapshot. Reported, no target: the limits the design asks to document.

    uv run python -m bench.bench_replicas [--subscribers N] [--snapshots N] [--batch N]
        [--pace S]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import grpc

from bench.bench_fanout import MARKETS, make_snapshots, percentile, run_subscribers
from bench.support import (
    kfeed_serve,
    print_summary,
    sqlalchemy_url,
    temporary_postgres_database,
)
from tests.support.servers import PublishSession


async def run_benchmark(
    subscribers: int, snapshots: int, batch: int, pace: float
) -> dict[str, object]:
    async with temporary_postgres_database("kfeed_bench_replicas") as database:
        url = sqlalchemy_url(database)
        async with (
            kfeed_serve(url) as writer,
            kfeed_serve(url) as replica,
            grpc.aio.insecure_channel(writer) as channel,
        ):
            publisher = PublishSession(channel)
            await publisher.publish(markets=MARKETS)
            results = {}
            for name, address in (("writer", writer), ("replica", replica)):
                _, results[name] = await run_subscribers(address, subscribers, snapshots)
            started = time.perf_counter()
            for start in range(0, snapshots, batch):
                ack = await publisher.publish(snapshots=make_snapshots(batch, start))
                assert ack.snapshots_stored == batch, ack
                await asyncio.sleep(pace)
            publish_seconds = time.perf_counter() - started
            outcomes: dict[str, Any] = {name: await r() for name, r in results.items()}
            await publisher.close()
    summary: dict[str, object] = {
        "benchmark": "replicas",
        "subscribers_per_server": subscribers,
        "snapshots": snapshots,
        "offered_per_s": round(snapshots / publish_seconds),
    }
    for name, outcome in outcomes.items():
        assert outcome["delivered"] == subscribers * snapshots, (name, outcome["delivered"])
        latencies_ms = [1000 * value for value in outcome["latencies"]]
        summary[f"{name}_latency_p50_ms"] = round(percentile(latencies_ms, 0.50), 2)
        summary[f"{name}_latency_p99_ms"] = round(percentile(latencies_ms, 0.99), 2)
    summary["target"] = "report (the design asks for the measured limits)"
    summary["meets_target"] = True  # every snapshot reached every subscriber on both (asserted)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--snapshots", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--pace", type=float, default=0.02)
    args = parser.parse_args()
    started = time.perf_counter()
    summary = asyncio.run(run_benchmark(args.subscribers, args.snapshots, args.batch, args.pace))
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    print_summary(summary)


if __name__ == "__main__":
    main()
