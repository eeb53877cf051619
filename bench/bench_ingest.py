"""Ingest throughput: IngestService.Publish vs raw asyncpg COPY; the whole sim → PostgreSQL path.

1. **Publish vs COPY** (one PostgreSQL database made for the run). kfeed: a real ``kfeed serve``
   process, as deployed; batches of ``--batch`` snapshots (5,000: a busy ingest's batch), sent
   as ``snapshot_columns`` like ``kfeed ingest`` sends them, go through
   ``IngestService.Publish``, each awaited until its ack, i.e. until it is committed. The
   requests are serialised before the clock starts, so the figure is the server's cost: parsing,
   validation, proto → records, the unchanged-state dedup, and the COPY into
   ``market_snapshots``. Baseline: asyncpg's ``copy_records_to_table`` from this process of the
   very same rows, already tuples, in the same batches (one committed COPY each) into ``LIKE
   market_snapshots INCLUDING ALL`` (same columns, keys and indexes). Rounds alternate between
   the two, each adding new rows on top of the previous rounds'; the best round of each counts,
   and every round's seconds are printed. Target: kfeed ≥ 0.5 × COPY.

2. **Whole path**: ``kfeed sim`` → ``kfeed ingest --mode ws`` → ``kfeed serve`` → PostgreSQL, all
   real processes on this machine. The simulator runs ``kfeed sim --firehose``: many long-lived
   markets on a short tick, every open market changing at every step (≈ markets / tick states
   per second, about one ``orderbook_delta`` and one ``ticker`` frame each), without the legacy
   integer fields (as Kalshi sends today) and with a deep per-socket buffer so a moment of CPU
   contention does not get the ingest's socket dropped; the ingest streams them (WebSocket,
   batches of 2,000 rows: at 500, per-batch costs kept it below the sim's rate) to the server.
   Committed snapshots/s is ``count(*)`` of ``market_snapshots`` sampled over a steady window
   after a warm-up (which starts once the first row is stored); CPU per process (from /proc)
   shows what saturates, and its CPU time per committed row what the path costs. Target:
   ≥ 5,000 snapshots/s.

    uv run python -m bench.bench_ingest [--batch N] [--batches N] [--rounds N] [--markets N]
        [--tick S] [--warmup S] [--window S] [--skip-publish] [--skip-whole-path]

The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx

from bench.support import (
    asyncpg_dsn,
    free_port,
    kfeed_serve,
    print_summary,
    serving,
    sqlalchemy_url,
    start_kfeed,
    stop_processes,
    temporary_postgres_database,
    wait_until,
)
from kfeed.v1 import ingest_service_pb2 as ingest_pb
from kfeed_ingest.columns import snapshot_columns
from kfeed_server.records import DataSource, MarketRecord, MarketStatus, SnapshotRecord
from kfeed_server.transport.convert import market_to_proto, snapshot_to_proto
from kfeed_sim.signing import generate_key_pair

TARGET_RATIO = 0.5
TARGET_WHOLE_PATH_PER_S = 5_000.0
MARKETS = 500
_PUBLISH = "/kfeed.v1.IngestService/Publish"
_START = datetime(2025, 1, 1, tzinfo=UTC)
_COPY_COLUMNS = [
    "ticker", "exchange_time", "receive_time", "source", "exchange_sequence",
    "yes_bid", "yes_ask", "no_bid", "no_ask", "yes_bid_size", "yes_ask_size", "last_price",
    "volume", "volume_24h", "open_interest", "liquidity", "status",
]  # fmt: skip


# --- 1. IngestService.Publish vs raw COPY -------------------------------------------------------


def make_snapshots(count: int, markets: int, first: int = 0) -> list[SnapshotRecord]:
    """Snapshots ``first`` … ``first + count - 1`` of a feed over ``markets`` markets, each a new
    state of its market, as a live WebSocket feed sends them (every field set, times a
    millisecond apart and increasing)."""
    snapshots = []
    for i in range(first, first + count):
        exchange_time = _START + timedelta(microseconds=1_000 * i)
        k = i % 4_000
        snapshots.append(
            SnapshotRecord(
                ticker=f"KXBENCH-{i % markets:04d}",
                exchange_time=exchange_time,
                receive_time=exchange_time + timedelta(microseconds=1_500),
                source=DataSource.WEBSOCKET,
                exchange_sequence=i,
                yes_bid=3_000 + k,
                yes_ask=3_100 + k,
                no_bid=6_900 - k,
                no_ask=7_000 - k,
                yes_bid_size=10_000 + i,
                yes_ask_size=20_000,
                last_price=3_050,
                volume=100 * i,
                volume_24h=100 * i,
                open_interest=50_000,
                liquidity=123_456_789,
                status=MarketStatus.OPEN,
            )
        )
    return snapshots


def _copy_tuple(s: SnapshotRecord) -> tuple[Any, ...]:
    return (
        s.ticker, s.exchange_time, s.receive_time, int(s.source), s.exchange_sequence,
        s.yes_bid, s.yes_ask, s.no_bid, s.no_ask, s.yes_bid_size, s.yes_ask_size, s.last_price,
        s.volume, s.volume_24h, s.open_interest, s.liquidity, int(s.status),
    )  # fmt: skip


def _publish_request(batch_id: int, snapshots: Sequence[SnapshotRecord]) -> bytes:
    """The batch as ``kfeed ingest`` sends it: the snapshots as columns."""
    request = ingest_pb.PublishRequest(
        batch_id=batch_id,
        producer="bench",
        snapshot_columns=snapshot_columns([snapshot_to_proto(s) for s in snapshots]),
    )
    return request.SerializeToString()


@dataclass
class _Round:
    """One round's rows, ready to go: COPY tuples and serialised Publish requests."""

    tuples: list[tuple[Any, ...]]
    requests: list[bytes]


def _make_round(number: int, batch: int, batches: int) -> _Round:
    rows = batch * batches
    snapshots = make_snapshots(rows, MARKETS, first=number * rows)
    return _Round(
        tuples=[_copy_tuple(s) for s in snapshots],
        requests=[
            _publish_request(2 + number * batches + n, snapshots[n * batch : (n + 1) * batch])
            for n in range(batches)
        ],
    )


async def _publish_round(call: Any, requests: Sequence[bytes], batch: int, window: int) -> None:
    """Send every request with at most ``window`` unacknowledged; return when all are acked."""
    slots = asyncio.Semaphore(window)

    async def send() -> None:
        for request in requests:
            await slots.acquire()
            await call.write(request)

    sender = asyncio.ensure_future(send())
    for _ in requests:
        ack = await call.read()
        assert ack.code == 0, ack
        assert ack.snapshots_stored == batch, ack
        slots.release()
    await sender


async def _publish_stream(channel: grpc.aio.Channel) -> Any:
    """An open Publish stream that takes requests serialised beforehand (no client-side encoding),
    after a first batch storing the bench's markets."""
    call: Any = channel.stream_stream(
        _PUBLISH,
        request_serializer=None,
        response_deserializer=ingest_pb.PublishResponse.FromString,
    )()
    markets = [
        MarketRecord(ticker=f"KXBENCH-{i:04d}", status=MarketStatus.OPEN) for i in range(MARKETS)
    ]
    first = ingest_pb.PublishRequest(
        batch_id=1, producer="bench", markets=[market_to_proto(m) for m in markets]
    )
    await call.write(first.SerializeToString())
    assert (await call.read()).code == 0
    return call


async def _timed_rounds(
    call: Any, raw: asyncpg.Connection, batch: int, batches: int, rounds: int
) -> dict[str, list[float]]:
    """Seconds of each timed round of each path; the paths alternate, each on new rows."""
    rows = batch * batches
    timed: dict[str, list[float]] = {"copy": [], "publish": []}
    number = 0
    for timed_round in range(rounds + 1):
        seconds = {}
        for path in timed:
            prepared = _make_round(number, batch, batches)
            number += 1
            started = time.perf_counter()
            if path == "copy":
                for start in range(0, rows, batch):
                    await raw.copy_records_to_table(
                        "baseline_snapshots",
                        records=prepared.tuples[start : start + batch],
                        columns=_COPY_COLUMNS,
                    )
            else:
                await _publish_round(call, prepared.requests, batch, window=1)
            seconds[path] = time.perf_counter() - started
        if timed_round:
            for path, taken in seconds.items():
                timed[path].append(taken)
        else:  # statistics as autovacuum would keep them on a live table
            await raw.execute("ANALYZE market_snapshots")
            await raw.execute("ANALYZE baseline_snapshots")
    return timed


async def publish_vs_copy(batch: int, batches: int, rounds: int) -> dict[str, object]:
    """Best-of-``rounds`` snapshots/s of COPY and of Publish (one batch at a time, each awaited
    until acked). Each round stores new, later rows on top of the previous rounds' (tables are
    never empty in service; an emptied table also misleads the planner); round 0 is an untimed
    warm-up."""
    rows = batch * batches
    async with (
        temporary_postgres_database("kfeed_bench_ingest") as database,
        kfeed_serve(sqlalchemy_url(database)) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        raw = await asyncpg.connect(asyncpg_dsn(database))
        try:
            await raw.execute(
                "CREATE TABLE baseline_snapshots (LIKE market_snapshots INCLUDING ALL)"
            )
            call = await _publish_stream(channel)
            timed = await _timed_rounds(call, raw, batch, batches, rounds)
            await call.done_writing()
            stored = await raw.fetchval("SELECT count(*) FROM market_snapshots")
            assert stored == rows * (rounds + 1), stored
        finally:
            await raw.close()
    copy_rate, publish_rate = rows / min(timed["copy"]), rows / min(timed["publish"])
    return {
        "batch": batch,
        "rows_per_round": rows,
        "copy_snapshots_per_s": round(copy_rate),
        "publish_snapshots_per_s": round(publish_rate),
        "ratio": round(publish_rate / copy_rate, 3),
        "round_seconds": {path: [round(t, 3) for t in taken] for path, taken in timed.items()},
    }


# --- 2. The whole path: sim → ingest → serve → PostgreSQL, real processes ----------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def whole_path(
    markets: int,
    tick: float,
    warmup: float,
    window: float,
    *,
    table: str = "market_snapshots",
    rows_named: str = "snapshots",
    sim_options: Sequence[str] = (),
    code: Path | None = None,
) -> dict[str, object]:
    """Rows committed to ``table`` per second over ``window`` seconds (after ``warmup``) of
    sim → ingest (ws) → serve → PostgreSQL, the CPU share of each process meanwhile (1.0 = one
    core) and its CPU time per committed row: on a shared machine the rate says how much CPU the
    processes got, the CPU per row what the path costs. The result's keys name the rows
    ``rows_named``; ``sim_options`` go to ``kfeed sim``; with ``code`` (a source tree, e.g.
    ``git archive REV | tar -x -C DIR``) the three processes run that tree's kfeed."""
    sim_port, server_port = free_port(), free_port()
    processes: dict[str, asyncio.subprocess.Process] = {}
    async with temporary_postgres_database(f"kfeed_bench_path_{table}") as database:
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            private_pem, public_pem = generate_key_pair()
            (work / "key.pem").write_bytes(private_pem)
            (work / "key.pub.pem").write_bytes(public_pem)
            rest_url = f"http://127.0.0.1:{sim_port}/trade-api/v2"
            try:
                processes["sim"] = await start_kfeed("sim", [
                    "--listen", f"127.0.0.1:{sim_port}", "--seed", "7",
                    "--markets", str(markets), "--tick-interval", str(tick),
                    "--history-steps", "2", "--firehose", "--ws-queue-size", "200000",
                    "--no-legacy-integer-fields", "--api-key-id", "bench",
                    "--api-public-key-file", str(work / "key.pub.pem"), *sim_options,
                ], work, code)  # fmt: skip
                processes["serve"] = await start_kfeed("serve", [
                    "--listen", f"127.0.0.1:{server_port}",
                    "--database-url", sqlalchemy_url(database),
                ], work, code)  # fmt: skip

                async def sim_up() -> bool:
                    async with httpx.AsyncClient() as client:
                        return (await client.get(f"{rest_url}/exchange/status")).is_success

                await wait_until(sim_up, "kfeed sim")
                await wait_until(lambda: serving(server_port), "kfeed serve")
                processes["ingest"] = await start_kfeed("ingest", [
                    "--server", f"127.0.0.1:{server_port}", "--kalshi-url", rest_url,
                    "--api-key-id", "bench", "--api-private-key-file", str(work / "key.pem"),
                    "--spool-dir", str(work / "spool"), "--mode", "ws",
                    "--rate-limit", "100", "--log-level", "WARNING", "--batch-rows", "2000",
                ], work, code)  # fmt: skip
                raw = await asyncpg.connect(asyncpg_dsn(database))
                try:
                    count = f"SELECT count(*) FROM {table}"

                    async def rows_arrive() -> bool:
                        return bool(await raw.fetchval(count))

                    # The ingest's start-up (discovery, trade read-back) takes a minute or more
                    # on a loaded machine: the warm-up starts with the first stored row.
                    await wait_until(rows_arrive, f"the first rows in {table}", seconds=600)
                    await asyncio.sleep(warmup)
                    for name, process in processes.items():
                        assert process.returncode is None, (work / f"{name}.log").read_text()
                    rows_before, started = await raw.fetchval(count), time.perf_counter()
                    cpu_before = {n: _cpu_seconds(p.pid) for n, p in processes.items()}
                    postgres_before = _postgres_cpu_seconds()
                    await asyncio.sleep(window)
                    rows_after, ended = await raw.fetchval(count), time.perf_counter()
                    cpu_after = {n: _cpu_seconds(p.pid) for n, p in processes.items()}
                    postgres_after = _postgres_cpu_seconds()
                finally:
                    await raw.close()
            finally:
                await stop_processes(*processes.values())
    seconds, committed = ended - started, rows_after - rows_before
    used = {n: cpu_after[n] - cpu_before[n] for n in processes}
    used["postgres"] = postgres_after - postgres_before
    cpu = {n: round(taken / seconds, 2) for n, taken in used.items()}
    per_row = {n: round(taken * 1e6 / max(committed, 1), 1) for n, taken in used.items()}
    return {
        "markets": markets,
        "tick_seconds": tick,
        "window_seconds": round(seconds, 1),
        f"committed_{rows_named}_per_s": round(committed / seconds),
        f"stored_{rows_named}": rows_after,
        "cpu_cores": cpu,
        f"cpu_us_per_{rows_named[:-1]}": per_row,
        "load_average": os.getloadavg()[0],
    }


def _postgres_cpu_seconds() -> float:
    """CPU seconds of every PostgreSQL process so far (they all run as ``postgres``)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if (entry / "comm").read_text().strip() == "postgres":
                    total += _cpu_seconds(int(entry.name))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markets", type=int, default=300)
    parser.add_argument("--tick", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--skip-publish", action="store_true")
    parser.add_argument("--skip-whole-path", action="store_true")
    parser.add_argument(
        "--code", type=Path, help="run the whole path's processes from this source tree"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    summary: dict[str, object] = {"benchmark": "ingest"}
    ok = True
    if not args.skip_publish:
        publish = asyncio.run(publish_vs_copy(args.batch, args.batches, args.rounds))
        print(f"Publish vs COPY: {publish}", flush=True)
        summary["publish_vs_copy"] = publish
        ok = ok and float(str(publish["ratio"])) >= TARGET_RATIO
    if not args.skip_whole_path:
        path = asyncio.run(
            whole_path(args.markets, args.tick, args.warmup, args.window, code=args.code)
        )
        print(f"whole path: {path}", flush=True)
        summary["whole_path"] = path
        rate = float(str(path["committed_snapshots_per_s"]))
        ok = ok and rate >= TARGET_WHOLE_PATH_PER_S
    summary["target"] = (
        f"Publish >= {TARGET_RATIO} x COPY; whole path >= {TARGET_WHOLE_PATH_PER_S:,.0f} /s"
    )
    summary["meets_target"] = ok
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    print_summary(summary)


if __name__ == "__main__":
    main()
