"""`kfeed serve` as a real process: it starts on SQLite, serves, and exits 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc

from tests.support.processes import free_port
from tests.support.waiting import wait_until_serving


async def _wait_serving(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        await wait_until_serving(channel)


async def test_serve_on_sqlite_then_sigterm_exits_zero(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
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
    address = f"127.0.0.1:{free_port()}"
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
