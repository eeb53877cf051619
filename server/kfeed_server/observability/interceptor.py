"""Per-call metrics and the access log: one line per RPC with method, status, duration and
request id.

Placed right inside :class:`~kfeed_server.transport.interceptors.ErrorMappingInterceptor`, so the
request id is already set and an :class:`~kfeed_server.transport.errors.ApiError` (including an
auth refusal) still carries the code the caller will see.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from kfeed_server.observability.metrics import (
    GRPC_HANDLED,
    GRPC_HANDLING_SECONDS,
    GRPC_STARTED,
)
from kfeed_server.security.policy import split_method
from kfeed_server.transport.errors import ApiError
from kfeed_server.transport.handlers import (
    Behavior,
    BehaviorInterceptor,
    BehaviorTransform,
    RpcType,
)

access_log = logging.getLogger("kfeed_server.access")

# Probes call these every few seconds; their lines would drown the rest at INFO.
_QUIET_SERVICES = frozenset({"grpc.health.v1.Health"})


def status_code_of(
    error: BaseException | None, context: grpc.aio.ServicerContext[Any, Any]
) -> grpc.StatusCode:
    """The status code the caller receives for a call that ended with ``error`` (None: returned)."""
    if isinstance(error, ApiError):
        return error.code
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    if error is None or isinstance(error, grpc.aio.AbortError):
        # Set by context.abort() or context.set_code(); None means the default, OK.
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
    # The error-mapping interceptor answers every other exception with INTERNAL.
    return grpc.StatusCode.INTERNAL


class CallObservation:
    """One RPC from start to status: started counter now, handled + latency + log at the end.

    Transport-neutral: the gRPC interceptor below and the web (Connect) listener both use it, so
    a call counts and logs the same whichever way it came in.
    """

    def __init__(self, method: str, kind: RpcType, peer: str) -> None:
        self.method = method
        self.peer = peer
        service, name = split_method(method)
        self.labels = (kind, service, name)
        self.quiet = service in _QUIET_SERVICES
        self.started = time.perf_counter()
        GRPC_STARTED.labels(*self.labels).inc()

    def finish(self, code: grpc.StatusCode) -> None:
        duration = time.perf_counter() - self.started
        GRPC_HANDLED.labels(*self.labels, code.name).inc()
        GRPC_HANDLING_SECONDS.labels(*self.labels).observe(duration)
        access_log.log(
            logging.DEBUG if self.quiet else logging.INFO,
            "%s %s %.1f ms",
            self.method,
            code.name,
            duration * 1000,
            extra={
                "fields": {
                    "method": self.method,
                    "grpc_code": code.name,
                    "duration_ms": round(duration * 1000, 3),
                    "peer": self.peer,
                }
            },
        )


def _observe(
    method: str, kind: RpcType, context: grpc.aio.ServicerContext[Any, Any]
) -> CallObservation:
    # The peer is read now: grpc's C core can crash (SIGSEGV) on context.peer() once a stream
    # is over.
    return CallObservation(method, kind, context.peer())


def _observed(method: str) -> BehaviorTransform:
    def transform(behavior: Behavior, kind: RpcType) -> Behavior:
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                observation = _observe(method, kind, context)
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as error:
                    observation.finish(status_code_of(error, context))
                    raise
                observation.finish(status_code_of(None, context))

            return stream

        async def call(request: Any, context: Any) -> Any:
            observation = _observe(method, kind, context)
            try:
                response = await behavior(request, context)
            except BaseException as error:
                observation.finish(status_code_of(error, context))
                raise
            observation.finish(status_code_of(None, context))
            return response

        return call

    return transform


class ObservabilityInterceptor(BehaviorInterceptor):
    """Counts, times and access-logs every RPC (see the module docstring for its place)."""

    def transform_for(self, details: grpc.HandlerCallDetails) -> BehaviorTransform:
        return _observed(details.method)
