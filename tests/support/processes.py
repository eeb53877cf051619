"""Real `kfeed` processes for end-to-end tests (the simulator, the server, the ingest) and the
free loopback ports they listen on."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx

from tests.support.waiting import (
    POLL_INTERVAL,
    eventually,
    wait_until_answering,
    wait_until_serving,
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for processes that need it on the command line)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


KEY_ID = "kfeed-e2e"
STARTUP_SECONDS = 60.0


@dataclass
class KfeedProcess:
    """A running `kfeed <command>` with its log file."""

    command: str
    process: asyncio.subprocess.Process
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_running(self) -> None:
        assert self.process.returncode is None, self.log()

    async def stop(self, sig: signal.Signals = signal.SIGTERM, within: float = 20.0) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
            try:
                await asyncio.wait_for(self.process.wait(), within)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        assert self.process.returncode is not None
        return self.process.returncode


_started = itertools.count(1)


async def start_kfeed(command: str, args: Sequence[str], log_dir: Path) -> KfeedProcess:
    log_path = log_dir / f"{next(_started):02d}-{command}.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kfeed_cli.main", command, *args,
            stdout=log_file, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
        )  # fmt: skip
    return KfeedProcess(command, process, log_path)


async def run_kfeed(command: str, args: Sequence[str], log_dir: Path, within: float = 120) -> int:
    """Run a `kfeed` command to completion; its exit status."""
    running = await start_kfeed(command, args, log_dir)
    try:
        return await asyncio.wait_for(running.process.wait(), within)
    finally:
        await running.stop(signal.SIGKILL)


async def wait_for_http(url: str, running: KfeedProcess) -> None:
    try:
        await wait_until_answering(url, STARTUP_SECONDS, running.assert_running)
    except TimeoutError:
        # A process that never came up is not left running beyond the failed test.
        await running.stop(signal.SIGKILL)
        raise TimeoutError(f"{url} never answered:\n{running.log()}") from None


async def wait_for_serving(address: str, running: KfeedProcess) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await wait_until_serving(channel, STARTUP_SECONDS, running.assert_running)
        except TimeoutError:
            await running.stop(signal.SIGKILL)
            raise TimeoutError(f"{address} never became SERVING:\n{running.log()}") from None


@dataclass
class Simulator:
    """A `kfeed sim --no-auto-step` process: it moves only when a test steps it."""

    base_url: str
    private_key_file: Path
    running: KfeedProcess

    @property
    def rest_url(self) -> str:
        return f"{self.base_url}/trade-api/v2"

    async def step(self, count: int = 1) -> None:
        async with httpx.AsyncClient() as client:
            reply = await client.post(f"{self.base_url}/_sim/step", params={"count": count})
            reply.raise_for_status()

    async def set_faults(self, **knobs: Any) -> None:
        async with httpx.AsyncClient() as client:
            (await client.post(f"{self.base_url}/_sim/faults", json=knobs)).raise_for_status()

    async def truth(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=30) as client:
            reply = await client.get(f"{self.base_url}/_sim/truth")
            reply.raise_for_status()
            document: dict[str, Any] = reply.json()
            return document


@dataclass
class Server:
    address: str
    database_url: str
    log_dir: Path
    running: KfeedProcess | None = None

    async def start(self) -> None:
        self.running = await start_kfeed(
            "serve", ["--listen", self.address, "--database-url", self.database_url], self.log_dir
        )
        await wait_for_serving(self.address, self.running)

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        assert self.running is not None
        return await self.running.stop(sig)


def ingest_args(simulator: Simulator, server: Server, spool: Path, *extra: str) -> list[str]:
    return [
        "--server", server.address, "--kalshi-url", simulator.rest_url,
        "--api-key-id", KEY_ID, "--api-private-key-file", str(simulator.private_key_file),
        "--spool-dir", str(spool), "--flush-timeout", "10", *extra,
    ]  # fmt: skip


async def stop_once_agreeing(
    ingest: KfeedProcess,
    differences: Callable[[], Awaitable[list[str]]],
    within: float,
    interval: float = POLL_INTERVAL,
) -> None:
    """Wait while ``ingest`` runs until ``differences()`` (what kfeed holds against the
    exchange's truth) is empty, then stop it gracefully; an AssertionError listing the
    differences left at the deadline."""
    left: list[str] = []

    async def agreeing() -> bool:
        ingest.assert_running()
        left[:] = await differences()
        return not left

    try:
        await eventually(
            agreeing, within, what="kfeed holding the exchange's truth", interval=interval
        )
    except TimeoutError:
        raise AssertionError("\n".join(left[:40])) from None
    finally:
        assert await ingest.stop() == 0, ingest.log()
