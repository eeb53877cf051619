"""`kfeed demo` as a new user runs it: one command, live snapshots, Ctrl-C stops everything."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import httpx

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from tests.support.processes import free_port


async def _read_until(stream: asyncio.StreamReader, marker: bytes, within: float) -> bytes:
    seen = b""
    async with asyncio.timeout(within):
        while marker not in seen:
            line = await stream.readline()
            assert line, f"demo output ended before {marker!r}:\n{seen.decode()}"
            seen += line
    return seen


async def _port_closed(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


async def test_demo_runs_live_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    server_port, sim_port, web_port = free_port(), free_port(), free_port()
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kfeed_cli.main", "demo",
        "--data-dir", str(tmp_path / "data"), "--listen", f"127.0.0.1:{server_port}",
        "--sim-listen", f"127.0.0.1:{sim_port}", "--web-listen", f"127.0.0.1:{web_port}",
        "--tick-interval", "0.2",
        "--status-interval", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert demo.stdout is not None
    try:
        intro = await _read_until(demo.stdout, b"Ctrl-C stops everything", within=90)
        assert b"kfeed tail" in intro
        assert b"grpcurl" in intro
        # The dashboard's address is printed, and it answers there.
        assert f"http://127.0.0.1:{web_port}/".encode() in intro
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{web_port}/")).status_code == 200
        # A subscriber sees live snapshots from the simulator, through ingest and the server.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server_port}") as channel:
            stream = pb_grpc.MarketServiceStub(channel).StreamSnapshots(pb.StreamSnapshotsRequest())
            live = 0
            async with asyncio.timeout(60):
                async for message in stream:
                    if message.HasField("snapshot"):
                        live += 1
                        if live == 3:
                            break
            stream.cancel()
        await _read_until(demo.stdout, b"live: ", within=30)
        demo.send_signal(signal.SIGINT)
        rest = await _read_until(demo.stdout, b"stopped.", within=60)
        # Ctrl-C stops everything cleanly, then ends the demo as interrupted (exit 130).
        assert await asyncio.wait_for(demo.wait(), 30) == 130, rest.decode()
    finally:
        if demo.returncode is None:
            demo.kill()
            await demo.wait()
    assert (tmp_path / "data" / "kfeed.db").exists()
    assert await _port_closed(server_port)
    assert await _port_closed(sim_port)
    assert await _port_closed(web_port)
