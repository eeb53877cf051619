"""Fixtures of the backtest tests: a real kfeed server whose backtest pool reports often, a
stub and a publisher on it, and recorded data (tests/support/backtest_service.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from kfeed.v1 import backtest_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.records import MarketResult, SnapshotRecord
from tests.support.backtest_service import (
    OTHER_TICKER,
    TEST_RUNNER,
    TICKER,
    publish_snapshots,
    settled_market,
    wave_snapshots,
)
from tests.support.factories import make_market
from tests.support.servers import PublishSession, serving


@pytest.fixture
async def backtest_server(database_url: str) -> AsyncIterator[KfeedServer]:
    """A server whose backtest pool reports often (see TEST_RUNNER)."""
    config = ServerConfig(listen="127.0.0.1:0", database_url=database_url, backtest=TEST_RUNNER)
    async with serving(config) as server:
        yield server


@pytest.fixture
async def backtest_channel(backtest_server: KfeedServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{backtest_server.port}") as channel:
        yield channel


@pytest.fixture
def stub(backtest_channel: grpc.aio.Channel) -> pb_grpc.BacktestServiceAsyncStub:
    return pb_grpc.BacktestServiceStub(backtest_channel)


@pytest.fixture
async def publisher(backtest_channel: grpc.aio.Channel) -> AsyncIterator[PublishSession]:
    async with PublishSession(backtest_channel) as session:
        yield session


@pytest.fixture
async def recorded(publisher: PublishSession) -> list[SnapshotRecord]:
    """Two markets (A settles NO after the data, B stays open) with 600 snapshots each,
    interleaved in time."""
    await publisher.publish(
        markets=[settled_market(TICKER, MarketResult.NO, 3_000), make_market(OTHER_TICKER)]
    )
    snapshots = wave_snapshots(TICKER, 600) + wave_snapshots(OTHER_TICKER, 600)
    await publish_snapshots(publisher, snapshots)
    return snapshots
