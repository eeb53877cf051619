"""StreamSnapshots replay over the web listener (Connect, gRPC-Web) against native gRPC.

One server (SQLite, in this process) with both listeners; the same stored snapshots replayed by
the same servicer, read to the caught-up marker by a Python client of each protocol: grpc.aio
for native gRPC (the baseline), connectrpc's generated client for Connect and gRPC-Web.
Interleaved runs; the figure is each web protocol's snapshots/s as a share of native gRPC's
(target: at least 0.25 — the web listener is for browsers, heavy subscribers use gRPC).

    uv run python -m bench.bench_web_stream [--snapshots N] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from connectrpc.protocol import ProtocolType

from bench.bench_list_snapshots import TICKER, make_snapshots
from bench.support import median, print_summary, timed_runs
from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed.v1.market_service_connect import MarketServiceClient
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.records import MarketRecord, MarketStatus
from kfeed_server.web import WebConfig

TARGET_SHARE = 0.25
BATCH = 500


def _request() -> pb.StreamSnapshotsRequest:
    request = pb.StreamSnapshotsRequest(tickers=[TICKER], max_batch_size=BATCH)
    request.start_time.FromSeconds(0)
    return request


def _count(message: pb.StreamSnapshotsResponse) -> int:
    kind = message.WhichOneof("event")
    if kind == "snapshot_batch":
        return len(message.snapshot_batch.updates)
    return 1 if kind == "snapshot" else 0


async def _grpc_replay(address: str, expected: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stream = pb_grpc.MarketServiceStub(channel).StreamSnapshots(_request())
        received = 0
        async for message in stream:
            received += _count(message)
            if message.HasField("caught_up"):
                break
        stream.cancel()
    assert received == expected, received


async def _web_replay(url: str, protocol: ProtocolType, expected: int) -> None:
    async with MarketServiceClient(url, protocol=protocol) as client:
        received = 0
        async for message in client.stream_snapshots(_request()):
            received += _count(message)
            if message.HasField("caught_up"):
                break
    assert received == expected, received


async def run_benchmark(snapshots: int, repeat: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as directory:
        config = ServerConfig(
            listen="127.0.0.1:0",
            database_url=f"sqlite+aiosqlite:///{Path(directory) / 'bench.db'}",
            web=WebConfig("127.0.0.1:0", web_root=Path(directory)),
        )
        server = KfeedServer(config)
        await server.start()
        try:
            await server.repositories.ingest.write_batch(
                markets=[MarketRecord(ticker=TICKER, status=MarketStatus.OPEN)],
                snapshots=make_snapshots(snapshots),
            )
            assert server.web is not None
            url = server.web.url.rstrip("/")
            runs: dict[str, Callable[[], Awaitable[None]]] = {
                "grpc": lambda: _grpc_replay(f"127.0.0.1:{server.port}", snapshots),
                "connect": lambda: _web_replay(url, ProtocolType.CONNECT, snapshots),
                "grpc_web": lambda: _web_replay(url, ProtocolType.GRPC_WEB, snapshots),
            }
            seconds: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(repeat):  # interleaved: drift in the machine's load hits all alike
                for name, run in runs.items():
                    seconds[name].extend(await timed_runs(run, 1))
        finally:
            await server.stop(grace=0)
    rate = {name: snapshots / median(values) for name, values in seconds.items()}
    share = {name: rate[name] / rate["grpc"] for name in ("connect", "grpc_web")}
    return {
        "snapshots": snapshots,
        "repeat": repeat,
        "snapshots_per_second": {name: round(value) for name, value in rate.items()},
        "share_of_grpc": {name: round(value, 3) for name, value in share.items()},
        "target_share": TARGET_SHARE,
        "meets_target": min(share.values()) >= TARGET_SHARE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--snapshots", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    arguments = parser.parse_args()
    print_summary(asyncio.run(run_benchmark(arguments.snapshots, arguments.repeat)))


if __name__ == "__main__":
    main()
