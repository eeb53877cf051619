"""`kfeed demo`: the simulator, the server on SQLite in ./data (with the dashboard) and the ingest,
live, in one go.

Each part runs as its own process, exactly as in production (``kfeed sim``, ``kfeed serve``,
``kfeed ingest --mode ws``); the demo only starts them in order, signs the ingest's requests with
the key pair the sim hands out, shows how to watch the feed, and stops everything cleanly on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field
from rich.console import Console

from kfeed.v1 import market_service_pb2, market_service_pb2_grpc, types_pb2
from kfeed_settings import CommandError, CommandSettings
from kfeed_settings.stopping import StopSignals

DEMO_KEY_ID = "kfeed-demo"
_STARTUP_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0


@dataclass
class _Child:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path


async def _start(name: str, args: list[str], logs: Path) -> _Child:
    log_path = logs / f"{name}.log"
    log_file: IO[bytes] = log_path.open("ab")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kfeed_cli.main", name, *args,
        stdout=log_file, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
        # Its own session: a terminal's Ctrl-C reaches the demo alone, which then stops the
        # children in order (ingest first, so it can flush into a live server).
        start_new_session=True,
    )  # fmt: skip
    log_file.close()  # the child holds its own descriptor
    return _Child(name, process, log_path)


async def _wait_until_serving(address: str, child: _Child) -> None:
    deadline = asyncio.get_running_loop().time() + _STARTUP_TIMEOUT
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while asyncio.get_running_loop().time() < deadline:
            if child.process.returncode is not None:
                raise RuntimeError(
                    f"kfeed serve exited: {_last_line(child.log_path)} (log: {child.log_path})"
                )
            with contextlib.suppress(grpc.aio.AioRpcError):
                response = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"kfeed serve did not become SERVING; see {child.log_path}")


async def _wait_for_port(host: str, port: int, child: _Child) -> None:
    deadline = asyncio.get_running_loop().time() + _STARTUP_TIMEOUT
    while asyncio.get_running_loop().time() < deadline:
        if child.process.returncode is not None:
            raise RuntimeError(
                f"kfeed {child.name} exited: {_last_line(child.log_path)} (log: {child.log_path})"
            )
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        writer.close()
        return
    raise TimeoutError(f"kfeed {child.name} is not listening on {host}:{port}")


async def _stop(children: list[_Child]) -> None:
    """SIGTERM in reverse start order (ingest first, so it can flush into a live server)."""
    for child in reversed(children):
        if child.process.returncode is None:
            child.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.process.wait(), _STOP_TIMEOUT)
            except TimeoutError:
                child.process.kill()
                await child.process.wait()


@contextlib.contextmanager
def _demo_lock(data_dir: Path) -> Iterator[None]:
    """Hold ``data_dir/demo.lock`` (with our pid in it) while the demo runs; CommandError when
    another demo holds it. The OS releases the lock when its holder dies, however it dies."""
    path = data_dir / "demo.lock"
    with path.open("a+") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "?"
            raise CommandError(
                f"another kfeed demo (pid {holder}) is running on {data_dir}: stop it first, or"
                " give this one its own --data-dir and ports"
            ) from None
        lock_file.truncate(0)
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        try:
            yield
        finally:
            lock_file.truncate(0)


def _last_line(path: Path) -> str:
    """The last non-empty line of a child's log (why it stopped, usually)."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(empty log)"


class DemoCommand(CommandSettings):
    """Run sim + serve (SQLite in --data-dir) + ingest, live, until Ctrl-C."""

    data_dir: Path = Field(default=Path("data"), description="database, spool, keys and logs")
    listen: str = Field(default="127.0.0.1:50051", description="kfeed serve HOST:PORT")
    sim_listen: str = Field(default="127.0.0.1:8765", description="kfeed sim HOST:PORT")
    web_listen: str = Field(
        default="127.0.0.1:8080", description="dashboard and Connect/gRPC-Web HOST:PORT"
    )
    seed: int = Field(default=1, description="the simulator's seed")
    markets: int = Field(default=12, description="simulated markets open at once")
    tick_interval: float = Field(default=1.0, description="seconds per simulation step")
    status_interval: float = Field(default=5.0, description="seconds between status lines")

    def cli_cmd(self) -> None:
        raise SystemExit(asyncio.run(self.run()))

    async def run(self) -> int:
        console = Console(highlight=False, soft_wrap=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with _demo_lock(self.data_dir):
            self._check_ports_free()
            return await self._run(console)

    def _check_ports_free(self) -> None:
        """Fail before starting anything when a port is taken (say, by another demo)."""
        for flag, address in (
            ("--listen", self.listen),
            ("--sim-listen", self.sim_listen),
            ("--web-listen", self.web_listen),
        ):
            host, port = address.rsplit(":", 1)
            try:
                socket.create_server((host, int(port))).close()
            except OSError:
                raise CommandError(
                    f"{address} is in use (another kfeed demo or serve?): stop it, or choose"
                    f" another address with {flag}"
                ) from None

    async def _run(self, console: Console) -> int:
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        # The sim hands out the key pair (as Kalshi does) before it listens.
        private_key, public_key = self.data_dir / "demo-key.pem", self.data_dir / "demo-key.pub.pem"
        stop = StopSignals()

        children: list[_Child] = []
        starting = asyncio.create_task(self._start_all(children, logs, private_key, public_key))
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait((starting, stopped), return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()
                self._print_instructions(console, logs)
                code = await self._watch(console, children, stop)
            else:  # stopped while starting
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                code = 0
        except (RuntimeError, TimeoutError) as error:
            console.print(f"[red]demo failed to start:[/red] {error}")
            return 1
        finally:
            stopped.cancel()
            console.print("stopping ingest, server and simulator …")
            await _stop(children)
            console.print("stopped.")
        stop.raise_if_interrupted()  # Ctrl-C: `kfeed demo: interrupted`, exit 130
        return code

    async def _start_all(
        self, children: list[_Child], logs: Path, private_key: Path, public_key: Path
    ) -> None:
        """Start sim, serve and ingest in order, each once the one before it answers."""
        database = (self.data_dir / "kfeed.db").resolve()
        sim_host, sim_port = self.sim_listen.rsplit(":", 1)
        sim = await _start("sim", [
            "--listen", self.sim_listen, "--seed", str(self.seed),
            "--markets", str(self.markets), "--tick-interval", str(self.tick_interval),
            "--api-key-id", DEMO_KEY_ID, "--api-public-key-file", str(public_key),
            "--api-private-key-file", str(private_key),
        ], logs)  # fmt: skip
        children.append(sim)
        await _wait_for_port(sim_host, int(sim_port), sim)
        serve = await _start("serve", [
            "--listen", self.listen, "--database-url", f"sqlite+aiosqlite:///{database}",
            "--web-listen", self.web_listen,
        ], logs)  # fmt: skip
        children.append(serve)
        await _wait_until_serving(self.listen, serve)
        ingest = await _start("ingest", [
            "--server", self.listen, "--mode", "ws",
            "--kalshi-url", f"http://{self.sim_listen}/trade-api/v2",
            "--api-key-id", DEMO_KEY_ID, "--api-private-key-file", str(private_key),
            "--spool-dir", str(self.data_dir / "spool"),
            # Simulated markets live about a minute: look for new ones often.
            "--discovery-interval", "5",
        ], logs)  # fmt: skip
        children.append(ingest)

    def _print_instructions(self, console: Console, logs: Path) -> None:
        console.print(f"""
[bold green]kfeed demo is live[/bold green]
  simulator  http://{self.sim_listen}/trade-api/v2   (Kalshi-compatible, seed {self.seed})
  server     {self.listen}   (SQLite: {self.data_dir / "kfeed.db"})
  dashboard  http://{self.web_listen}/   (open it in a browser; built by `make web`)
  ingest     WebSocket mode, spool in {self.data_dir / "spool"}
  logs       {logs}/{{sim,serve,ingest}}.log

Watch the live feed in another terminal:
  uv run kfeed tail --server {self.listen}
  uv run kfeed markets --server {self.listen}
  uv run grpcurl -plaintext -d '{{"include_latest": true}}' {self.listen} \\
      kfeed.v1.MarketService/StreamSnapshots

Ctrl-C stops everything.
""")

    async def _watch(self, console: Console, children: list[_Child], stop: StopSignals) -> int:
        """A status line now and then from a live subscription, until stopped or a child dies."""
        received = 0
        latest: market_service_pb2.StreamSnapshotsResponse | None = None
        async with grpc.aio.insecure_channel(self.listen) as channel:
            stream = market_service_pb2_grpc.MarketServiceStub(channel).StreamSnapshots(
                market_service_pb2.StreamSnapshotsRequest()
            )

            async def count() -> None:
                nonlocal received, latest
                async for message in stream:
                    if message.HasField("snapshot"):
                        received += 1
                        latest = message

            counter = asyncio.create_task(count())
            try:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.status_interval)
                    dead = [c for c in children if c.process.returncode is not None]
                    if dead:
                        for child in dead:
                            console.print(
                                f"[red]kfeed {child.name} exited[/red]; see {child.log_path}"
                            )
                        return 1
                    if not stop.is_set():
                        console.print(self._status_line(received, latest))
                        received = 0
            finally:
                stream.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await counter
        return 0

    def _status_line(
        self, received: int, latest: market_service_pb2.StreamSnapshotsResponse | None
    ) -> str:
        line = f"live: {received} snapshots in the last {self.status_interval:g} s"
        if latest is not None:
            snapshot = latest.snapshot.snapshot
            bid = _dollars(snapshot.yes_bid) if snapshot.HasField("yes_bid") else "—"
            ask = _dollars(snapshot.yes_ask) if snapshot.HasField("yes_ask") else "—"
            line += f" — latest {snapshot.ticker} yes bid {bid} / ask {ask}"
        return line


def _dollars(amount: types_pb2.Dollars) -> str:
    return f"${Decimal(amount.ten_thousandths).scaleb(-4):.4f}"
