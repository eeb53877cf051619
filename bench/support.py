"""What the benchmarks share: a throw-away PostgreSQL database, timing, and the summary line."""

from __future__ import annotations

import json
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg

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
