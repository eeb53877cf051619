"""A real server with a tokens file: who gets in, who is refused and how, what the logs show."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kfeed.v1 import (
    backtest_service_pb2,
    backtest_service_pb2_grpc,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    market_service_pb2,
    market_service_pb2_grpc,
)
from kfeed_server.app import ServerConfig
from kfeed_server.security import SecurityConfig
from kfeed_server.transport.convert import market_to_proto
from tests.support.factories import make_market
from tests.support.security import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    READ_TOKEN,
    bearer,
    write_tokens_file,
)
from tests.support.servers import plaintext_channel, running_server

Code = grpc.StatusCode


@pytest.fixture
async def channel(sqlite_url: str, tmp_path: Path) -> AsyncIterator[grpc.aio.Channel]:
    security = SecurityConfig(auth_tokens_file=write_tokens_file(tmp_path))
    config = ServerConfig(database_url=sqlite_url, security=security)
    async with running_server(config) as server, plaintext_channel(server) as open_channel:
        yield open_channel


async def _code(call: Awaitable[Any]) -> Code:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return Code.OK


def _get_market(channel: grpc.aio.Channel, token: str | None) -> Awaitable[Any]:
    stub = market_service_pb2_grpc.MarketServiceStub(channel)
    metadata = bearer(token) if token else None
    return stub.GetMarket(market_service_pb2.GetMarketRequest(ticker="NOPE"), metadata=metadata)


async def _publish_one_market(channel: grpc.aio.Channel, token: str | None) -> Code:
    stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
    call = stub.Publish(metadata=bearer(token) if token else None)
    request = ingest_service_pb2.PublishRequest(
        batch_id=1, producer="auth-test", markets=[market_to_proto(make_market("AUTH-1"))]
    )
    try:
        await call.write(request)
        ack = await call.read()
        await call.done_writing()
        assert isinstance(ack, ingest_service_pb2.PublishResponse)
        assert ack.code == 0, ack
    except grpc.aio.AioRpcError as error:
        return error.code()
    return Code.OK


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, Code.UNAUTHENTICATED),
        ("not-a-configured-token-at-all", Code.UNAUTHENTICATED),
        (INGEST_TOKEN, Code.PERMISSION_DENIED),
        # NOT_FOUND: the call got through to the servicer, which has no market NOPE.
        (READ_TOKEN, Code.NOT_FOUND),
        (ADMIN_TOKEN, Code.NOT_FOUND),
    ],
)
async def test_market_service_needs_the_read_role(
    channel: grpc.aio.Channel, token: str | None, expected: Code
) -> None:
    assert await _code(_get_market(channel, token)) == expected


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, Code.UNAUTHENTICATED),
        (READ_TOKEN, Code.PERMISSION_DENIED),
        (INGEST_TOKEN, Code.OK),
        (ADMIN_TOKEN, Code.OK),
    ],
)
async def test_publish_needs_the_ingest_role(
    channel: grpc.aio.Channel, token: str | None, expected: Code
) -> None:
    assert await _publish_one_market(channel, token) == expected


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, Code.UNAUTHENTICATED),
        (READ_TOKEN, Code.OK),
        # a starting ingest reads the gaps an earlier one left open, to repair them
        (INGEST_TOKEN, Code.OK),
        (ADMIN_TOKEN, Code.OK),
    ],
)
async def test_feed_gaps_are_open_to_readers_and_ingest(
    channel: grpc.aio.Channel, token: str | None, expected: Code
) -> None:
    stub = market_service_pb2_grpc.MarketServiceStub(channel)
    request = market_service_pb2.ListFeedGapsRequest()
    metadata = bearer(token) if token is not None else None
    assert await _code(stub.ListFeedGaps(request, metadata=metadata)) == expected


async def test_a_server_stream_is_refused_before_it_starts(channel: grpc.aio.Channel) -> None:
    stub = market_service_pb2_grpc.MarketServiceStub(channel)
    stream = stub.StreamSnapshots(market_service_pb2.StreamSnapshotsRequest())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stream.read()
    assert refused.value.code() == Code.UNAUTHENTICATED


async def test_backtest_service_is_open_to_readers(channel: grpc.aio.Channel) -> None:
    stub = backtest_service_pb2_grpc.BacktestServiceStub(channel)
    request = backtest_service_pb2.ListStrategiesRequest()
    assert await _code(stub.ListStrategies(request)) == Code.UNAUTHENTICATED
    reader_outcome = await _code(stub.ListStrategies(request, metadata=bearer(READ_TOKEN)))
    assert reader_outcome not in (Code.UNAUTHENTICATED, Code.PERMISSION_DENIED)


async def test_health_and_reflection_need_no_token(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    response = await health.Check(health_pb2.HealthCheckRequest())
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    async for answer in reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    ):
        names = {service.name for service in answer.list_services_response.service}
        assert "kfeed.v1.MarketService" in names


async def test_a_refusal_carries_the_request_id(channel: grpc.aio.Channel) -> None:
    stub = market_service_pb2_grpc.MarketServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListMarkets(
            market_service_pb2.ListMarketsRequest(), metadata=(("x-request-id", "req-auth-1"),)
        )
    assert refused.value.code() == Code.UNAUTHENTICATED
    assert ("x-request-id", "req-auth-1") in tuple(refused.value.trailing_metadata() or ())


async def test_tokens_never_reach_the_logs(
    sqlite_url: str, tmp_path: Path, json_log_lines: list[str]
) -> None:
    wrong_token = "wrong-token-fedcba9876543210"
    security = SecurityConfig(auth_tokens_file=write_tokens_file(tmp_path))
    async with (
        running_server(ServerConfig(database_url=sqlite_url, security=security)) as server,
        plaintext_channel(server) as channel,
    ):
        for token in (READ_TOKEN, INGEST_TOKEN, ADMIN_TOKEN, wrong_token):
            await _code(_get_market(channel, token))
            await _publish_one_market(channel, token)
    access = [json.loads(line) for line in json_log_lines if '"kfeed_server.access"' in line]
    assert len(access) >= 8, "every call left an access line"
    assert {entry["grpc_code"] for entry in access} >= {
        "OK",
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
    }
    text = "\n".join(json_log_lines)
    for secret in (READ_TOKEN, INGEST_TOKEN, ADMIN_TOKEN, wrong_token):
        assert secret not in text
