"""The per-token rate limit on a real server: RESOURCE_EXHAUSTED with RetryInfo, per token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kfeed.v1 import market_service_pb2, market_service_pb2_grpc
from kfeed_server.app import ServerConfig
from kfeed_server.security import SecurityConfig
from tests.support.security import (
    ADMIN_TOKEN,
    READ_TOKEN,
    bearer,
    write_tokens_file,
)
from tests.support.servers import plaintext_channel, running_server, status_details

BURST = 3


@pytest.fixture
async def channel(sqlite_url: str, tmp_path: Path) -> AsyncIterator[grpc.aio.Channel]:
    # A slow refill, so the burst cannot be topped up while the test runs.
    security = SecurityConfig(
        auth_tokens_file=write_tokens_file(tmp_path), rate_limit=0.1, rate_limit_burst=BURST
    )
    config = ServerConfig(database_url=sqlite_url, security=security)
    async with running_server(config) as server, plaintext_channel(server) as open_channel:
        yield open_channel


async def _list_markets(channel: grpc.aio.Channel, token: str) -> None:
    stub = market_service_pb2_grpc.MarketServiceStub(channel)
    await stub.ListMarkets(market_service_pb2.ListMarketsRequest(), metadata=bearer(token))


async def test_calls_beyond_the_burst_are_refused_with_retry_info(
    channel: grpc.aio.Channel,
) -> None:
    for _ in range(BURST):
        await _list_markets(channel, READ_TOKEN)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _list_markets(channel, READ_TOKEN)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in status_details(refused.value).details)
    # One token every 10 s: the next one is due in (almost) 10 s.
    assert 9_000 < retry.retry_delay.ToMilliseconds() <= 10_000


async def test_one_token_exhausted_leaves_others_and_health_alone(
    channel: grpc.aio.Channel,
) -> None:
    for _ in range(BURST):
        await _list_markets(channel, READ_TOKEN)
    await _list_markets(channel, ADMIN_TOKEN)
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(BURST + 1):
        await health.Check(health_pb2.HealthCheckRequest())
