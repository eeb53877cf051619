"""Rebuilding a gRPC method handler around a new behaviour, for every kind of RPC.

Interceptors that act per call (error mapping, metrics, auth) wrap the handler's behaviour; this
keeps the four ``grpc.*_rpc_method_handler`` constructors, and the interceptor plumbing, in one
place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

import grpc

RpcType = Literal["unary", "server_stream", "client_stream", "bidi_stream"]
# A grpc.aio behaviour: a coroutine function or an async generator function of
# (request or request iterator, context). The stubs describe only sync ones, hence Any.
Behavior = Callable[[Any, Any], Any]
BehaviorTransform = Callable[[Behavior, RpcType], Behavior]

_CONSTRUCTORS: tuple[tuple[str, RpcType, Callable[..., grpc.RpcMethodHandler[Any, Any]]], ...] = (
    ("unary_unary", "unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", "server_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", "client_stream", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", "bidi_stream", grpc.stream_stream_rpc_method_handler),
)


Deserializer = Callable[[bytes], Any]


def with_behavior(
    handler: grpc.RpcMethodHandler[Any, Any],
    transform: BehaviorTransform,
    request_deserializer: Deserializer | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind and (de)serialisers whose behaviour is
    ``transform(old behaviour, kind)`` (and whose request deserialiser is
    ``request_deserializer`` when given)."""
    for attribute, kind, constructor in _CONSTRUCTORS:
        behavior = getattr(handler, attribute)
        if behavior is not None:
            return constructor(
                transform(behavior, kind),
                request_deserializer=request_deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class BehaviorInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that rebuilds each call's handler with :meth:`transform_for`."""

    def transform_for(self, details: grpc.HandlerCallDetails) -> BehaviorTransform | None:
        """How to wrap the behaviour of the call ``details`` names (None: leave it as it is)."""
        raise NotImplementedError

    def request_deserializer_for(
        self, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> Deserializer | None:
        """A replacement for ``handler``'s request deserialiser (None: keep it)."""
        return None

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        transform = self.transform_for(handler_call_details)
        deserializer = self.request_deserializer_for(handler)
        if transform is None and deserializer is None:
            return handler
        return with_behavior(handler, transform or _unchanged, deserializer)


def _unchanged(behavior: Behavior, kind: RpcType) -> Behavior:
    return behavior
