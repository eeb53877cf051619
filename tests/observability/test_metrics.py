"""The Prometheus endpoint of a real server, scraped over HTTP while the server works.

Metrics live in the process-wide registry, so every assertion compares a scrape taken before
the action with one taken after it.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kfeed.v1 import ingest_service_pb2, market_service_pb2, market_service_pb2_grpc
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.observability import MetricsEndpoint, running_backtest
from kfeed_server.streaming.hub import MarketSelector
from tests.support.factories import make_gap, make_market, make_snapshot
from tests.support.servers import PublishSession, plaintext_channel, running_server
from tests.support.waiting import eventually

Sample = tuple[str, frozenset[tuple[str, str]]]


@pytest.fixture
async def server(sqlite_url: str) -> AsyncIterator[KfeedServer]:
    config = ServerConfig(database_url=sqlite_url, metrics_listen="127.0.0.1:0")
    async with running_server(config) as running:
        yield running


@pytest.fixture
async def channel(server: KfeedServer) -> AsyncIterator[grpc.aio.Channel]:
    async with plaintext_channel(server) as open_channel:
        yield open_channel


class Scrape:
    """One scrape of ``/metrics`` over HTTP, indexed by sample name and labels."""

    def __init__(self, text: str) -> None:
        self.samples: dict[Sample, float] = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        return self.samples.get((name, frozenset((labels or {}).items())), 0.0)


async def scrape(server: KfeedServer) -> Scrape:
    assert server.metrics_endpoint is not None
    url = f"http://127.0.0.1:{server.metrics_endpoint.port}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    return Scrape(await asyncio.to_thread(fetch))


def _rpc(method: str, **labels: str) -> dict[str, str]:
    return {
        "grpc_service": "kfeed.v1.MarketService",
        "grpc_method": method,
        "grpc_type": "unary",
        **labels,
    }


async def test_calls_are_counted_by_method_and_status_and_timed(
    server: KfeedServer, channel: grpc.aio.Channel
) -> None:
    stub = market_service_pb2_grpc.MarketServiceStub(channel)
    before = await scrape(server)
    for _ in range(2):
        await stub.ListMarkets(market_service_pb2.ListMarketsRequest())
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetMarket(market_service_pb2.GetMarketRequest(ticker="NOPE"))
    after = await scrape(server)

    def delta(name: str, labels: dict[str, str]) -> float:
        return after.value(name, labels) - before.value(name, labels)

    assert delta("grpc_server_started_total", _rpc("ListMarkets")) == 2
    assert delta("grpc_server_handled_total", _rpc("ListMarkets", grpc_code="OK")) == 2
    assert delta("grpc_server_handled_total", _rpc("GetMarket", grpc_code="NOT_FOUND")) == 1
    assert delta("grpc_server_handling_seconds_count", _rpc("ListMarkets")) == 2
    assert delta("grpc_server_handling_seconds_sum", _rpc("ListMarkets")) > 0


async def test_ingest_outcomes_lag_snapshots_and_feed_gaps(
    server: KfeedServer, channel: grpc.aio.Channel
) -> None:
    session = PublishSession(channel)
    received = datetime.now(UTC) - timedelta(seconds=2)
    before = await scrape(server)
    stored = await session.publish(
        markets=[make_market("LAG-1")],
        snapshots=[make_snapshot("LAG-1", 1, receive_time=received)],
        gaps=[make_gap(1)],
    )
    row_refused = await session.publish(snapshots=[make_snapshot("UNKNOWN-MARKET", 1)])
    # Columns of different lengths: the batch is refused whole.
    whole = ingest_service_pb2.PublishRequest(batch_id=99)
    whole.snapshot_columns.ticker_index.append(0)
    refused = await session.send(whole)
    await session.close()
    after = await scrape(server)
    assert (stored.code, row_refused.code, refused.code) == (0, 0, 3)
    assert len(row_refused.refused_rows) == 1

    def delta(name: str, labels: dict[str, str] | None = None) -> float:
        return after.value(name, labels) - before.value(name, labels)

    assert delta("kfeed_ingest_batches_total", {"outcome": "stored"}) == 2
    assert delta("kfeed_ingest_batches_total", {"outcome": "refused"}) == 1
    assert delta("kfeed_ingest_rows_refused_total", {"field": "snapshots"}) == 1
    assert delta("kfeed_snapshots_stored_total") == 1
    assert delta("kfeed_feed_gaps_total", {"recovered": "false"}) == 1
    assert delta("kfeed_ingest_lag_seconds_count") == 1
    assert 2 <= delta("kfeed_ingest_lag_seconds_sum") < 60


async def test_live_subscribers_are_counted_while_their_stream_is_open(
    server: KfeedServer, channel: grpc.aio.Channel
) -> None:
    stub = market_service_pb2_grpc.MarketServiceStub(channel)
    stream = stub.StreamSnapshots(market_service_pb2.StreamSnapshotsRequest())
    first = await stream.read()
    assert isinstance(first, market_service_pb2.StreamSnapshotsResponse)
    assert first.HasField("caught_up")
    assert (await scrape(server)).value("kfeed_stream_subscribers") == 1
    stream.cancel()

    async def unsubscribed() -> bool:
        return (await scrape(server)).value("kfeed_stream_subscribers") == 0

    await eventually(unsubscribed)


async def test_queue_depths_show_a_subscriber_falling_behind(server: KfeedServer) -> None:
    idle = server.hub.subscribe(MarketSelector())
    behind = server.hub.subscribe(MarketSelector())
    server.hub.publish([make_snapshot("DEPTH-1", i) for i in range(5)], [])
    idle.take_all()
    metrics = await scrape(server)
    assert metrics.value("kfeed_stream_subscribers") == 2
    assert metrics.value("kfeed_stream_queued_items") == 5
    assert metrics.value("kfeed_stream_queue_depth_max") == 5
    server.hub.unsubscribe(idle)
    server.hub.unsubscribe(behind)
    assert (await scrape(server)).value("kfeed_stream_queued_items") == 0


async def test_an_overflowed_queue_still_shows_the_depth_it_reached(server: KfeedServer) -> None:
    overflowing = server.hub.subscribe(MarketSelector(), capacity=3)
    server.hub.publish([make_snapshot("DEPTH-2", i) for i in range(5)], [])
    assert overflowing.overflowed
    metrics = await scrape(server)
    assert metrics.value("kfeed_stream_queued_items") == 0
    assert metrics.value("kfeed_stream_queue_depth_max") == 5
    server.hub.unsubscribe(overflowing)


async def test_running_backtests_are_counted_until_they_end(server: KfeedServer) -> None:
    before = (await scrape(server)).value("kfeed_backtests_running")
    with running_backtest(), running_backtest():
        assert (await scrape(server)).value("kfeed_backtests_running") == before + 2
    assert (await scrape(server)).value("kfeed_backtests_running") == before


async def test_the_endpoint_closes_with_the_server(sqlite_url: str) -> None:
    config = ServerConfig(database_url=sqlite_url, metrics_listen="127.0.0.1:0")
    async with running_server(config) as server:
        assert server.metrics_endpoint is not None
        port = server.metrics_endpoint.port
        assert (await scrape(server)).samples
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/", timeout=2)


def test_a_malformed_metrics_address_is_refused() -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        MetricsEndpoint.start("localhost")
