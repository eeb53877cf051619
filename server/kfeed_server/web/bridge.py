"""The grpc.aio servicers, served over Connect and gRPC-Web by the connectrpc runtime.

Browsers cannot speak native gRPC, so the web listener answers the same ``kfeed.v1`` RPCs over
the Connect protocol and gRPC-Web (docs/adr/0011-browser-transport.md). Nothing here is a second
API: every RPC is the servicer's own method, called with the request message the connectrpc
runtime decoded (the generated ``*_connect.py`` stubs use the same google.protobuf classes).
What the gRPC interceptors do around a call is done here the same way, from the same pieces:

- a request id (the caller's ``x-request-id`` or a new one), in the logs and the response headers;
- access control by :class:`~kfeed_server.security.AuthInterceptor` (same tokens, roles, rate
  limit — the very instance the gRPC server uses);
- :class:`~kfeed_server.transport.errors.ApiError` to the same status, code, message and
  google.rpc details; anything else to INTERNAL without internals;
- the access log line and the ``grpc_server_*`` metrics;
- bounded writes of streamed responses (:mod:`kfeed_server.web.writes`): a client that stops
  reading is ended with RESOURCE_EXHAUSTED naming ``subscriber_idle_timeout``.

The servicers never touch their ``context`` argument (they raise ApiError instead); they get a
:class:`WebCallContext` with the little of grpc.aio's context that makes sense over HTTP.
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.request import RequestContext
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import status_pb2
from protobuf.wkt import Any as ConnectAny

from kfeed_server.logs import request_id_var
from kfeed_server.observability import CallObservation
from kfeed_server.security import AuthInterceptor, as_caller
from kfeed_server.transport.caller import set_current_caller
from kfeed_server.transport.errors import ApiError, internal_status
from kfeed_server.transport.handlers import RpcType
from kfeed_server.transport.interceptors import REQUEST_ID_KEY
from kfeed_server.web.writes import raise_if_idle

log = logging.getLogger(__name__)

_CODE_BY_NUMBER: dict[int, Code] = {
    status.value[0]: Code[status.name.replace("CANCELLED", "CANCELED")]
    for status in grpc.StatusCode
    if status is not grpc.StatusCode.OK
}
_GRPC_CODE_BY_CONNECT: dict[Code, grpc.StatusCode] = {
    Code[status.name.replace("CANCELLED", "CANCELED")]: status
    for status in grpc.StatusCode
    if status is not grpc.StatusCode.OK
}
_WORD_START = re.compile(r"(?<!^)(?=[A-Z])")


def python_method_name(rpc_name: str) -> str:
    """``ListMarkets`` -> ``list_markets``: the method name protoc-gen-connectrpc generates."""
    return _WORD_START.sub("_", rpc_name).lower()


def connect_error(status: status_pb2.Status) -> ConnectError:
    """The Connect error carrying ``status``: same code, message and google.rpc details."""
    details = [
        ErrorDetail(ConnectAny(type_url=detail.type_url, value=detail.value))
        for detail in status.details
    ]
    return ConnectError(_CODE_BY_NUMBER.get(status.code, Code.UNKNOWN), status.message, details)


class WebCallContext:
    """What a servicer may ask of its call context, for a call that came in over HTTP."""

    def __init__(self, ctx: RequestContext[Any, Any]) -> None:
        self._ctx = ctx

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return tuple(self._ctx.request_headers.items())

    def peer(self) -> str:
        """gRPC's peer format (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``), so per-address
        limits and the access log treat a browser like any other client."""
        address = self._ctx.client_address
        if not address:
            return "unknown"
        host, _, port = address.rpartition(":")
        if ":" in host:
            return f"ipv6:[{host.strip('[]')}]:{port}"
        return f"ipv4:{host}:{port}"


class _Call:
    """One call's request id, admission and observation; maps its failure to a Connect error."""

    def __init__(
        self, method: str, kind: RpcType, ctx: RequestContext[Any, Any], auth: AuthInterceptor
    ) -> None:
        incoming = ctx.request_headers.get(REQUEST_ID_KEY)
        self.request_id = incoming if incoming and len(incoming) <= 128 else uuid.uuid4().hex
        request_id_var.set(self.request_id)
        ctx.response_headers[REQUEST_ID_KEY] = self.request_id
        self.method = method
        self.context = WebCallContext(ctx)
        self.observation = CallObservation(method, kind, self.context.peer())
        self._auth = auth

    def admit(self) -> None:
        principal = self._auth.admit(self.method, self.context.invocation_metadata())
        set_current_caller(None if principal is None else as_caller(principal))

    def failed(self, error: BaseException) -> BaseException:
        """Record the failed call; the exception to raise in its place."""
        if isinstance(error, ApiError):
            log.info("%s: %s %s", self.method, error.code.name, error.message)
            self.observation.finish(error.code)
            return connect_error(error.to_status())
        if isinstance(error, ConnectError):  # raised by the runtime: disconnect, timeout
            self.observation.finish(_GRPC_CODE_BY_CONNECT[error.code])
            return error
        if not isinstance(error, Exception):  # cancellation, interpreter exit
            self.observation.finish(grpc.StatusCode.CANCELLED)
            return error
        log.error("%s failed", self.method, exc_info=error)
        self.observation.finish(grpc.StatusCode.INTERNAL)
        return connect_error(internal_status(self.request_id))


class _Unimplemented(ApiError):
    code = grpc.StatusCode.UNIMPLEMENTED

    def __init__(self, method: str) -> None:
        super().__init__(f"{method} is not implemented by this server")


def _unary(
    method: str, behavior: Callable[[Any, Any], Awaitable[Any]] | None, auth: AuthInterceptor
) -> Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]]:
    async def call(request: Any, ctx: RequestContext[Any, Any]) -> Any:
        this = _Call(method, "unary", ctx, auth)
        try:
            this.admit()
            if behavior is None:
                raise _Unimplemented(method)
            response = await behavior(request, this.context)
        except BaseException as error:
            raise this.failed(error) from None
        this.observation.finish(grpc.StatusCode.OK)
        return response

    return call


def _server_stream(
    method: str,
    behavior: Callable[[Any, Any], AsyncGenerator[Any, None]] | None,
    auth: AuthInterceptor,
    response_type: type[Message],
) -> Callable[[Any, RequestContext[Any, Any]], AsyncIterator[Any]]:
    async def stream(request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
        this = _Call(method, "server_stream", ctx, auth)
        try:
            this.admit()
            if behavior is None:
                raise _Unimplemented(method)
            # aclosing: the servicer's own clean-up (its finally) runs as soon as the client goes.
            async with contextlib.aclosing(behavior(request, this.context)) as responses:
                async for response in responses:
                    # Responses a servicer encoded itself (bytes) become messages for the codecs.
                    yield (
                        response_type.FromString(response) if type(response) is bytes else response
                    )
                    raise_if_idle()
        except BaseException as error:
            raise this.failed(error) from None
        this.observation.finish(grpc.StatusCode.OK)

    return stream


def connect_service(
    servicer: object,
    generated_base: type,
    descriptor: ServiceDescriptor,
    protocol: type,
    auth: AuthInterceptor,
) -> object:
    """``servicer`` (a grpc.aio servicer, subclass of ``generated_base``) as an implementation of
    the connectrpc service ``protocol``: one delegating method per unary or server-streaming RPC.

    RPCs the servicer leaves to ``generated_base`` answer UNIMPLEMENTED, as over gRPC.
    Client-streaming RPCs are not offered: browsers cannot send request streams over HTTP/1.1.
    """
    methods: dict[str, Callable[..., Any]] = {}
    for rpc in descriptor.methods:
        if rpc.client_streaming:
            continue
        name = python_method_name(rpc.name)
        if not hasattr(protocol, name):
            raise TypeError(f"{protocol.__name__} has no {name} for {rpc.full_name}")
        methods[name] = _delegate(servicer, generated_base, rpc, auth)
    adapter = type(f"Connect{type(servicer).__name__}", (), methods)
    return adapter()


def _delegate(
    servicer: object, generated_base: type, rpc: MethodDescriptor, auth: AuthInterceptor
) -> Callable[..., Any]:
    full_method = f"/{rpc.containing_service.full_name}/{rpc.name}"
    implemented = getattr(type(servicer), rpc.name) is not getattr(generated_base, rpc.name)
    behavior = getattr(servicer, rpc.name) if implemented else None
    function = (
        _server_stream(full_method, behavior, auth, GetMessageClass(rpc.output_type))
        if rpc.server_streaming
        else _unary(full_method, behavior, auth)
    )
    # A plain function as a class attribute would be bound to the adapter: keep it static.
    return staticmethod(function)
