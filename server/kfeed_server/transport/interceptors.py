"""Server interceptors: a request id for every call, and one place that maps errors to statuses.

Servicers raise :class:`~kfeed_server.transport.errors.ApiError`; anything else is a bug, logged
with the request id and answered INTERNAL without internals. A request body that does not parse
is INVALID_ARGUMENT: grpc.aio parses it before any interceptor code runs and would answer
UNKNOWN with the parser's exception text, so the deserialiser is wrapped to hand the behaviour
an :class:`UndecodableRequest` instead.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import status_pb2

from kfeed_server.db.engine import StorageUnavailable
from kfeed_server.logs import request_id_var
from kfeed_server.transport.errors import (
    ApiError,
    InvalidArgument,
    Unavailable,
    Unimplemented,
    internal_status,
)
from kfeed_server.transport.handlers import (
    Behavior,
    BehaviorInterceptor,
    BehaviorTransform,
    Deserializer,
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
    if isinstance(error, NotImplementedError):
        # A contract RPC not built yet: the generated base class raises this (for a streaming
        # RPC before grpc can answer UNIMPLEMENTED itself).
        error = Unimplemented(f"{method} is not implemented by this server")
    if isinstance(error, StorageUnavailable):
        log.warning("%s: the database is unavailable (%s)", method, error)
        error = Unavailable("the database is unavailable right now: try again")
    if isinstance(error, ApiError):
        log.info("%s: %s %s", method, error.code.name, error.message)
        await _abort(context, error.to_status(), request_id)
    log.exception("%s failed", method)
    await _abort(context, internal_status(request_id), request_id)


@dataclass(frozen=True, slots=True)
class UndecodableRequest:
    """What the behaviour gets in place of a request body that is not a valid message."""


_UNDECODABLE = UndecodableRequest()


def _undecodable() -> InvalidArgument:
    return InvalidArgument.field("request", "is not a valid message of this method's request type")


def _tolerant(deserializer: Deserializer) -> Deserializer:
    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:  # any parser failure: the behaviour answers INVALID_ARGUMENT
            return _UNDECODABLE

    return deserialize


async def _checked_requests(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A client stream's requests; INVALID_ARGUMENT at the first that did not parse."""
    async for request in requests:
        if request is _UNDECODABLE:
            raise _undecodable()
        yield request


def _checked_request(request: Any, kind: RpcType) -> Any:
    """The request (or request iterator) of a call of ``kind``, checked for undecodable bodies."""
    if kind in ("client_stream", "bidi_stream"):
        return _checked_requests(request)
    if request is _UNDECODABLE:
        raise _undecodable()
    return request


class ErrorMappingInterceptor(BehaviorInterceptor):
    """Assigns a request id (or takes the caller's ``x-request-id``) and maps exceptions."""

    def transform_for(self, details: grpc.HandlerCallDetails) -> BehaviorTransform:
        return _error_mapped(details.method)

    def request_deserializer_for(
        self, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> Deserializer | None:
        deserializer = handler.request_deserializer
        return None if deserializer is None else _tolerant(deserializer)


def _error_mapped(method: str) -> BehaviorTransform:
    def transform(behavior: Behavior, kind: RpcType) -> Behavior:
        if inspect.isasyncgenfunction(behavior):
            return _wrap_stream(behavior, method, kind)
        # Unary calls, and streaming ones that write with context.write() (e.g. Health.Watch).
        return _wrap_unary(behavior, method, kind)

    return transform


def _wrap_unary(behavior: UnaryBehavior, method: str, kind: RpcType) -> UnaryBehavior:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        request_id = _incoming_request_id(context)
        # Each RPC runs in its own task, so setting the context variable scopes it to the call.
        request_id_var.set(request_id)
        try:
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            return await behavior(_checked_request(request, kind), context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # every failure gets a status; see _handle_failure
            await _handle_failure(error, context, method, request_id)

    return unary


def _wrap_stream(behavior: StreamBehavior, method: str, kind: RpcType) -> StreamBehavior:
    async def stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        request_id = _incoming_request_id(context)
        request_id_var.set(request_id)
        try:
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            async for response in behavior(_checked_request(request, kind), context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # every failure gets a status; see _handle_failure
            await _handle_failure(error, context, method, request_id)

    return stream
