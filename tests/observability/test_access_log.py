"""The access log: one JSON line per RPC with method, status code, duration and request id."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kfeed.v1 import market_service_pb2, market_service_pb2_grpc
from kfeed_server.app import ServerConfig
from tests.support.servers import plaintext_channel, running_server
from tests.support.waiting import eventually


@pytest.fixture
async def stub(sqlite_url: str) -> AsyncIterator[market_service_pb2_grpc.MarketServiceAsyncStub]:
    async with (
        running_server(ServerConfig(database_url=sqlite_url)) as server,
        plaintext_channel(server) as channel,
    ):
        yield market_service_pb2_grpc.MarketServiceStub(channel)


def _access_entries(lines: list[str], request_id: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in lines]
    return [
        entry
        for entry in entries
        if entry["logger"] == "kfeed_server.access" and entry.get("request_id") == request_id
    ]


async def test_a_unary_call_logs_method_code_duration_and_request_id(
    stub: market_service_pb2_grpc.MarketServiceAsyncStub, json_log_lines: list[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetMarket(
            market_service_pb2.GetMarketRequest(ticker="NOPE"),
            metadata=(("x-request-id", "access-unary"),),
        )
    [entry] = _access_entries(json_log_lines, "access-unary")
    assert entry["level"] == "info"
    assert entry["method"] == "/kfeed.v1.MarketService/GetMarket"
    assert entry["grpc_code"] == "NOT_FOUND"
    assert 0 < entry["duration_ms"] < 10_000
    assert entry["peer"].startswith("ipv4:127.0.0.1:")


async def test_a_stream_the_client_cancels_is_logged_when_it_ends(
    stub: market_service_pb2_grpc.MarketServiceAsyncStub, json_log_lines: list[str]
) -> None:
    stream = stub.StreamSnapshots(
        market_service_pb2.StreamSnapshotsRequest(), metadata=(("x-request-id", "access-stream"),)
    )
    await stream.read()
    assert _access_entries(json_log_lines, "access-stream") == [], "logged at the end, not before"
    stream.cancel()
    await eventually(lambda: bool(_access_entries(json_log_lines, "access-stream")))
    [entry] = _access_entries(json_log_lines, "access-stream")
    assert entry["method"] == "/kfeed.v1.MarketService/StreamSnapshots"
    assert entry["grpc_code"] == "CANCELLED"


async def test_health_probes_are_logged_at_debug_only(
    sqlite_url: str, json_log_lines: list[str]
) -> None:
    async with (
        running_server(ServerConfig(database_url=sqlite_url)) as server,
        plaintext_channel(server) as channel,
    ):
        await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), metadata=(("x-request-id", "access-probe"),)
        )
    [entry] = _access_entries(json_log_lines, "access-probe")
    assert (entry["level"], entry["grpc_code"]) == ("debug", "OK")
