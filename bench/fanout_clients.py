"""The subscriber side of the streaming benchmarks, run as its own process so it does not share the
server's event loop: opens N StreamSnapshots streams, reports when all are caught up, then counts.

Stream i follows every market, or with ``--markets M`` only ``<prefix>-<i mod M>``. With
``--max-batch-size`` the streams ask for batched frames (snapshots are counted inside them).
Ends when every stream has received ``--expect`` snapshots, or ``--seconds`` after the first
snapshot arrived; prints one JSON line: deliveries, the wall time from the first to the last
receipt, each snapshot's latency (receipt − its exchange time; at most ``--latency-samples``,
evenly spread) and the subscriber-gap markers seen.
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
from kfeed.v1 import types_pb2

STREAMS_PER_CHANNEL = 100


class Tally:
    def __init__(self, latency_every: int) -> None:
        self.delivered = 0
        self.gaps = 0
        self.first = 0.0
        self.last = 0.0
        self.latencies: list[float] = []
        self._latency_every = latency_every
        self.started = asyncio.Event()
        self.failed: list[str] = []

    def received(self, stamps: list[float]) -> None:
        now = time.time()
        if not self.first:
            self.first = now
            self.started.set()
        self.last = now
        every = self._latency_every
        for stamp in stamps:
            self.delivered += 1
            if self.delivered % every == 0:
                self.latencies.append(now - stamp)


def _stamp(snapshot: types_pb2.MarketSnapshot) -> float:
    stamp = snapshot.exchange_time
    return float(stamp.seconds + stamp.nanos / 1e9)


async def consume(
    stub: pb_grpc.MarketServiceAsyncStub,
    request: pb.StreamSnapshotsRequest,
    expect: int | None,
    caught_up: asyncio.Semaphore,
    tally: Tally,
) -> None:
    try:
        await _consume(stub, request, expect, caught_up, tally)
    except grpc.aio.AioRpcError as error:  # counted and reported; never leaves the run hanging
        tally.failed.append(f"{error.code().name}: {error.details()}")
        caught_up.release()


async def _consume(
    stub: pb_grpc.MarketServiceAsyncStub,
    request: pb.StreamSnapshotsRequest,
    expect: int | None,
    caught_up: asyncio.Semaphore,
    tally: Tally,
) -> None:
    count = 0
    async for message in stub.StreamSnapshots(request):
        kind = message.WhichOneof("event")
        if kind == "snapshot":
            stamps = [_stamp(message.snapshot.snapshot)]
        elif kind == "snapshot_batch":
            stamps = [_stamp(update.snapshot) for update in message.snapshot_batch.updates]
        else:
            if kind == "caught_up":
                caught_up.release()
            elif kind == "subscriber_gap":
                tally.gaps += 1
            continue
        tally.received(stamps)
        count += len(stamps)
        if expect is not None and count >= expect:
            return


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--expect", type=int, help="snapshots per stream")
    parser.add_argument("--seconds", type=float, help="count for this long, then stop")
    parser.add_argument("--markets", type=int, default=0, help="stream i follows one of M")
    parser.add_argument("--ticker-prefix", default="KXFAN")
    parser.add_argument("--max-batch-size", type=int, default=0)
    parser.add_argument("--latency-every", type=int, default=1)
    args = parser.parse_args()
    tally = Tally(args.latency_every)
    caught_up = asyncio.Semaphore(0)
    # A connection of its own per channel (gRPC shares one between equal channels otherwise).
    channels = [
        grpc.aio.insecure_channel(args.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range((args.streams + STREAMS_PER_CHANNEL - 1) // STREAMS_PER_CHANNEL)
    ]
    tasks = []
    for index in range(args.streams):
        tickers = [f"{args.ticker_prefix}-{index % args.markets:02d}"] if args.markets else []
        request = pb.StreamSnapshotsRequest(tickers=tickers, max_batch_size=args.max_batch_size)
        stub = pb_grpc.MarketServiceStub(channels[index // STREAMS_PER_CHANNEL])
        tasks.append(asyncio.create_task(consume(stub, request, args.expect, caught_up, tally)))
    for opened in range(args.streams):
        await caught_up.acquire()
        if opened % 1000 == 999:
            print(f"{opened + 1} streams caught up", file=sys.stderr, flush=True)
    print("ready", flush=True)
    if args.seconds is None:
        await asyncio.gather(*tasks)
    else:
        await tally.started.wait()
        await asyncio.sleep(args.seconds - (time.time() - tally.first))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    print(
        json.dumps(
            {
                "delivered": tally.delivered,
                "seconds": tally.last - tally.first,
                "latencies": tally.latencies,
                "gaps": tally.gaps,
                "failed_streams": len(tally.failed),
                "failures": sorted(set(tally.failed))[:5],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
