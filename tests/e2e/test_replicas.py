"""Two `kfeed serve` processes on one PostgreSQL database, started together: `kfeed ingest`
publishes to one, and a live stream on the other receives every stored snapshot, in id order."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import grpc

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_server.db import create_engine
from kfeed_server.db.repositories import build_repositories
from tests.server.test_stream_snapshots import read
from tests.support.processes import Server, Simulator, free_port, ingest_args, run_kfeed


async def _stored_ids(database_url: str) -> list[int]:
    engine = create_engine(database_url)
    try:
        rows = await build_repositories(engine).snapshots.list_after_id(
            0, tickers=None, limit=1_000_000
        )
    finally:
        await engine.dispose()
    return [row.snapshot_id for row in rows]


async def test_ingest_through_one_server_streams_live_from_the_other(
    simulator: Simulator, postgres_url: str, log_dir: Path, tmp_path: Path
) -> None:
    writer, replica = (
        Server(f"127.0.0.1:{free_port()}", postgres_url, log_dir / name)
        for name in ("writer", "replica")
    )
    for server in (writer, replica):
        server.log_dir.mkdir()
    async with AsyncExitStack() as stack:
        await asyncio.gather(writer.start(), replica.start())  # both migrate the new database
        for server in (writer, replica):
            stack.push_async_callback(server.stop)
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(replica.address))
        stream = pb_grpc.MarketServiceStub(channel).StreamSnapshots(pb.StreamSnapshotsRequest())
        assert (await read(stream)).WhichOneof("event") == "caught_up"
        await simulator.step(3)
        args = ingest_args(simulator, writer, tmp_path / "spool", "--mode", "poll", "--once")
        assert await run_kfeed("ingest", args, log_dir) == 0
        stored = await _stored_ids(postgres_url)
        assert stored
        streamed: list[int] = []
        while len(streamed) < len(stored):
            message = await read(stream)
            if message.WhichOneof("event") == "snapshot":
                streamed.append(message.snapshot.snapshot.snapshot_id)
        assert streamed == stored
        stream.cancel()
