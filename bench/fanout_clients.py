"""The subscriber side of bench_fanout, run as its own process so it does not share the server's
event loop: opens N StreamSnapshots streams, reports when all are caught up, then counts.

Prints one JSON line when every stream has received ``--expect`` snapshots: the wall time from
the first to the last receipt, and each snapshot's latency (receipt − its exchange time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpc

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc


async def consume(
    stub: pb_grpc.MarketServiceAsyncStub,
    expect: int,
    caught_up: asyncio.Semaphore,
    receipts: list[float],
    latencies: list[float],
) -> None:
    count = 0
    async for message in stub.StreamSnapshots(pb.StreamSnapshotsRequest()):
        kind = message.WhichOneof("event")
        if kind == "caught_up":
            caught_up.release()
        elif kind == "snapshot":
            now = time.time()
            stamp = message.snapshot.snapshot.exchange_time
            latencies.append(now - (stamp.seconds + stamp.nanos / 1e9))
            receipts.append(now)
            count += 1
            if count >= expect:
                return


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--expect", type=int, required=True)
    args = parser.parse_args()
    receipts: list[float] = []
    latencies: list[float] = []
    caught_up = asyncio.Semaphore(0)
    async with grpc.aio.insecure_channel(args.address) as channel:
        stub = pb_grpc.MarketServiceStub(channel)
        tasks = [
            asyncio.create_task(consume(stub, args.expect, caught_up, receipts, latencies))
            for _ in range(args.streams)
        ]
        for _ in range(args.streams):
            await caught_up.acquire()
        print("ready", flush=True)
        await asyncio.gather(*tasks)
    print(
        json.dumps(
            {
                "delivered": len(receipts),
                "seconds": max(receipts) - min(receipts),
                "latencies": latencies,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
