"""Order books: changes through IngestService vs raw COPY; GetOrderBook at random past instants
over a market with 1,000,000 stored changes; the whole sim → PostgreSQL path; bytes per change.

1. **Publish vs COPY** (one PostgreSQL database made for the run). kfeed: a real ``kfeed serve``
   process; batches of ``--batch`` changes sent as ``book_changes`` columns, as ``kfeed ingest``
   sends them (serialised before the clock starts), each awaited until acked (committed).
   Baseline: asyncpg ``copy_records_to_table`` of the very same rows, already tuples, in the same
   batches, into ``baseline_changes``: a table like ``order_book_changes`` (same columns and
   key), partitioned the same way. Rounds alternate; best round of each counts. Target ≥ 0.5 ×.
2. **GetOrderBook**: 1,000,000 changes of one market (500 levels a side, a change every 10 ms)
   with a checkpoint every 1,000 changes (``kfeed ingest``'s default), loaded by COPY; then
   ``--queries`` GetOrderBook calls at uniformly random instants over gRPC, one at a time.
   Target: p99 < 20 ms.
3. **Whole path**: ``kfeed sim --firehose --firehose-depth-changes N`` → ``kfeed ingest --mode
   ws`` → ``kfeed serve`` → PostgreSQL, real processes. Every open market changes its top and N
   levels below it at every step (N + 1 ``orderbook_delta`` frames and one ``ticker`` frame: a
   book moves far more often below the top than at it), so the sim offers ≈ markets × (N + 1) /
   tick changes/s. Committed changes/s is ``count(*)`` of ``order_book_changes`` over a steady
   window; the CPU time of each process per committed change says what the path costs. Target
   ≥ 20,000 changes/s.
4. **Bytes per change**: the change table's size on disk (heap + key index) per row, and what
   column-wise compression of the same rows gives (zlib over delta-encoded columns, a stand-in
   for TimescaleDB / Parquet-style compression).

    uv run python -m bench.bench_order_books [--batch N] [--batches N] [--rounds N]
        [--changes N] [--queries N] [--markets N] [--depth-changes N] [--tick S] [--warmup S]
        [--window S]
        [--skip-publish] [--skip-get] [--skip-whole-path]

The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import struct
import time
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench.bench_ingest import MARKETS, _publish_stream, whole_path
from bench.support import (
    asyncpg_dsn,
    kfeed_serve,
    print_summary,
    sqlalchemy_url,
    temporary_postgres_database,
)
from kfeed.v1 import ingest_service_pb2 as ingest_pb
from kfeed.v1 import market_service_pb2, market_service_pb2_grpc, types_pb2
from kfeed_ingest.kalshi.books import BookChange, change_columns
from kfeed_server.db.repositories.books import pack_levels

TARGET_RATIO = 0.5
TARGET_P99_MS = 20.0
TARGET_WHOLE_PATH_PER_S = 20_000.0
_COLUMNS = [
    "ticker", "exchange_time", "receive_time", "sequence", "side", "price", "size", "stream_id",
]  # fmt: skip
_NOW = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


# --- 1. Publish vs COPY ------------------------------------------------------------------------


def _changes(first: int, count: int) -> list[BookChange]:
    """Changes ``first`` … of a busy feed over MARKETS markets, 10 µs apart (today, so they land
    in the partitions the server made)."""
    start = _micros(_NOW)
    return [
        BookChange(
            f"KXBENCH-{i % MARKETS:04d}", start + 10 * i, start + 10 * i + 1_500, i,
            types_pb2.SIDE_YES if i % 2 else types_pb2.SIDE_NO, 100 + i % 9_800, (i * 7) % 50_000,
        )
        for i in range(first, first + count)
    ]  # fmt: skip


def _tuples(changes: Sequence[BookChange]) -> list[tuple[Any, ...]]:
    delta = timedelta
    return [
        (c.ticker, _EPOCH + delta(microseconds=c.exchange_time_us),
         _EPOCH + delta(microseconds=c.receive_time_us), c.sequence, c.side, c.price, c.size,
         stream_id)
        for stream_id, c in enumerate(changes, start=1)
    ]  # fmt: skip


async def _publish(call: Any, requests: Sequence[bytes], batch: int) -> None:
    for request in requests:
        await call.write(request)
        ack = await call.read()
        assert ack.code == 0, ack
        assert ack.book_changes_stored == batch, ack


async def publish_vs_copy(batch: int, batches: int, rounds: int) -> dict[str, object]:
    rows = batch * batches
    timed: dict[str, list[float]] = {"copy": [], "publish": []}
    async with (
        temporary_postgres_database("kfeed_bench_books") as database,
        kfeed_serve(sqlalchemy_url(database)) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        raw = await asyncpg.connect(asyncpg_dsn(database))
        try:
            await raw.execute(
                "CREATE TABLE baseline_changes (LIKE order_book_changes INCLUDING ALL)"
                " PARTITION BY RANGE (exchange_time)"
            )
            await raw.execute("CREATE TABLE baseline_default PARTITION OF baseline_changes DEFAULT")
            for offset in range(-1, 3):
                day = _NOW + timedelta(days=offset)
                await raw.execute(
                    f"CREATE TABLE baseline_p{offset + 1} PARTITION OF baseline_changes FOR VALUES"
                    f" FROM ('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')"
                )
            call = await _publish_stream(channel)
            number = 0
            for timed_round in range(rounds + 1):
                for path in timed:
                    changes = _changes(number * rows, rows)
                    number += 1
                    if path == "copy":
                        tuples = _tuples(changes)
                        started = time.perf_counter()
                        for start in range(0, rows, batch):
                            await raw.copy_records_to_table(
                                "baseline_changes",
                                records=tuples[start : start + batch],
                                columns=_COLUMNS,
                            )
                    else:
                        requests = [
                            ingest_pb.PublishRequest(
                                batch_id=2 + number * batches + n,
                                producer="bench",
                                book_changes=change_columns(changes[n * batch : (n + 1) * batch]),
                            ).SerializeToString()
                            for n in range(batches)
                        ]
                        started = time.perf_counter()
                        await _publish(call, requests, batch)
                    if timed_round:
                        timed[path].append(time.perf_counter() - started)
            await call.done_writing()
            stored = await raw.fetchval("SELECT count(*) FROM order_book_changes")
            assert stored == rows * (rounds + 1), stored
            size = await _bytes_per_row(raw, "order_book_changes", stored)
        finally:
            await raw.close()
    copy_rate, publish_rate = rows / min(timed["copy"]), rows / min(timed["publish"])
    return {
        "batch": batch,
        "rows_per_round": rows,
        "copy_changes_per_s": round(copy_rate),
        "publish_changes_per_s": round(publish_rate),
        "ratio": round(publish_rate / copy_rate, 3),
        "round_seconds": {path: [round(t, 3) for t in taken] for path, taken in timed.items()},
        "bytes_per_change": size,
    }


async def _bytes_per_row(raw: asyncpg.Connection, table: str, rows: int) -> dict[str, float]:
    """On-disk bytes per row of a partitioned table: heap and indexes of every partition."""
    sizes = await raw.fetchrow(
        "SELECT sum(pg_table_size(inhrelid))::bigint, sum(pg_indexes_size(inhrelid))::bigint"
        " FROM pg_inherits WHERE inhparent = $1::regclass",
        table,
    )
    assert sizes is not None
    heap, indexes = sizes
    return {"heap": round(heap / rows, 1), "index": round(indexes / rows, 1)}


def compressed_bytes_per_change(changes: Sequence[BookChange]) -> float:
    """Column-wise: the rows sorted by (ticker, time), times and sequences delta-encoded, each
    column packed and zlib-compressed (level 6); total bytes / rows."""
    ordered = sorted(changes, key=lambda c: (c.ticker, c.exchange_time_us))
    tickers = "\n".join(c.ticker for c in ordered).encode()

    def deltas(values: list[int]) -> bytes:
        diffs = [b - a for a, b in zip([0, *values], values, strict=False)]
        return struct.pack(f"<{len(diffs)}q", *diffs)

    columns = [
        tickers,
        deltas([c.exchange_time_us for c in ordered]),
        deltas([c.receive_time_us - c.exchange_time_us for c in ordered]),
        deltas([c.sequence for c in ordered]),
        bytes(c.side for c in ordered),
        struct.pack(f"<{len(ordered)}i", *(c.price for c in ordered)),
        struct.pack(f"<{len(ordered)}q", *(c.size for c in ordered)),
    ]
    return round(sum(len(zlib.compress(column, 6)) for column in columns) / len(ordered), 2)


# --- 2. GetOrderBook over 1,000,000 changes ----------------------------------------------------


async def load_book_history(
    raw: asyncpg.Connection, ticker: str, start: datetime, changes: int, rng: random.Random
) -> None:
    """``changes`` changes of ``ticker`` from ``start`` (500 price levels a side, one every
    10 ms) with a PERIODIC checkpoint every 1,000, COPYed into the tables; then ANALYZE."""
    books: tuple[dict[int, int], dict[int, int]] = ({}, {})
    rows: list[tuple[Any, ...]] = []
    checkpoints: list[tuple[Any, ...]] = []
    for i in range(changes):
        moment = start + timedelta(milliseconds=10 * i)
        side = i % 2
        price = 1 + rng.randrange(500) * 19
        size = rng.choice((0, rng.randint(1, 10**6)))
        if size:
            books[side][price] = size
        else:
            books[side].pop(price, None)
        rows.append((ticker, moment, moment, i + 1, side + 1, price, size, i + 2))
        if (i + 1) % 1_000 == 0:
            yes, no = (tuple(sorted(b.items(), reverse=True)) for b in books)
            checkpoints.append(
                (ticker, moment, moment, None, 3, pack_levels(yes), pack_levels(no),
                 changes + 2 + len(checkpoints))
            )  # fmt: skip
        if len(rows) == 100_000:
            await raw.copy_records_to_table("order_book_changes", records=rows, columns=_COLUMNS)
            rows = []
    if rows:
        await raw.copy_records_to_table("order_book_changes", records=rows, columns=_COLUMNS)
    await raw.copy_records_to_table(
        "order_book_checkpoints",
        records=[(ticker, start, start, None, 1, b"", b"", 1), *checkpoints],
        columns=["ticker", "exchange_time", "receive_time", "sequence", "kind",
                 "yes_levels", "no_levels", "stream_id"],
    )  # fmt: skip
    await raw.execute("ANALYZE")


async def get_order_book(changes: int, queries: int) -> dict[str, object]:
    rng = random.Random(5)
    ticker = "KXBENCH-0000"
    start = _NOW
    async with (
        temporary_postgres_database("kfeed_bench_book_get") as database,
        kfeed_serve(sqlalchemy_url(database)) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        call = await _publish_stream(channel)  # stores the markets
        await call.done_writing()
        raw = await asyncpg.connect(asyncpg_dsn(database))
        try:
            loaded = time.perf_counter()
            await load_book_history(raw, ticker, start, changes, rng)
            load_seconds = time.perf_counter() - loaded
        finally:
            await raw.close()
        stub: market_service_pb2_grpc.MarketServiceAsyncStub = (
            market_service_pb2_grpc.MarketServiceStub(channel)
        )
        span_ms = 10 * changes
        latencies = []
        for n in range(queries + 20):
            request = market_service_pb2.GetOrderBookRequest(ticker=ticker)
            request.time.FromDatetime(start + timedelta(milliseconds=rng.uniform(0, span_ms)))
            began = time.perf_counter()
            response = await stub.GetOrderBook(request)
            if n >= 20:  # warm-up
                latencies.append((time.perf_counter() - began) * 1_000)
            assert response.book.ticker == ticker
    latencies.sort()
    return {
        "stored_changes": changes,
        "load_seconds": round(load_seconds, 1),
        "queries": queries,
        "p50_ms": round(latencies[len(latencies) // 2], 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2),
        "max_ms": round(latencies[-1], 2),
    }


# --- 3. The whole path: bench_ingest's, counting order_book_changes ---------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--changes", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--markets", type=int, default=150)
    parser.add_argument("--depth-changes", type=int, default=8)
    parser.add_argument("--tick", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--skip-publish", action="store_true")
    parser.add_argument("--skip-get", action="store_true")
    parser.add_argument("--skip-whole-path", action="store_true")
    parser.add_argument(
        "--code", type=Path, help="run the whole path's processes from this source tree"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    summary: dict[str, object] = {"benchmark": "order_books"}
    ok = True
    if not args.skip_publish:
        publish = asyncio.run(publish_vs_copy(args.batch, args.batches, args.rounds))
        publish["compressed_bytes_per_change"] = compressed_bytes_per_change(
            _changes(0, args.batch * args.batches)
        )
        print(f"Publish vs COPY: {publish}", flush=True)
        summary["publish_vs_copy"] = publish
        ok = ok and float(str(publish["ratio"])) >= TARGET_RATIO
    if not args.skip_get:
        get = asyncio.run(get_order_book(args.changes, args.queries))
        print(f"GetOrderBook: {get}", flush=True)
        summary["get_order_book"] = get
        ok = ok and float(str(get["p99_ms"])) < TARGET_P99_MS
    if not args.skip_whole_path:
        path = asyncio.run(
            whole_path(
                args.markets,
                args.tick,
                args.warmup,
                args.window,
                table="order_book_changes",
                rows_named="changes",
                sim_options=["--firehose-depth-changes", str(args.depth_changes)],
                code=args.code,
            )
        )
        print(f"whole path: {path}", flush=True)
        summary["whole_path"] = path
        ok = ok and float(str(path["committed_changes_per_s"])) >= TARGET_WHOLE_PATH_PER_S
    summary["target"] = (
        f"Publish >= {TARGET_RATIO} x COPY; GetOrderBook p99 < {TARGET_P99_MS} ms over "
        f"{args.changes:,} changes; whole path >= {TARGET_WHOLE_PATH_PER_S:,.0f} changes/s"
    )
    summary["meets_target"] = ok
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    print_summary(summary)


if __name__ == "__main__":
    main()
