"""Waiting for effects: one polling helper, and readiness checks built on it.

Prefer awaiting an event; poll only for state that nothing announces (another process's health,
a counter another task bumps). A test never sleeps and then asserts that nothing happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

POLL_INTERVAL = 0.02


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    within: float = 10.0,
    *,
    what: str = "the condition",
    interval: float = POLL_INTERVAL,
) -> None:
    """Wait until ``condition()`` (plain or awaitable) holds; TimeoutError naming ``what`` after
    ``within`` seconds. An exception from ``condition`` fails at once (it may be an assertion
    that a watched process is still running)."""
    try:
        async with asyncio.timeout(within):
            while True:
                outcome = condition()
                if await outcome if inspect.isawaitable(outcome) else outcome:
                    return
                await asyncio.sleep(interval)
    except TimeoutError:
        raise TimeoutError(f"{what} did not hold within {within} s") from None


async def wait_until_serving(
    channel: grpc.aio.Channel,
    within: float = 30.0,
    still_running: Callable[[], None] | None = None,
) -> None:
    """Until the server's health check answers SERVING; TimeoutError after ``within`` seconds.
    ``still_running`` runs before every poll, to fail at once when the process died."""
    health = health_pb2_grpc.HealthStub(channel)

    async def serving() -> bool:
        if still_running is not None:
            still_running()
        with contextlib.suppress(grpc.aio.AioRpcError):
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        return False

    await eventually(serving, within, what="SERVING", interval=0.1)


async def wait_until_answering(
    url: str, within: float = 30.0, still_running: Callable[[], None] | None = None
) -> None:
    """Until ``url`` answers an HTTP GET with a status below 500."""
    async with httpx.AsyncClient() as client:

        async def answering() -> bool:
            if still_running is not None:
                still_running()
            with contextlib.suppress(httpx.TransportError):
                return (await client.get(url)).status_code < 500
            return False

        await eventually(answering, within, what=f"{url} answering", interval=0.1)
