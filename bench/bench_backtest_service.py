"""CreateBacktest to SUCCEEDED over 1,000,000 stored snapshots: the wall time a researcher waits.

The threshold strategy of bench_backtest over the same synthetic data, stored in SQLite or
PostgreSQL and run through a real server: CreateBacktest, then WatchBacktest until the terminal
state. The same backtest runs in-process on the same records for scale — the event engine
(``run_backtest``, as issue 12 measured "the engine alone") and the compiled path the service now
takes for this strategy (columns built from the records included). Target (issue 12): the
service ≤ 2× the engine alone.

    uv run python -m bench.bench_backtest_service [--snapshots N] [--database sqlite|postgres]
        [--repeat N]

``--repeat N`` times N CreateBacktests on the same stored data, each after an in-process engine
run (alternating, so both see the same machine); the ratio is taken per pair and the median
pair reported, every pair kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable

import grpc
from google.protobuf import timestamp_pb2

from bench.bench_backtest import (
    BUY_BELOW,
    COUNT,
    SELL_ABOVE,
    Timing,
    columnar_fingerprinter,
    run_compiled,
    run_engine,
    synthetic_snapshots,
)
from bench.support import print_summary, sqlalchemy_url, temporary_postgres_database
from kfeed.v1 import backtest_service_pb2 as pb
from kfeed.v1 import backtest_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.backtest.fast import warm_up
from kfeed_server.records import MarketRecord, MarketStatus, SnapshotRecord
from kfeed_server.transport.convert import dollars

MARKETS = 10
WRITE_CHUNK = 50_000


def _config(tickers: tuple[str, ...], snapshots: int) -> pb.BacktestConfig:
    start, end = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    start.FromJsonString("2025-01-01T00:00:00Z")
    end.FromSeconds(start.seconds + snapshots + 1)
    return pb.BacktestConfig(
        strategy="threshold",
        tickers=tickers,
        start_time=start,
        end_time=end,
        parameters={
            "buy_below": pb.ParameterValue(dollars_value=dollars(BUY_BELOW)),
            "sell_above": pb.ParameterValue(dollars_value=dollars(SELL_ABOVE)),
            "count": pb.ParameterValue(integer_value=COUNT),
        },
    )


async def run_benchmark(snapshots: int, database: str, repeat: int = 1) -> dict[str, object]:
    records = synthetic_snapshots(snapshots, MARKETS, seed=7)
    tickers = tuple(f"BENCH-{m}" for m in range(MARKETS))

    def engine_alone() -> Timing:
        return run_engine(records, tickers, engine_hashes=True)

    warm_up()
    compiled, _ = run_compiled(records, tickers, columnar_fingerprinter(records))
    async with contextlib.AsyncExitStack() as stack:
        if database == "postgres":
            url = sqlalchemy_url(
                await stack.enter_async_context(temporary_postgres_database("bench_bt"))
            )
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory())
            url = f"sqlite+aiosqlite:///{folder}/b.db"
        pairs, store_seconds, finals = await _run_service(
            records, tickers, snapshots, url, engine_alone, repeat
        )
    assert all(f.state == pb.BACKTEST_STATE_SUCCEEDED for f in finals), finals
    pnl_agree = all(
        f.metrics.total_pnl.ten_thousandths == engine.pnl == compiled.pnl
        for f, (_, engine) in zip(finals, pairs, strict=True)
    )
    ratios = [wall / engine.seconds for wall, engine in pairs]
    ratio = statistics.median(ratios)
    return {
        "benchmark": "backtest_service",
        "database": database,
        "snapshots": snapshots,
        "runs": repeat,
        "create_to_succeeded_seconds": [round(w, 2) for w, _ in pairs],
        "in_process_engine_seconds": [round(e.seconds, 2) for _, e in pairs],
        "service_over_engine_each": [round(r, 2) for r in ratios],
        "in_process_compiled_seconds": round(compiled.seconds, 2),
        "service_over_engine": round(ratio, 2),
        "service_over_compiled": round(min(w for w, _ in pairs) / compiled.seconds, 2),
        "store_seconds": round(store_seconds, 1),
        "pnl_agree": pnl_agree,
        "target": "service <= 2x the engine alone",
        "meets_target": ratio <= 2.0 and pnl_agree,
    }


async def _run_service(
    records: list[SnapshotRecord],
    tickers: tuple[str, ...],
    snapshots: int,
    url: str,
    engine_alone: Callable[[], Timing],
    repeat: int,
) -> tuple[list[tuple[float, Timing]], float, list[pb.Backtest]]:
    """Stores ``records`` through a real server, then ``repeat`` times runs the engine alone
    in-process and times CreateBacktest → the terminal state: ((wall seconds, engine timing) per
    pair, store seconds, the final backtests)."""
    server = KfeedServer(ServerConfig(listen="127.0.0.1:0", database_url=url))
    await server.start()
    try:
        writer = server.repositories.ingest
        await writer.write_batch(
            markets=[MarketRecord(ticker=t, status=MarketStatus.OPEN) for t in tickers]
        )
        stored_at = time.perf_counter()
        for first in range(0, snapshots, WRITE_CHUNK):
            chunk = records[first : first + WRITE_CHUNK]
            await writer.write_batch(snapshots=[r.with_id(0) for r in chunk])
        store_seconds = time.perf_counter() - stored_at
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub: pb_grpc.BacktestServiceAsyncStub = pb_grpc.BacktestServiceStub(channel)
            # The server's first backtest starts the worker pool (and loads the compiled path in
            # its forkserver): a long-lived server pays that once, so it is not timed.
            await _create_and_watch(stub, _config(tickers, 1_000))
            pairs, finals = [], []
            for _ in range(repeat):
                engine = engine_alone()
                began = time.perf_counter()
                finals.append(await _create_and_watch(stub, _config(tickers, snapshots)))
                pairs.append((time.perf_counter() - began, engine))
    finally:
        await server.stop(grace=0)
    return pairs, store_seconds, finals


async def _create_and_watch(
    stub: pb_grpc.BacktestServiceAsyncStub, config: pb.BacktestConfig
) -> pb.Backtest:
    created = await stub.CreateBacktest(pb.CreateBacktestRequest(config=config))
    final = created.backtest
    async for update in stub.WatchBacktest(
        pb.WatchBacktestRequest(backtest_id=created.backtest.backtest_id)
    ):
        final = update.backtest
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--snapshots", type=int, default=1_000_000)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--repeat", type=int, default=1, help="engine/service pairs")
    args = parser.parse_args()
    print_summary(asyncio.run(run_benchmark(args.snapshots, args.database, args.repeat)))


if __name__ == "__main__":
    main()
