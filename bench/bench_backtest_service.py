"""CreateBacktest to SUCCEEDED over 1,000,000 stored snapshots: the wall time a researcher waits.

The threshold strategy of bench_backtest over the same synthetic data, stored in SQLite and run
through a real server: CreateBacktest, then WatchBacktest until the terminal state. For scale the
same engine runs in-process on the same records (no storage, no process pool, no gRPC); the
ratio of the two is reported, not a target — the issue asks for the wall time.

    uv run python -m bench.bench_backtest_service [--snapshots N]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import grpc
from google.protobuf import timestamp_pb2

from bench.bench_backtest import BUY_BELOW, COUNT, SELL_ABOVE, run_engine, synthetic_snapshots
from bench.support import print_summary
from kfeed.v1 import backtest_service_pb2 as pb
from kfeed.v1 import backtest_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.records import MarketRecord, MarketStatus
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


async def run_benchmark(snapshots: int) -> dict[str, object]:
    records = synthetic_snapshots(snapshots, MARKETS, seed=7)
    tickers = tuple(f"BENCH-{m}" for m in range(MARKETS))
    in_process = run_engine(records, tickers, engine_hashes=True)
    with tempfile.TemporaryDirectory() as folder:
        server = KfeedServer(
            ServerConfig(listen="127.0.0.1:0", database_url=f"sqlite+aiosqlite:///{folder}/b.db")
        )
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
                stub = pb_grpc.BacktestServiceStub(channel)
                began = time.perf_counter()
                created = await stub.CreateBacktest(
                    pb.CreateBacktestRequest(config=_config(tickers, snapshots))
                )
                final = created.backtest
                async for update in stub.WatchBacktest(
                    pb.WatchBacktestRequest(backtest_id=created.backtest.backtest_id)
                ):
                    final = update.backtest
                wall = time.perf_counter() - began
        finally:
            await server.stop(grace=0)
    assert final.state == pb.BACKTEST_STATE_SUCCEEDED, final
    service_pnl = final.metrics.total_pnl.ten_thousandths
    return {
        "benchmark": "backtest_service",
        "snapshots": snapshots,
        "create_to_succeeded_seconds": round(wall, 2),
        "in_process_engine_seconds": round(in_process.seconds, 2),
        "service_over_engine": round(wall / in_process.seconds, 2),
        "store_seconds": round(store_seconds, 1),
        "pnl_agree": service_pnl == in_process.pnl,
        "target": "report the wall time",
        "meets_target": service_pnl == in_process.pnl,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--snapshots", type=int, default=1_000_000)
    args = parser.parse_args()
    print_summary(asyncio.run(run_benchmark(args.snapshots)))


if __name__ == "__main__":
    main()
