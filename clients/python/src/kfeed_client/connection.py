"""Channels to a kfeed server: address, TLS (optionally mutual) and a bearer token."""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Matches the server's limit: a full page of snapshots fits with room to spare.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS settings from PEM files.

    ``ca_file`` verifies the server (the system roots when None). ``cert_file`` and ``key_file``
    together present a client certificate, for servers that require mutual TLS.
    ``server_name`` overrides the name checked against the server's certificate.
    """

    ca_file: Path | str | None = None
    cert_file: Path | str | None = None
    key_file: Path | str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS needs both)")

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials built from the files."""

        def read(path: Path | str | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


class _BearerToken:
    """Adds ``authorization: Bearer <token>`` to a call's metadata.

    Interceptors rather than call credentials because gRPC sends call credentials only over TLS,
    and a token on a plain loopback channel is a legitimate setup (local development).
    """

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._header)
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )


# One class per call kind: grpc.aio files each interceptor under the first kind it matches only.
class _UnaryUnaryBearerToken(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, _Request],
            Awaitable[grpc.aio.UnaryUnaryCall[_Request, _Response]],
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request: _Request,
    ) -> grpc.aio.UnaryUnaryCall[_Request, _Response]:
        return await continuation(self._with_token(client_call_details), request)


class _UnaryStreamBearerToken(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, _Request],
            Awaitable[grpc.aio.UnaryStreamCall[_Request, _Response]],
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request: _Request,
    ) -> grpc.aio.UnaryStreamCall[_Request, _Response]:
        return await continuation(self._with_token(client_call_details), request)


class _StreamUnaryBearerToken(_BearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, AsyncIterable[_Request] | Iterable[_Request]],
            Awaitable[grpc.aio.StreamUnaryCall[_Request, _Response]],
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[_Request] | Iterable[_Request],
    ) -> grpc.aio.StreamUnaryCall[_Request, _Response]:
        return await continuation(self._with_token(client_call_details), request_iterator)


class _StreamStreamBearerToken(_BearerToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: Callable[
            [grpc.aio.ClientCallDetails, AsyncIterable[_Request] | Iterable[_Request]],
            Awaitable[grpc.aio.StreamStreamCall[_Request, _Response]],
        ],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[_Request] | Iterable[_Request],
    ) -> grpc.aio.StreamStreamCall[_Request, _Response]:
        return await continuation(self._with_token(client_call_details), request_iterator)


def bearer_token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that send ``token`` on every kind of call."""
    kinds = (
        _UnaryUnaryBearerToken,
        _UnaryStreamBearerToken,
        _StreamUnaryBearerToken,
        _StreamStreamBearerToken,
    )
    return [kind(token) for kind in kinds]


def open_channel(
    address: str = DEFAULT_ADDRESS,
    *,
    token: str | None = None,
    tls: TlsConfig | None = None,
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address`` (HOST:PORT), with TLS and a bearer token when given."""
    options: list[tuple[str, str | int]] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    interceptors = [] if token is None else bearer_token_interceptors(token)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    if tls.server_name is not None:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(
        address, tls.credentials(), options=options, interceptors=interceptors
    )
