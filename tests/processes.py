"""Helpers for tests that run `kfeed serve` as a real process: a free port, waiting for SERVING."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for processes that need it on the command line)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_until_serving(
    channel: grpc.aio.Channel,
    within: float = 30.0,
    still_running: Callable[[], None] | None = None,
) -> None:
    """Poll the server's health check until it answers SERVING; TimeoutError after ``within``
    seconds. ``still_running`` runs before every poll, to fail at once when the process died."""
    health = health_pb2_grpc.HealthStub(channel)
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        if still_running is not None:
            still_running()
        with contextlib.suppress(grpc.aio.AioRpcError):
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"never became SERVING within {within} s")
