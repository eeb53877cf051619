"""A real kfeed server (SQLite only: these tests are about the clients, not the database),
a publisher to feed it, a TCP proxy that can cut connections, and the repository's tools."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from kfeed_server.app import KfeedServer
from tests.factories import make_market, make_snapshot, make_trade
from tests.server.conftest import PublishSession, channel, kfeed_server, publisher

__all__ = ["channel", "kfeed_server", "publisher"]

ROOT = Path(__file__).resolve().parents[2]
NODE_BIN = ROOT / "node_modules" / ".bin"

MARKETS = [make_market(f"KXCLIENT-{letter}") for letter in "ABCDE"]
TICKER = MARKETS[0].ticker
SNAPSHOT_COUNT = 7


async def run_command(
    *command: str | Path, cwd: Path, env: Mapping[str, str] | None = None, check: bool = True
) -> str:
    """Run a program without blocking the event loop (the server lives in it); its stdout.

    With ``check`` it fails, showing stderr, when the program exits non-zero. It is killed
    after two minutes.
    """
    process = await asyncio.create_subprocess_exec(
        *map(str, command),
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert not check or process.returncode == 0, (
        f"{command} failed:\n{stdout.decode()}{stderr.decode()}"
    )
    return stdout.decode()


@pytest.fixture
async def database_url(tmp_path: Path, sqlite_template: Path) -> str:
    """Overrides the suite's SQLite+PostgreSQL parametrisation with SQLite alone."""
    database = tmp_path / "kfeed-clients.db"
    shutil.copyfile(sqlite_template, database)
    return f"sqlite+aiosqlite:///{database}"


@pytest.fixture
def address(kfeed_server: KfeedServer) -> str:
    """HOST:PORT of the running server."""
    return f"127.0.0.1:{kfeed_server.port}"


@pytest.fixture
async def seeded(publisher: PublishSession) -> PublishSession:
    """Five markets; seven snapshots and three trades of the first (``TICKER``)."""
    await publisher.publish(
        markets=MARKETS,
        snapshots=[make_snapshot(TICKER, i) for i in range(SNAPSHOT_COUNT)],
        trades=[make_trade(TICKER, i) for i in range(3)],
    )
    return publisher


class TcpProxy:
    """Forwards loopback TCP connections to a target; :meth:`sever` cuts all current ones.

    Cutting the TCP connection under a live gRPC stream is a real disconnect as a client sees
    it, while the server (and its data) stays up, so a test controls exactly what happens
    while the client is away.
    """

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self._target_port
        )
        self._writers.update((writer, upstream_writer))
        await asyncio.gather(
            self._pump(reader, upstream_writer),
            self._pump(upstream_reader, writer),
            return_exceptions=True,
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            self._writers.discard(writer)

    def sever(self) -> None:
        """Abort every open connection (RST, no goodbye), as a network failure would."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def proxy(kfeed_server: KfeedServer) -> AsyncIterator[TcpProxy]:
    """A :class:`TcpProxy` in front of the server."""
    tcp_proxy = TcpProxy(kfeed_server.port)
    await tcp_proxy.start()
    try:
        yield tcp_proxy
    finally:
        await tcp_proxy.stop()
