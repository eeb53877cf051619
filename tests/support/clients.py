"""The client tests' data (five markets, snapshots of the first), a TCP proxy that can cut
connections, and a way to run the repository's tools (node, buf, grpcurl) from async tests."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

from tests.support.factories import make_market

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
