"""Server interceptors: a request id for every call, and one place that maps errors to statuses.

Servicers raise :class:`~kfeed_server.transport.errors.ApiError`; anything else is a bug, logged
with the request id and answered INTERNAL without internals.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.rpc import status_pb2

from kfeed_server.logs import request_id_var
from kfeed_server.transport.errors import ApiError, internal_status
from kfeed_server.transport.handlers import (
    Behavior,
    BehaviorInterceptor,
    BehaviorTransform,
    RpcType,
)

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


def _incoming_request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], status: status_pb2.Status, request_id: str
) -> None:
    await context.abort(
        grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == status.code)),
        status.message,
        trailing_metadata=(
            (REQUEST_ID_KEY, request_id),
            (_STATUS_DETAILS_KEY, status.SerializeToString()),
        ),
    )


async def _handle_failure(
    error: Exception, context: grpc.aio.ServicerContext[Any, Any], method: str, request_id: str
) -> None:
    if isinstance(error, ApiError):
        log.info("%s: %s %s", method, error.code.name, error.message)
        await _abort(context, error.to_status(), request_id)
    log.exception("%s failed", method)
    await _abort(context, internal_status(request_id), request_id)


class ErrorMappingInterceptor(BehaviorInterceptor):
    """Assigns a request id (or takes the caller's ``x-request-id``) and maps exceptions."""

    def transform_for(self, details: grpc.HandlerCallDetails) -> BehaviorTransform:
        return _error_mapped(details.method)


def _error_mapped(method: str) -> BehaviorTransform:
    def transform(behavior: Behavior, kind: RpcType) -> Behavior:
        if inspect.isasyncgenfunction(behavior):
            return _wrap_stream(behavior, method)
        # Unary calls, and streaming ones that write with context.write() (e.g. Health.Watch).
        return _wrap_unary(behavior, method)

    return transform


def _wrap_unary(behavior: UnaryBehavior, method: str) -> UnaryBehavior:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        request_id = _incoming_request_id(context)
        # Each RPC runs in its own task, so setting the context variable scopes it to the call.
        request_id_var.set(request_id)
        try:
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # every failure gets a status; see _handle_failure
            await _handle_failure(error, context, method, request_id)

    return unary


def _wrap_stream(behavior: StreamBehavior, method: str) -> StreamBehavior:
    async def stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        request_id = _incoming_request_id(context)
        request_id_var.set(request_id)
        try:
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # every failure gets a status; see _handle_failure
            await _handle_failure(error, context, method, request_id)

    return stream
