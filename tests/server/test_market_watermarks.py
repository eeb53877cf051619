"""IngestService.ListMarketWatermarks (where each market's stored data ends), and a trade resent
with a more precise time (REST after the WebSocket's whole seconds) refining the stored one."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from kfeed.v1 import ingest_service_pb2, ingest_service_pb2_grpc, types_pb2
from kfeed_server.app import KfeedServer
from kfeed_server.records import MarketStatus, TradeRecord
from tests.support.factories import make_market, make_snapshot, make_trade
from tests.support.servers import PublishSession, refused

WHOLE_SECOND = datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC)


def _with_time(trade: TradeRecord, create_time: datetime) -> TradeRecord:
    return replace(trade, create_time=create_time)


async def _watermarks(
    channel: grpc.aio.Channel, **request: object
) -> ingest_service_pb2.ListMarketWatermarksResponse:
    stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
    response: ingest_service_pb2.ListMarketWatermarksResponse = await stub.ListMarketWatermarks(
        ingest_service_pb2.ListMarketWatermarksRequest(**request)  # type: ignore[arg-type]
    )
    return response


async def test_watermarks_list_markets_by_status_with_their_newest_trade(
    publisher: PublishSession, channel: grpc.aio.Channel
) -> None:
    open_market, closed, final = (
        make_market("KXW-A"),
        make_market("KXW-B", status=MarketStatus.CLOSED),
        make_market("KXW-C", status=MarketStatus.FINALIZED),
    )
    trades = [make_trade("KXW-A", i) for i in (3, 1, 2)] + [make_trade("KXW-C", 5)]
    snapshots = [make_snapshot("KXW-B", i) for i in (2, 4)]
    ack = await publisher.publish(
        markets=[open_market, closed, final], trades=trades, snapshots=snapshots
    )
    assert ack.code == 0, ack

    final_or_none = (types_pb2.MARKET_STATUS_UNSPECIFIED, types_pb2.MARKET_STATUS_FINALIZED)
    not_final = [s for s in types_pb2.MarketStatus.values() if s not in final_or_none]
    listed = await _watermarks(channel, statuses=not_final)
    assert [w.market.ticker for w in listed.watermarks] == ["KXW-A", "KXW-B"]
    newest = listed.watermarks[0].latest_trade_time.ToDatetime(tzinfo=UTC)
    assert newest == make_trade("KXW-A", 3).create_time
    assert not listed.watermarks[1].HasField("latest_trade_time")
    assert not listed.watermarks[0].HasField("latest_snapshot_time")
    shown = listed.watermarks[1].latest_snapshot_time.ToDatetime(tzinfo=UTC)
    assert shown == make_snapshot("KXW-B", 4).exchange_time
    assert listed.watermarks[1].market.status == types_pb2.MARKET_STATUS_CLOSED

    everything = await _watermarks(channel)
    assert [w.market.ticker for w in everything.watermarks] == ["KXW-A", "KXW-B", "KXW-C"]


async def test_watermarks_page_by_ticker_and_refuse_bad_requests(
    publisher: PublishSession, channel: grpc.aio.Channel
) -> None:
    ack = await publisher.publish(markets=[make_market(f"KXP-{i}") for i in range(5)])
    assert ack.code == 0, ack
    tickers: list[str] = []
    token = ""
    while True:
        page = await _watermarks(channel, page_size=2, page_token=token)
        tickers += [w.market.ticker for w in page.watermarks]
        token = page.next_page_token
        if not token:
            break
    assert tickers == [f"KXP-{i}" for i in range(5)]
    for bad in ({"page_size": -1}, {"statuses": [99]}, {"page_token": "garbage\x00"}):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _watermarks(channel, **bad)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad


async def test_a_precise_time_refines_a_whole_second_and_nothing_else_moves_a_trade(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    market = make_market("KXR-1")
    precise = WHOLE_SECOND + timedelta(milliseconds=250)
    websocket = [  # as the WebSocket gives them: whole seconds
        make_trade(market.ticker, 0, create_time=WHOLE_SECOND),
        make_trade(market.ticker, 1, create_time=WHOLE_SECOND),
        make_trade(market.ticker, 2, create_time=precise),
    ]
    ack = await publisher.publish(markets=[market], trades=websocket)
    assert ack.trades_stored == 3
    rest = [  # the same trades as REST gives them, then as the WebSocket gives them again
        _with_time(websocket[0], precise),  # refines: later within the second
        _with_time(websocket[1], WHOLE_SECOND + timedelta(seconds=1)),  # not within
        _with_time(websocket[2], WHOLE_SECOND),  # coarser than the stored time
    ]
    ack = await publisher.publish(trades=rest)
    assert ack.trades_stored == 1  # the refined one
    # A time in another second is another trade under the same id: refused, the stored one kept.
    assert refused(ack) == [("trades", 1, ["trades[1].create_time"])]
    again = await publisher.publish(trades=[websocket[0]])
    assert again.trades_stored == 0  # a whole second never overrides a precise time
    page = await kfeed_server.repositories.trades.list_range(
        market.ticker, start=None, end=None, limit=10
    )
    times = {t.trade_id: t.create_time for t in page.items}
    assert times == {
        websocket[0].trade_id: precise,
        websocket[1].trade_id: WHOLE_SECOND,
        websocket[2].trade_id: precise,
    }
