"""Bounded response writes on the web listener, as the gRPC server bounds its own (stream_writer).

uvicorn waits, unbounded, for a client to read once the connection's write buffer is above its
high-water mark (asyncio's 64 KiB, plus what the kernel buffers): a browser that stops reading a
stream would hold it, and its place in the hub, forever. :class:`BoundedWrites` wraps the
connectrpc applications' ``send`` so each write may wait at most ``idle_timeout``:

- a stream message that could not be written in time is dropped (uvicorn waits *before* it
  writes, so nothing of it went out) and the bridge ends the stream with RESOURCE_EXHAUSTED
  naming ``subscriber_idle_timeout`` (:func:`raise_if_idle`); the client reads that status when
  it reads again, and resumes from the last resume token it received;
- a last write (the status, or a unary response) that still cannot go out in time abandons the
  connection, which uvicorn then closes.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kfeed_server.transport.stream_writer import SubscriberIdle

log = logging.getLogger(__name__)

# uvicorn's words for a response its application left unfinished (logged at ERROR).
_UNFINISHED = "ASGI callable returned without completing response."


@dataclass(slots=True)
class _Writes:
    idle_timeout: float
    # A stream message was dropped: the stream must end now.
    idle: bool = False
    # The last write was dropped too: the connection is left for uvicorn to close.
    abandoned: bool = False


_current: contextvars.ContextVar[_Writes | None] = contextvars.ContextVar(
    "kfeed_web_writes", default=None
)


class _Abandoned(Exception):
    """The client read nothing for two idle timeouts, not even the stream's status."""


def raise_if_idle() -> None:
    """In a streaming handler, after each response: end the stream if its client stopped
    reading (SubscriberIdle, mapped to RESOURCE_EXHAUSTED like any ApiError)."""
    writes = _current.get()
    if writes is not None and writes.idle:
        raise SubscriberIdle(writes.idle_timeout)


class BoundedWrites:
    """ASGI middleware around a connectrpc application: every write bounded by ``idle_timeout``."""

    def __init__(self, app: ASGIApp, idle_timeout: float) -> None:
        self._app = app
        self._idle_timeout = idle_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        # Set in the request's own task: the handler (the bridge) runs in it and reads it.
        writes = _Writes(self._idle_timeout)
        _current.set(writes)

        async def bounded_send(message: Message) -> None:
            try:
                async with asyncio.timeout(writes.idle_timeout):
                    await send(message)
            except TimeoutError:
                if message["type"] == "http.response.body" and message.get("more_body"):
                    writes.idle = True
                    return
                raise _Abandoned from None

        try:
            await self._app(scope, receive, bounded_send)
        except _Abandoned:
            writes.abandoned = True
            log.info(
                "%s: the client read nothing for %g s; connection dropped",
                scope["path"],
                2 * writes.idle_timeout,
            )


class _QuietAbandoned(logging.Filter):
    """Drops uvicorn's error for a response :class:`BoundedWrites` left unfinished on purpose
    (logged in the same request task, after the application returned)."""

    def filter(self, record: logging.LogRecord) -> bool:
        writes = _current.get()
        return not (writes is not None and writes.abandoned and record.msg == _UNFINISHED)


logging.getLogger("uvicorn.error").addFilter(_QuietAbandoned())
