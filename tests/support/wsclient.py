"""A tiny signed WebSocket test client for the simulator."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import websockets
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import ClientConnection

from tests.support.sim import signed_headers


class SimSocket:
    """Sends commands and reads frames with a timeout, so a missing frame fails fast."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self._next_id = 0

    async def command(self, cmd: str, **params: Any) -> int:
        """Send a command with the next id; returns the id."""
        self._next_id += 1
        await self.connection.send(json.dumps({"id": self._next_id, "cmd": cmd, "params": params}))
        return self._next_id

    async def frame(self, wait: float = 2.0) -> dict[str, Any]:
        """The next frame, or TimeoutError after ``wait`` seconds."""
        async with asyncio.timeout(wait):
            frame: dict[str, Any] = json.loads(await self.connection.recv())
        return frame

    async def frames_until_quiet(self, quiet: float = 0.2) -> list[dict[str, Any]]:
        """Every frame until none arrives for ``quiet`` seconds."""
        frames: list[dict[str, Any]] = []
        while True:
            try:
                frames.append(await self.frame(quiet))
            except TimeoutError:
                return frames


@asynccontextmanager
async def sim_socket(ws_url: str, private_key: rsa.RSAPrivateKey) -> AsyncIterator[SimSocket]:
    """A signed connection to the simulator's WebSocket."""
    headers = signed_headers(private_key, "GET", "/trade-api/ws/v2")
    async with websockets.connect(ws_url, additional_headers=headers) as connection:
        yield SimSocket(connection)
