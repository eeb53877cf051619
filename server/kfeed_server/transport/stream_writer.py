"""How the gRPC server writes server-streaming responses: bounded in time, bytes as they are.

grpc.aio writes what a servicer's generator yields and waits, unbounded, while the client does
not read; a subscriber that stops reading would hold its stream (and its place in the hub)
forever. This interceptor writes the responses itself with ``context.write``, each write bounded
by ``idle_timeout``: a subscriber that has not read for that long (once the transport's buffers,
a few MB, are full) is ended with RESOURCE_EXHAUSTED naming the setting; it resumes from the last
resume token it read.

Responses may also be ``bytes`` a servicer encoded itself (streaming of snapshots builds
responses from pre-encoded parts, see ``stream_frames``); they are sent as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import grpc

from kfeed_server.transport.errors import ResourceExhausted

Context = grpc.aio.ServicerContext[Any, Any]
StreamBehavior = Callable[[Any, Any], AsyncGenerator[Any, None]]


class SubscriberIdle(ResourceExhausted):
    def __init__(self, idle_timeout: float) -> None:
        super().__init__(
            f"the subscriber has not read for {idle_timeout:g} s (subscriber_idle_timeout); "
            "resume from the last resume_token received"
        )


def _passing_bytes_through(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    def serializer(message: Any) -> bytes:
        if type(message) is bytes:
            return message
        assert serialize is not None
        return serialize(message)

    return serializer


def _bounded_writes(behavior: StreamBehavior, idle_timeout: float) -> Callable[..., Any]:
    async def write_all(request: Any, context: Context) -> None:
        loop = asyncio.get_running_loop()
        async with contextlib.aclosing(behavior(request, context)) as responses:
            try:
                async with asyncio.timeout(None) as deadline:
                    async for response in responses:
                        deadline.reschedule(loop.time() + idle_timeout)
                        await context.write(response)
                        deadline.reschedule(None)
            except TimeoutError:
                raise SubscriberIdle(idle_timeout) from None

    return write_all


class BoundedStreamWrites(grpc.aio.ServerInterceptor):
    """Writes every server-streaming RPC's responses with a bound on how long each may wait.

    Innermost of the server's interceptors: the others then see a handler that writes for
    itself (as Health.Watch does), and the idle error is mapped to its status like any other."""

    def __init__(self, idle_timeout: float) -> None:
        self._idle_timeout = idle_timeout

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_stream is None:
            return handler
        behavior = handler.unary_stream
        if inspect.isasyncgenfunction(behavior):
            behavior = _bounded_writes(behavior, self._idle_timeout)
        return grpc.unary_stream_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=_passing_bytes_through(handler.response_serializer),
        )
