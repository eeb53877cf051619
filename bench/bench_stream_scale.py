"""Many subscribers on one `kfeed serve` process (SQLite): every snapshot delivered, and ingest
never starved by fan-out.

A real server process; subscribers in a separate process (bench/fanout_clients.py, batched
frames as the clients ask); this process publishes through IngestService.Publish at a steady
rate (a Publish every 100 ms: 1,000 snapshots/s in batches of 100, round robin over 100
markets)
and times each batch from send to ack. Cases:

- ``markets``: 1,000 subscribers, each following 1 of the 100 markets (10,000 deliveries/s).
  Targets: every snapshot delivered, publish → receipt p99 < 100 ms, Publish ack p99 < 100 ms.
- ``held``: 10,000 subscribers (each on 1 of 100 markets) held open; the server's memory per
  subscriber, then 100 snapshots/s published (10,000 deliveries/s) with both p99s reported.
- ``every-market-40k``: issue 10's case — 40 subscribers each following every market at 1,000
  snapshots/s (40,000 deliveries/s offered), unbatched as clients were then (no
  ``max_batch_size``: one snapshot per message, the same frames as 1). More messages than one
  process writes: readers fall behind and get gap markers. Target: Publish ack p99 < 100 ms.
- ``every-market-40k-batched``: the same with ``max_batch_size`` 500. Target: the same.
- ``overload``: the stress case — 1,000 subscribers each following every market at 1,000
  snapshots/s, batched: a million deliveries/s asked, far beyond one server process. Ack p99
  < 100 ms is checked and reported all the same.

Baseline for the acks: the same publishing with no subscriber, in the same run.

    uv run python -m bench.bench_stream_scale [--case NAME... | all] [--seconds S]
        [--today DIR]   # also the server of another tree (git archive REV | tar -x -C DIR)
        [--postgres [--workers N]]   # a temporary PostgreSQL database; `kfeed serve --workers N`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from bench.bench_fanout import percentile, run_subscribers
from bench.support import (
    kfeed_serve_process,
    print_summary,
    sqlalchemy_url,
    temporary_postgres_database,
)
from kfeed_server.records import DataSource, MarketRecord, MarketStatus, SnapshotRecord
from tests.support.servers import PublishSession

MARKET_COUNT = 100
PREFIX = "KXSCALE"
MARKETS = [
    MarketRecord(ticker=f"{PREFIX}-{i:02d}", status=MarketStatus.OPEN) for i in range(MARKET_COUNT)
]
MAX_BATCH_SIZE = 500
TARGET_MS = 100.0
_SEQUENCE = itertools.count()


@dataclass(frozen=True, slots=True)
class Case:
    """A load: how many subscribers, following what, asking for which frames; the rate
    published."""

    subscribers: int
    published_per_s: int
    # Each subscriber follows 1 of the markets (every snapshot must arrive); else all of them
    # (counted for ``--seconds``; readers may fall behind and get gap markers).
    one_market_each: bool
    max_batch_size: int
    # Every how many deliveries the subscribers time one.
    latency_every: int


CASES = {
    "markets": Case(1_000, 1_000, one_market_each=True, max_batch_size=MAX_BATCH_SIZE,
                    latency_every=1),
    "held": Case(10_000, 100, one_market_each=True, max_batch_size=MAX_BATCH_SIZE,
                 latency_every=1),
    "every-market-40k": Case(40, 1_000, one_market_each=False, max_batch_size=0,
                             latency_every=10),
    "every-market-40k-batched": Case(40, 1_000, one_market_each=False,
                                     max_batch_size=MAX_BATCH_SIZE, latency_every=10),
    "overload": Case(1_000, 1_000, one_market_each=False, max_batch_size=MAX_BATCH_SIZE,
                     latency_every=10),
}  # fmt: skip


def _snapshots(batch_number: int, count: int) -> list[SnapshotRecord]:
    """A batch of distinct market states (no two publishes repeat one), stamped now."""
    now = datetime.now(UTC)
    start = batch_number * count
    return [
        SnapshotRecord(
            ticker=MARKETS[i % MARKET_COUNT].ticker,
            exchange_time=now + timedelta(microseconds=i - start),
            receive_time=now,
            source=DataSource.WEBSOCKET,
            yes_bid=3000 + i % 3000,
            yes_ask=3100 + i % 3000,
            volume=i,
            status=MarketStatus.OPEN,
        )
        for i in range(start, start + count)
    ]


def _rss_bytes(pid: int) -> int:
    """The resident memory of ``pid`` and its children (`kfeed serve --workers` runs several)."""
    total = 0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for process in (pid, *map(int, children)):
        for line in Path(f"/proc/{process}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def _cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) ``pid`` and its children have used so far: unlike latency,
    hardly moved by other work sharing the machine."""
    total = 0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for process in (pid, *map(int, children)):
        fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def _database(postgres: bool) -> AsyncIterator[str]:
    """A fresh database: SQLite in a temporary folder, or a temporary PostgreSQL database."""
    if postgres:
        async with temporary_postgres_database("kfeed_bench_stream_scale") as database:
            yield sqlalchemy_url(database)
    else:
        with tempfile.TemporaryDirectory() as folder:
            yield f"sqlite+aiosqlite:///{folder}/bench.db"


async def _publish_paced(
    publisher: PublishSession, seconds: float, per_second: int
) -> tuple[int, list[float]]:
    """Publish ``per_second`` snapshots/s, ``seconds`` worth (all of them, even if acks are
    slow); how many, and each ack's delay."""
    batch = max(1, per_second // 10)
    interval = batch / per_second
    total = round(per_second * seconds)
    acks: list[float] = []
    published = 0
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while published < total:
        snapshots = _snapshots(next(_SEQUENCE), batch)
        sent = time.perf_counter()
        ack = await publisher.publish(snapshots=snapshots)
        acks.append(time.perf_counter() - sent)
        assert ack.snapshots_stored == batch, ack
        published += batch
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    return published, acks


def _ms(values: list[float], fraction: float) -> float:
    return round(1000 * percentile(values, fraction), 1) if values else float("nan")


async def run_case(
    name: str,
    seconds: float,
    today: Path | None = None,
    *,
    postgres: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """One case against this checkout's server, or with ``today`` the server of that tree."""
    case = CASES[name]
    subscribers, rate = case.subscribers, case.published_per_s
    async with _database(postgres) as url:
        options = ["--log-level", "WARNING"]
        if today is None:
            options += ["--max-streams-per-peer", str(2 * subscribers)]
            if workers > 1:
                options += ["--workers", str(workers)]
        async with (
            kfeed_serve_process(url, *options, code=today) as (address, server),
            grpc.aio.insecure_channel(address) as channel,
        ):
            publisher = PublishSession(channel)
            await publisher.publish(markets=MARKETS)
            # Warm-up, then the ack baseline: the same publishing with nobody subscribed.
            await _publish_paced(publisher, 1.0, rate)
            _, idle_acks = await _publish_paced(publisher, min(seconds, 5.0), rate)
            rss_before = _rss_bytes(server.pid)
            one_each = case.one_market_each
            per_stream = round(rate * seconds) // MARKET_COUNT if one_each else None
            follow = ["--markets", str(MARKET_COUNT)] if one_each else []
            window = [] if one_each else ["--seconds", str(seconds)]
            opened = time.perf_counter()
            process, result = await run_subscribers(
                address, subscribers, per_stream,
                *follow, *window, "--ticker-prefix", PREFIX,
                "--max-batch-size", str(case.max_batch_size),
                "--latency-every", str(case.latency_every),
                ready_within=900,
            )  # fmt: skip
            setup_seconds = time.perf_counter() - opened
            rss_held = _rss_bytes(server.pid)
            cpu_before = _cpu_seconds(server.pid)
            published, acks = await _publish_paced(publisher, seconds, rate)
            try:
                outcome: dict[str, Any] = await asyncio.wait_for(result(), 120)
            except TimeoutError:
                process.kill()
                outcome = {"delivered": -1, "seconds": 0, "latencies": [], "gaps": -1}
            cpu_seconds = _cpu_seconds(server.pid) - cpu_before
            await publisher.close()
    expected = published * (subscribers // MARKET_COUNT)
    summary: dict[str, Any] = {
        "case": name,
        "server": "this checkout" if today is None else str(today),
        "database": "postgresql" if postgres else "sqlite",
        "workers": workers if today is None else 1,
        "subscribers": subscribers,
        "max_batch_size": case.max_batch_size,
        "published_per_s": rate,
        "published": published,
        "delivered": outcome["delivered"],
        "delivered_per_s": round(outcome["delivered"] / max(outcome["seconds"], 1e-9)),
        "gap_markers": outcome["gaps"],
        "failed_streams": outcome.get("failed_streams", 0),
        "failures": outcome.get("failures", []),
        "latency_p50_ms": _ms(outcome["latencies"], 0.5),
        "latency_p99_ms": _ms(outcome["latencies"], 0.99),
        "ack_p50_ms": _ms(acks, 0.5),
        "ack_p99_ms": _ms(acks, 0.99),
        "ack_p99_ms_no_subscribers": _ms(idle_acks, 0.99),
        "subscribe_seconds": round(setup_seconds, 1),
        # From the first publish until the subscribers were done: the server's CPU per delivery.
        "server_cpu_seconds": round(cpu_seconds, 2),
        "server_cpu_us_per_delivery": round(1e6 * cpu_seconds / max(outcome["delivered"], 1), 2),
        "server_rss_mb_before": round(rss_before / 2**20, 1),
        "server_bytes_per_subscriber": round((rss_held - rss_before) / subscribers),
    }
    if case.one_market_each:
        summary["all_delivered"] = outcome["delivered"] >= expected
        summary["expected"] = expected
    if name == "markets":
        summary["meets_target"] = (
            summary["all_delivered"]
            and summary["latency_p99_ms"] < TARGET_MS
            and summary["ack_p99_ms"] < TARGET_MS
        )
    elif name == "held":
        summary["meets_target"] = True  # reported figures
    else:
        summary["meets_target"] = summary["ack_p99_ms"] < TARGET_MS
    return summary


async def run_benchmark(
    cases: list[str], seconds: float, today: Path | None, postgres: bool, workers: int
) -> dict[str, object]:
    results = []
    for case in cases:
        for code in (None, today) if today is not None else (None,):
            results.append(await run_case(case, seconds, code, postgres=postgres, workers=workers))
            print(json.dumps(results[-1], sort_keys=True), file=sys.stderr, flush=True)
    return {
        "benchmark": "stream_scale",
        "seconds": seconds,
        "cases": results,
        "target": (
            f"markets: all delivered, latency and ack p99 < {TARGET_MS:g} ms; "
            f"every-market-40k (both) and overload: ack p99 < {TARGET_MS:g} ms; held: reported"
        ),
        "meets_target": all(r["meets_target"] for r in results if r["server"] == "this checkout"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--case", nargs="+", choices=[*CASES, "all"], default=["all"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--today",
        type=Path,
        help="also run each case against the server in this source tree, e.g. the code before "
        "this round: git archive REV | tar -x -C DIR",
    )
    parser.add_argument("--postgres", action="store_true", help="a temporary PostgreSQL database")
    parser.add_argument(
        "--workers", type=int, default=1, help="kfeed serve --workers (needs --postgres)"
    )
    args = parser.parse_args()
    cases = list(CASES) if "all" in args.case else args.case
    started = time.perf_counter()
    summary = asyncio.run(
        run_benchmark(cases, args.seconds, args.today, args.postgres, args.workers)
    )
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    print_summary(summary)


if __name__ == "__main__":
    main()
