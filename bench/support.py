"""What the benchmarks share: a throw-away PostgreSQL database, timing, the summary line, and
real kfeed processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.waiting import eventually

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"


@asynccontextmanager
async def temporary_postgres_database(prefix: str) -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for one benchmark run; yields its name, drops it after."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield name
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def asyncpg_dsn(database: str) -> str:
    return f"postgresql://postgres@127.0.0.1:5432/{database}"


def sqlalchemy_url(database: str) -> str:
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"


async def timed_runs(run: Callable[[], Awaitable[object]], repeat: int) -> list[float]:
    """Wall seconds of each of ``repeat`` runs of ``run`` (after one untimed warm-up)."""
    await run()
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        await run()
        seconds.append(time.perf_counter() - started)
    return seconds


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def print_summary(summary: dict[str, object]) -> None:
    """The benchmark's last line: one JSON object that `python -m bench` collects."""
    print(json.dumps(summary, sort_keys=True))


# --- real kfeed processes -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def start_kfeed(
    command: str, args: Sequence[str], log_dir: Path, code: Path | None = None
) -> asyncio.subprocess.Process:
    """``kfeed command args``; with ``code``, the kfeed of that source tree (e.g. an older
    commit: ``git archive REV | tar -x -C DIR``) instead of this checkout's."""
    env = None
    if code is not None:
        roots = ("server", "cli", "ingest", "sim", "clients/python/src")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(code / root) for root in roots)}
    with (log_dir / f"{command}.log").open("wb") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kfeed_cli.main", command, *args,
            stdout=log, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
            env=env,
        )  # fmt: skip


async def serving(port: int) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=1
        )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def stop_processes(*processes: asyncio.subprocess.Process) -> None:
    """SIGTERM each process still running, then wait for all (SIGKILL after 20 s)."""
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()


async def wait_until(ready: Callable[[], Awaitable[bool]], what: str, seconds: float = 60) -> None:
    """Until ``ready()`` answers True (a failing probe counts as not ready yet): the tests' one
    polling helper, ``eventually``."""

    async def probe() -> bool:
        with contextlib.suppress(Exception):
            return await ready()
        return False

    await eventually(probe, seconds, what=f"{what} ready", interval=0.2)


@asynccontextmanager
async def kfeed_serve(database_url: str, *options: str) -> AsyncIterator[str]:
    """A `kfeed serve` process on a free loopback port over ``database_url`` (and further
    ``options``), serving; yields its address and stops it afterwards."""
    async with kfeed_serve_process(database_url, *options) as (address, _):
        yield address


@asynccontextmanager
async def kfeed_serve_process(
    database_url: str, *options: str, code: Path | None = None
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """:func:`kfeed_serve`, yielding the process too (to read its memory, say); ``code``: see
    :func:`start_kfeed`."""
    port = free_port()
    with tempfile.TemporaryDirectory() as logs:
        args = ["--listen", f"127.0.0.1:{port}", "--database-url", database_url, *options]
        process = await start_kfeed("serve", args, Path(logs), code)
        try:
            await wait_until(partial(serving, port), "kfeed serve")
            yield f"127.0.0.1:{port}", process
        finally:
            await stop_processes(process)
