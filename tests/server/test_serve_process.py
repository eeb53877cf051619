"""`kfeed serve` as a real process: it starts on SQLite, serves, and exits 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _wait_serving(address: str, within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{address} never became SERVING")
            await asyncio.sleep(0.1)


async def test_serve_on_sqlite_then_sigterm_exits_zero(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"
    database = tmp_path / "nested" / "kfeed.db"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kfeed_cli.main", "serve",
        "--listen", address,
        "--database-url", f"sqlite+aiosqlite:///{database}",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await _wait_serving(address)
        assert database.exists()
        process.send_signal(signal.SIGTERM)
        return_code = await asyncio.wait_for(process.wait(), timeout=20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    stderr = (await process.stderr.read()).decode() if process.stderr else ""
    assert return_code == 0, stderr
    assert "shutting down" in stderr


async def test_serve_refuses_non_loopback_without_auth(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kfeed_cli.main", "serve",
        "--listen", "0.0.0.0:0",
        "--database-url", f"sqlite+aiosqlite:///{tmp_path / 'kfeed.db'}",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode != 0
    assert b"refusing to listen on 0.0.0.0:0" in stderr


async def test_serve_reads_flags_from_environment(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"
    database = tmp_path / "from-env.db"
    environment = {
        "KFEED_LISTEN": address,
        "KFEED_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kfeed_cli.main", "serve", env={**os.environ, **environment}
    )
    try:
        await _wait_serving(address)
        assert database.exists()
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=20) == 0
