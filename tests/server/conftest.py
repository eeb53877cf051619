"""A real kfeed server on an ephemeral loopback port, on each database, and stubs to call it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from kfeed_server.app import KfeedServer, ServerConfig


@pytest.fixture
async def kfeed_server(database_url: str) -> AsyncIterator[KfeedServer]:
    server = KfeedServer(ServerConfig(listen="127.0.0.1:0", database_url=database_url))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0)


@pytest.fixture
async def channel(kfeed_server: KfeedServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{kfeed_server.port}") as open_channel:
        yield open_channel


def status_details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status the server attached to a failed call."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    raise AssertionError("the error carries no google.rpc.Status details")


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The offending field paths of an INVALID_ARGUMENT error."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    fields: list[str] = []
    for detail in status_details(error).details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields.extend(v.field for v in bad_request.field_violations)
    return fields
