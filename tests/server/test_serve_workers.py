"""`kfeed serve --workers N` as real processes: N workers share one port, the kernel spreads
connections over them, and whatever one ingests streams from all; SQLite is refused in one line."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from tests.server.test_stream_snapshots import caught_up, read_until, snapshot_ids, snapshots
from tests.support.factories import make_market
from tests.support.processes import free_port
from tests.support.servers import PublishSession
from tests.support.waiting import eventually, wait_until_serving

WORKERS = 2
# Connections opened: all of them landing on one of two workers has odds of 2 in 2^24.
CONNECTIONS = 24
MARKET = make_market("KXWORKERS-A")


def _workers(pid: int) -> list[int]:
    """The worker processes of the supervisor ``pid`` (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(child)
        for child in children
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _established_on(port: int) -> set[str]:
    """Socket inodes of established TCP connections to ``port`` on this machine."""
    inodes = set()
    lines = [
        line
        for table in ("/proc/net/tcp", "/proc/net/tcp6")  # gRPC listens dual-stack
        for line in Path(table).read_text().splitlines()[1:]
    ]
    for line in lines:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == "01":
            inodes.add(fields[9])
    return inodes


async def _start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kfeed_cli.main", "serve", *args,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_sqlite_is_refused_with_more_than_one_worker(tmp_path: Path) -> None:
    process = await _start(
        "--listen", f"127.0.0.1:{free_port()}", "--workers", "2",
        "--database-url", f"sqlite+aiosqlite:///{tmp_path / 'kfeed.db'}",
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode != 0
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "--workers above 1 needs PostgreSQL" in lines[0]


@pytest.mark.e2e
@pytest.mark.timeout(300)  # each worker imports kfeed afresh (spawn): slow on a loaded machine
async def test_workers_share_the_port_and_stream_what_any_of_them_ingests(
    postgres_url: str,
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    process = await _start(
        "--listen", address, "--workers", str(WORKERS), "--database-url", postgres_url,
        "--log-level", "WARNING",
    )  # fmt: skip
    try:
        async with AsyncExitStack() as stack:
            channels = [
                await stack.enter_async_context(
                    # A connection of its own per channel (equal channels share one otherwise).
                    grpc.aio.insecure_channel(
                        address, options=[("grpc.use_local_subchannel_pool", 1)]
                    )
                )
                for _ in range(CONNECTIONS)
            ]
            for channel in channels:
                await wait_until_serving(channel, within=180)
            workers = _workers(process.pid)
            assert len(workers) == WORKERS
            connections = _established_on(port)
            assert all(_socket_inodes(worker) & connections for worker in workers)

            publisher = PublishSession(channels[0])
            await publisher.publish(markets=[MARKET])
            streams = [
                pb_grpc.MarketServiceStub(channel).StreamSnapshots(
                    pb.StreamSnapshotsRequest(tickers=[MARKET.ticker])
                )
                for channel in channels
            ]
            for stream in streams:
                await read_until(stream, caught_up)
            await publisher.publish(snapshots=snapshots(MARKET.ticker, 0, 5))
            received = [
                snapshot_ids(await read_until(stream, lambda m: len(snapshot_ids(m)) >= 5))
                for stream in streams
            ]
            assert all(ids == received[0] for ids in received)
            assert received[0] == sorted(set(received[0]))
            assert len(received[0]) == 5
            for stream in streams:
                stream.cancel()
            await publisher.close()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=60) == 0
        await eventually(lambda: not any(Path(f"/proc/{w}").exists() for w in workers))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
