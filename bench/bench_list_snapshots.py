"""ListSnapshots of 10,000 rows for one market from PostgreSQL, against a raw baseline.

kfeed: a real ``ListSnapshots`` call (page_size 10,000) to a real server on loopback through the
generated client — repository read, record conversion, gRPC framing and the client's parse.
Baseline: the same rows fetched with a raw asyncpg query and encoded as the same protobuf
response (``SerializeToString``) — the work no implementation can avoid. Interleaved runs in the
same process; the medians' ratio is the figure (target <= 1.5).

    uv run python -m bench.bench_list_snapshots [--rows N] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc

from bench.support import (
    asyncpg_dsn,
    median,
    print_summary,
    sqlalchemy_url,
    temporary_postgres_database,
    timed_runs,
)
from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.records import DataSource, MarketRecord, MarketStatus, SnapshotRecord

TICKER = "KXBENCH-LIST"
TARGET_RATIO = 1.5
_START = datetime(2026, 1, 1, tzinfo=UTC)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

BASELINE_QUERY = """
SELECT id, ticker, exchange_time, receive_time, source, exchange_sequence, yes_bid, yes_ask,
       no_bid, no_ask, yes_bid_size, yes_ask_size, last_price, volume, volume_24h,
       open_interest, liquidity, status
FROM market_snapshots WHERE ticker = $1 ORDER BY exchange_time, id LIMIT $2
"""


def make_snapshots(count: int) -> list[SnapshotRecord]:
    return [
        SnapshotRecord(
            ticker=TICKER,
            exchange_time=_START + timedelta(milliseconds=250 * i),
            receive_time=_START + timedelta(milliseconds=250 * i, microseconds=900),
            source=DataSource.WEBSOCKET,
            exchange_sequence=i,
            yes_bid=3000 + i % 4000,
            yes_ask=3100 + i % 4000,
            no_bid=6900 - i % 4000,
            no_ask=7000 - i % 4000,
            yes_bid_size=1000 + i,
            yes_ask_size=2000 + i,
            last_price=3050 + i % 4000,
            volume=10 * i,
            volume_24h=10 * i,
            open_interest=500_000,
            liquidity=12_345_678,
            status=MarketStatus.OPEN,
        )
        for i in range(count)
    ]


def _set_timestamp(target: object, value: datetime) -> None:
    micros = (value - _EPOCH) // timedelta(microseconds=1)
    target.seconds, micro = divmod(micros, 1_000_000)  # type: ignore[attr-defined]
    target.nanos = micro * 1000  # type: ignore[attr-defined]


def encode_rows(rows: list[asyncpg.Record]) -> bytes:
    """The baseline's encoding: asyncpg rows straight into the response message."""
    response = pb.ListSnapshotsResponse()
    for row in rows:
        snapshot = response.snapshots.add(
            snapshot_id=row[0], ticker=row[1], source=row[4], status=row[17]
        )
        _set_timestamp(snapshot.exchange_time, row[2])
        _set_timestamp(snapshot.receive_time, row[3])
        if row[5] is not None:
            snapshot.exchange_sequence = row[5]
        for field, value in zip(
            ("yes_bid", "yes_ask", "no_bid", "no_ask", "last_price", "liquidity"),
            (row[6], row[7], row[8], row[9], row[12], row[16]),
            strict=True,
        ):
            if value is not None:
                getattr(snapshot, field).ten_thousandths = value
        for field, value in zip(
            ("yes_bid_size", "yes_ask_size", "volume", "volume_24h", "open_interest"),
            (row[10], row[11], row[13], row[14], row[15]),
            strict=True,
        ):
            if value is not None:
                getattr(snapshot, field).hundredths = value
    return response.SerializeToString()


async def run_benchmark(rows: int, repeat: int) -> dict[str, object]:
    async with temporary_postgres_database("kfeed_bench_list") as database:
        config = ServerConfig(listen="127.0.0.1:0", database_url=sqlalchemy_url(database))
        server = KfeedServer(config)
        await server.start()
        try:
            await server.repositories.ingest.write_batch(
                markets=[MarketRecord(ticker=TICKER, status=MarketStatus.OPEN)],
                snapshots=make_snapshots(rows),
            )
            connection = await asyncpg.connect(asyncpg_dsn(database))
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
            stub = pb_grpc.MarketServiceStub(channel)
            request = pb.ListSnapshotsRequest(ticker=TICKER, page_size=rows)

            async def through_kfeed() -> int:
                response = await stub.ListSnapshots(request)
                return len(response.snapshots)

            async def baseline() -> int:
                fetched = await connection.fetch(BASELINE_QUERY, TICKER, rows)
                return len(encode_rows(fetched))

            assert await through_kfeed() == rows
            baseline_seconds: list[float] = []
            kfeed_seconds: list[float] = []
            for _ in range(repeat):  # interleaved, so drift hits both sides alike
                baseline_seconds += await timed_runs(baseline, 1)
                kfeed_seconds += await timed_runs(through_kfeed, 1)
            await channel.close()
            await connection.close()
        finally:
            await server.stop(grace=0)
    ratio = median(kfeed_seconds) / median(baseline_seconds)
    return {
        "benchmark": "list_snapshots",
        "rows": rows,
        "kfeed_ms_per_call": round(median(kfeed_seconds) * 1000, 2),
        "baseline_ms_per_call": round(median(baseline_seconds) * 1000, 2),
        "ratio": round(ratio, 3),
        "target": f"<= {TARGET_RATIO}",
        "meets_target": ratio <= TARGET_RATIO,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    print_summary(asyncio.run(run_benchmark(args.rows, args.repeat)))


if __name__ == "__main__":
    main()
