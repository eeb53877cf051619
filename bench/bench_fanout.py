"""Fan-out of live snapshots to 100 subscribers, against a bare grpc.aio streaming loop.

kfeed: a real server (SQLite in a temporary folder) fed through IngestService.Publish; 100
StreamSnapshots subscribers in a separate process (bench/fanout_clients.py) count what arrives.
Baseline: a bare grpc.aio server whose StreamSnapshots handler sends the very same
StreamSnapshotsResponse messages, prebuilt in memory, to the same 100 subscribers — gRPC's own
cost with no storage, hub or conversion. Figure: delivered snapshots/s of kfeed ÷ baseline
(target ≥ 0.7). The same with batched frames (max_batch_size 500, as the clients ask): delivered
snapshots/s ÷ the unbatched kfeed run (target ≥ 5). Paced runs (with and without batching)
report latency from publish (the snapshot's exchange time, stamped just before Publish) to
receipt: p50 and p99 (target < 50 ms).

    uv run python -m bench.bench_fanout [--subscribers N] [--snapshots N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from bench.support import print_summary
from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.records import DataSource, MarketRecord, MarketStatus, SnapshotRecord
from kfeed_server.transport.convert import snapshot_to_proto
from kfeed_server.transport.requests import RequestTokens, new_token_key
from tests.support.servers import PublishSession

TARGET_RATIO = 0.7
TARGET_P99_MS = 50.0
TARGET_BATCHING_GAIN = 5.0
# max_batch_size of the batched runs (what the clients ask for by default).
BATCHED = 500
MARKETS = [MarketRecord(ticker=f"KXFAN-{i:02d}", status=MarketStatus.OPEN) for i in range(20)]
BATCH = 100


def make_snapshots(count: int, start: int = 0) -> list[SnapshotRecord]:
    """Distinct snapshots stamped now (a microsecond apart: each is its own instant)."""
    now = datetime.now(UTC)
    return [
        _snapshot(i, now + timedelta(microseconds=i - start)) for i in range(start, start + count)
    ]


def _snapshot(i: int, at: datetime) -> SnapshotRecord:
    k = i % 3000
    return SnapshotRecord(
        ticker=MARKETS[i % len(MARKETS)].ticker,
        exchange_time=at,
        receive_time=at,
        source=DataSource.WEBSOCKET,
        exchange_sequence=i,
        yes_bid=3000 + k,
        yes_bid_size=1000,
        yes_ask_size=2000,
        yes_ask=3100 + k,
        no_bid=6900 - k,
        no_ask=7000 - k,
        last_price=3050,
        volume=10 * i,
        open_interest=5000,
        status=MarketStatus.OPEN,
    )


async def run_subscribers(
    address: str, subscribers: int, expect: int | None, *options: str, ready_within: float = 120
) -> tuple[Any, Any]:
    """Start bench/fanout_clients.py (``options`` are its further flags); once its streams are
    caught up, return the process and a coroutine function that awaits its result."""
    counting = ["--expect", str(expect)] if expect is not None else []
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.fanout_clients", "--address", address,
        "--streams", str(subscribers), *counting, *options,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), ready_within)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert line.strip() == b"ready", line

    async def result() -> dict[str, Any]:
        assert process.stdout is not None
        output = await asyncio.wait_for(process.stdout.read(), 600)  # one long JSON line
        await process.wait()
        parsed: dict[str, Any] = json.loads(output)
        return parsed

    return process, result


async def kfeed_run(
    subscribers: int,
    count: int,
    batch: int = BATCH,
    pace_seconds: float = 0.0,
    max_batch_size: int = 0,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        config = ServerConfig(
            listen="127.0.0.1:0", database_url=f"sqlite+aiosqlite:///{folder}/bench.db"
        )
        server = KfeedServer(config)
        await server.start()
        try:
            address = f"127.0.0.1:{server.port}"
            async with grpc.aio.insecure_channel(address) as channel:
                publisher = PublishSession(channel)
                await publisher.publish(markets=MARKETS)
                _, result = await run_subscribers(
                    address, subscribers, count, "--max-batch-size", str(max_batch_size)
                )
                for start in range(0, count, batch):
                    ack = await publisher.publish(snapshots=make_snapshots(batch, start))
                    assert ack.snapshots_stored == batch, ack
                    if pace_seconds:
                        await asyncio.sleep(pace_seconds)
                outcome: dict[str, Any] = await result()
                await publisher.close()
        finally:
            await server.stop(grace=0)
    return outcome


class _BareStreamer(pb_grpc.MarketServiceServicer):
    """The baseline: caught-up, then the prebuilt messages, to every stream."""

    def __init__(self, messages: Sequence[pb.StreamSnapshotsResponse]) -> None:
        self.messages = messages
        self.go = asyncio.Event()

    async def StreamSnapshots(  # noqa: N802 - the generated method name
        self, request: pb.StreamSnapshotsRequest, context: Any
    ) -> AsyncIterator[pb.StreamSnapshotsResponse]:
        yield pb.StreamSnapshotsResponse(caught_up=pb.CaughtUp())
        await self.go.wait()
        for message in self.messages:
            yield message


async def baseline_run(subscribers: int, count: int) -> dict[str, Any]:
    records = make_snapshots(count)
    tokens = RequestTokens(new_token_key())
    messages = [
        pb.StreamSnapshotsResponse(
            resume_token=tokens.encode_resume_token(i + 1),
            snapshot=pb.SnapshotUpdate(snapshot=snapshot_to_proto(record)),
        )
        for i, record in enumerate(records)
    ]
    streamer = _BareStreamer(messages)  # type: ignore[abstract]  # only StreamSnapshots is called
    server = grpc.aio.server()
    pb_grpc.add_MarketServiceServicer_to_server(streamer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        _, result = await run_subscribers(f"127.0.0.1:{port}", subscribers, count)
        streamer.go.set()
        outcome: dict[str, Any] = await result()
    finally:
        await server.stop(0)
    return outcome


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run_benchmark(subscribers: int, snapshots: int) -> dict[str, object]:
    baseline = await baseline_run(subscribers, snapshots)
    kfeed = await kfeed_run(subscribers, snapshots)
    # Batched frames: more snapshots, so the timed window is not a handful of messages.
    batched = await kfeed_run(subscribers, 5 * snapshots, max_batch_size=BATCHED)
    # Latency at a steady 200 snapshots/s (10 per batch every 50 ms): 20,000 messages/s to the
    # subscribers, well inside what their one Python process can read (see the rates above), so
    # the figure is the server's delay, not the readers' backlog.
    paced = await kfeed_run(subscribers, min(snapshots, 1000), batch=10, pace_seconds=0.05)
    paced_batched = await kfeed_run(
        subscribers, min(snapshots, 1000), batch=10, pace_seconds=0.05, max_batch_size=BATCHED
    )
    baseline_rate = baseline["delivered"] / baseline["seconds"]
    kfeed_rate = kfeed["delivered"] / kfeed["seconds"]
    batched_rate = batched["delivered"] / batched["seconds"]
    latencies_ms = [1000 * value for value in paced["latencies"]]
    batched_latencies_ms = [1000 * value for value in paced_batched["latencies"]]
    ratio = kfeed_rate / baseline_rate
    batching_gain = batched_rate / kfeed_rate
    p99 = percentile(latencies_ms, 0.99)
    batched_p99 = percentile(batched_latencies_ms, 0.99)
    return {
        "benchmark": "fanout",
        "subscribers": subscribers,
        "snapshots": snapshots,
        "kfeed_delivered_per_s": round(kfeed_rate),
        "baseline_delivered_per_s": round(baseline_rate),
        "ratio": round(ratio, 3),
        "batched_delivered_per_s": round(batched_rate),
        "batched_vs_unbatched": round(batching_gain, 2),
        "latency_p50_ms": round(percentile(latencies_ms, 0.50), 2),
        "latency_p99_ms": round(p99, 2),
        "batched_latency_p50_ms": round(percentile(batched_latencies_ms, 0.50), 2),
        "batched_latency_p99_ms": round(batched_p99, 2),
        "target": (
            f"ratio >= {TARGET_RATIO}, batched >= {TARGET_BATCHING_GAIN} x unbatched, "
            f"p99 < {TARGET_P99_MS} ms (batched)"
        ),
        "meets_target": (
            ratio >= TARGET_RATIO
            and batching_gain >= TARGET_BATCHING_GAIN
            and batched_p99 < TARGET_P99_MS
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--snapshots", type=int, default=2000)
    args = parser.parse_args()
    started = time.perf_counter()
    summary = asyncio.run(run_benchmark(args.subscribers, args.snapshots))
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    print_summary(summary)


if __name__ == "__main__":
    main()
