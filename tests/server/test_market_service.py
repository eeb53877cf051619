"""MarketService over a real server and the generated stubs, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import timestamp_pb2

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed.v1 import types_pb2
from kfeed_server.app import KfeedServer
from kfeed_server.records import (
    DataSource,
    MarketRecord,
    MarketResult,
    MarketStatus,
    Side,
    SnapshotRecord,
    TradeRecord,
)
from tests.support.servers import bad_request_fields, status_details

T0 = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _ts(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


MARKETS = [
    MarketRecord(
        ticker=f"KXTEST-26NOV01-T{i}",
        event_ticker="KXTEST-26NOV01" if i < 3 else "KXOTHER-26NOV01",
        series_ticker="KXTEST" if i < 3 else "KXOTHER",
        title=f"Market {i}",
        status=MarketStatus.OPEN if i % 2 == 0 else MarketStatus.FINALIZED,
        result=MarketResult.UNSPECIFIED if i % 2 == 0 else MarketResult.YES,
        close_time=T0 + timedelta(days=1),
        settlement_value=None if i % 2 == 0 else 10_000,
    )
    for i in range(5)
]
TICKER = MARKETS[0].ticker


def _snapshot(i: int) -> SnapshotRecord:
    return SnapshotRecord(
        ticker=TICKER,
        exchange_time=T0 + timedelta(seconds=i),
        receive_time=T0 + timedelta(seconds=i, microseconds=7),
        source=DataSource.POLL,
        yes_bid=4000 + i,
        yes_ask=4100 + i,
        no_bid=5900 - i,
        no_ask=6000 - i,
        volume=150_000 + i,
        status=MarketStatus.OPEN,
    )


def _trade(i: int) -> TradeRecord:
    return TradeRecord(
        trade_id=f"trade-{i:03d}",
        ticker=TICKER,
        yes_price=4200 + i,
        no_price=5800 - i,
        count=100 * (i + 1),
        taker_side=Side.YES if i % 2 else Side.NO,
        create_time=T0 + timedelta(seconds=i),
    )


@pytest.fixture
async def stub(
    kfeed_server: KfeedServer, channel: grpc.aio.Channel
) -> pb_grpc.MarketServiceAsyncStub:
    await kfeed_server.repositories.ingest.write_batch(
        series=[],
        events=[],
        markets=MARKETS,
        snapshots=[_snapshot(i) for i in range(25)],
        trades=[_trade(i) for i in range(12)],
        feed_gaps=[],
    )
    return pb_grpc.MarketServiceStub(channel)


async def test_get_market_returns_the_stored_market(stub: pb_grpc.MarketServiceAsyncStub) -> None:
    response = await stub.GetMarket(pb.GetMarketRequest(ticker=MARKETS[1].ticker))
    market = response.market
    assert market.ticker == MARKETS[1].ticker
    assert market.event_ticker == "KXTEST-26NOV01"
    assert market.status == types_pb2.MARKET_STATUS_FINALIZED
    assert market.result == types_pb2.MARKET_RESULT_YES
    assert market.settlement_value.ten_thousandths == 10_000
    assert market.close_time.ToDatetime(tzinfo=UTC) == T0 + timedelta(days=1)


async def test_get_market_unknown_ticker_is_not_found(stub: pb_grpc.MarketServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetMarket(pb.GetMarketRequest(ticker="NOPE"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "NOPE" in (caught.value.details() or "")


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.GetMarket(pb.GetMarketRequest(ticker="")),
        lambda s: s.GetLatestSnapshot(pb.GetLatestSnapshotRequest(ticker="")),
        lambda s: s.ListSnapshots(pb.ListSnapshotsRequest(ticker="")),
        lambda s: s.ListTrades(pb.ListTradesRequest(ticker="")),
    ],
    ids=["GetMarket", "GetLatestSnapshot", "ListSnapshots", "ListTrades"],
)
async def test_empty_ticker_is_invalid_argument_naming_ticker(
    stub: pb_grpc.MarketServiceAsyncStub, call: object
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(stub)  # type: ignore[operator]
    assert bad_request_fields(caught.value) == ["ticker"]


async def test_list_markets_pages_through_everything_in_ticker_order(
    stub: pb_grpc.MarketServiceAsyncStub,
) -> None:
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        response = await stub.ListMarkets(pb.ListMarketsRequest(page_size=2, page_token=token))
        seen.extend(m.ticker for m in response.markets)
        pages += 1
        token = response.next_page_token
        if not token:
            break
    assert seen == sorted(m.ticker for m in MARKETS)
    assert pages == 3


async def test_list_markets_filters(stub: pb_grpc.MarketServiceAsyncStub) -> None:
    by_event = await stub.ListMarkets(pb.ListMarketsRequest(event_ticker="KXTEST-26NOV01"))
    assert [m.ticker for m in by_event.markets] == [m.ticker for m in MARKETS[:3]]
    by_series = await stub.ListMarkets(pb.ListMarketsRequest(series_ticker="KXOTHER"))
    assert [m.ticker for m in by_series.markets] == [m.ticker for m in MARKETS[3:]]
    settled = await stub.ListMarkets(
        pb.ListMarketsRequest(statuses=[types_pb2.MARKET_STATUS_FINALIZED])
    )
    assert [m.ticker for m in settled.markets] == [MARKETS[1].ticker, MARKETS[3].ticker]


async def test_list_markets_rejects_unknown_status(stub: pb_grpc.MarketServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListMarkets(pb.ListMarketsRequest(statuses=[2, 99]))  # type: ignore[list-item]
    assert bad_request_fields(caught.value) == ["statuses[1]"]


@pytest.mark.parametrize(
    ("page_size", "description"), [(-1, "must not be negative"), (10_001, "at most 10000")]
)
async def test_bad_page_size_is_invalid_argument(
    stub: pb_grpc.MarketServiceAsyncStub, page_size: int, description: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListSnapshots(pb.ListSnapshotsRequest(ticker=TICKER, page_size=page_size))
    assert bad_request_fields(caught.value) == ["page_size"]
    assert description in (caught.value.details() or "")


@pytest.mark.parametrize("token", ["%%%not-base64", "bm90IGpzb24", "eyJjIjpbMV0sInEiOiJ4In0"])
async def test_undecodable_page_token_is_invalid_argument(
    stub: pb_grpc.MarketServiceAsyncStub, token: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListSnapshots(pb.ListSnapshotsRequest(ticker=TICKER, page_token=token))
    assert bad_request_fields(caught.value) == ["page_token"]


async def test_page_token_from_another_query_is_refused(
    stub: pb_grpc.MarketServiceAsyncStub,
) -> None:
    first = await stub.ListSnapshots(pb.ListSnapshotsRequest(ticker=TICKER, page_size=5))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListSnapshots(
            pb.ListSnapshotsRequest(
                ticker=TICKER, page_size=5, page_token=first.next_page_token, start_time=_ts(T0)
            )
        )
    assert bad_request_fields(caught.value) == ["page_token"]


async def test_end_before_start_is_invalid_argument(stub: pb_grpc.MarketServiceAsyncStub) -> None:
    start, end = _ts(T0), _ts(T0 - timedelta(seconds=1))
    with pytest.raises(grpc.aio.AioRpcError) as snapshots_error:
        await stub.ListSnapshots(
            pb.ListSnapshotsRequest(ticker=TICKER, start_time=start, end_time=end)
        )
    assert bad_request_fields(snapshots_error.value) == ["end_time"]
    with pytest.raises(grpc.aio.AioRpcError) as trades_error:
        await stub.ListTrades(pb.ListTradesRequest(ticker=TICKER, start_time=start, end_time=end))
    assert bad_request_fields(trades_error.value) == ["end_time"]


async def test_get_latest_snapshot(stub: pb_grpc.MarketServiceAsyncStub) -> None:
    response = await stub.GetLatestSnapshot(pb.GetLatestSnapshotRequest(ticker=TICKER))
    snapshot = response.snapshot
    assert snapshot.exchange_time.ToDatetime(tzinfo=UTC) == T0 + timedelta(seconds=24)
    assert snapshot.yes_bid.ten_thousandths == 4024
    assert snapshot.snapshot_id > 0
    assert not snapshot.HasField("liquidity")


async def test_latest_snapshot_of_market_without_snapshots_is_not_found(
    stub: pb_grpc.MarketServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetLatestSnapshot(pb.GetLatestSnapshotRequest(ticker=MARKETS[2].ticker))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_snapshots_window_and_pagination(stub: pb_grpc.MarketServiceAsyncStub) -> None:
    start, end = T0 + timedelta(seconds=5), T0 + timedelta(seconds=20)
    collected: list[types_pb2.MarketSnapshot] = []
    token = ""
    while True:
        response = await stub.ListSnapshots(
            pb.ListSnapshotsRequest(
                ticker=TICKER,
                start_time=_ts(start),
                end_time=_ts(end),
                page_size=4,
                page_token=token,
            )
        )
        assert len(response.snapshots) <= 4
        collected.extend(response.snapshots)
        token = response.next_page_token
        if not token:
            break
    times = [s.exchange_time.ToDatetime(tzinfo=UTC) for s in collected]
    assert times == [T0 + timedelta(seconds=i) for i in range(5, 20)]
    assert [s.yes_bid.ten_thousandths for s in collected] == [4000 + i for i in range(5, 20)]
    assert collected[0].receive_time.ToDatetime(tzinfo=UTC) == T0 + timedelta(
        seconds=5, microseconds=7
    )


async def test_list_snapshots_of_unknown_market_is_not_found(
    stub: pb_grpc.MarketServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListSnapshots(pb.ListSnapshotsRequest(ticker="UNKNOWN"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_trades(stub: pb_grpc.MarketServiceAsyncStub) -> None:
    first = await stub.ListTrades(pb.ListTradesRequest(ticker=TICKER, page_size=5))
    rest = await stub.ListTrades(
        pb.ListTradesRequest(ticker=TICKER, page_size=100, page_token=first.next_page_token)
    )
    trades = [*first.trades, *rest.trades]
    assert [t.trade_id for t in trades] == [f"trade-{i:03d}" for i in range(12)]
    assert rest.next_page_token == ""
    assert trades[3].yes_price.ten_thousandths == 4203
    assert trades[3].count.hundredths == 400
    assert trades[3].taker_side == types_pb2.SIDE_YES


async def test_internal_error_hides_internals_and_carries_request_id(
    kfeed_server: KfeedServer, stub: pb_grpc.MarketServiceAsyncStub
) -> None:
    # Break the database under the server: the failure must surface as a clean INTERNAL.
    async with kfeed_server.engine.begin() as connection:
        await connection.exec_driver_sql("DROP TABLE trades")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListTrades(
            pb.ListTradesRequest(ticker=TICKER), metadata=(("x-request-id", "req-42"),)
        )
    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error (request id req-42)"
    assert status_details(error).message == error.details()
    assert ("x-request-id", "req-42") in tuple(error.trailing_metadata() or ())
