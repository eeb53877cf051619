"""IngestService.Publish: acks after commit, idempotent resends, error acks that keep the stream."""

from __future__ import annotations

from dataclasses import replace

import grpc
from google.rpc import code_pb2

from kfeed.v1 import ingest_service_pb2, market_service_pb2, market_service_pb2_grpc
from kfeed_server.app import KfeedServer
from kfeed_server.transport.convert import snapshot_to_proto
from tests.factories import make_market, make_snapshot, make_trade
from tests.server.conftest import PublishSession

MARKET = make_market("KXING-1")


async def test_ack_comes_after_commit_and_data_is_readable(
    publisher: PublishSession, channel: grpc.aio.Channel
) -> None:
    ack = await publisher.publish(
        markets=[MARKET],
        snapshots=[make_snapshot(MARKET.ticker, i) for i in range(3)],
        trades=[make_trade(MARKET.ticker, i) for i in range(2)],
        batch_id=7,
    )
    assert (ack.batch_id, ack.code) == (7, code_pb2.OK)
    assert (ack.snapshots_stored, ack.trades_stored) == (3, 2)
    markets = market_service_pb2_grpc.MarketServiceStub(channel)
    listed = await markets.ListSnapshots(
        market_service_pb2.ListSnapshotsRequest(ticker=MARKET.ticker)
    )
    assert [s.yes_bid.ten_thousandths for s in listed.snapshots] == [4000, 4001, 4002]


async def test_resent_batch_is_stored_once(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    batch = {
        "markets": [MARKET],
        "snapshots": [make_snapshot(MARKET.ticker, i) for i in range(4)],
        "trades": [make_trade(MARKET.ticker, 0)],
    }
    first = await publisher.publish(batch_id=1, **batch)  # type: ignore[arg-type]
    again = await publisher.publish(batch_id=1, **batch)  # type: ignore[arg-type]
    assert (first.snapshots_stored, first.trades_stored) == (4, 1)
    assert (again.code, again.snapshots_stored, again.trades_stored) == (code_pb2.OK, 0, 0)
    page = await kfeed_server.repositories.snapshots.list_range(
        MARKET.ticker, start=None, end=None, limit=100
    )
    assert len(page.items) == 4


async def test_unchanged_state_is_not_stored_again(publisher: PublishSession) -> None:
    first = make_snapshot(MARKET.ticker, 1)
    same_state_later = replace(
        first,
        exchange_time=make_snapshot(MARKET.ticker, 2).exchange_time,
        receive_time=make_snapshot(MARKET.ticker, 2).receive_time,
    )
    ack = await publisher.publish(markets=[MARKET], snapshots=[first, same_state_later])
    assert ack.snapshots_stored == 1


async def test_invalid_batch_gets_error_ack_naming_fields_and_stream_stays_open(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    good = make_snapshot(MARKET.ticker, 0)
    too_expensive = snapshot_to_proto(make_snapshot(MARKET.ticker, 1))
    too_expensive.yes_ask.ten_thousandths = 10_001
    no_ticker = snapshot_to_proto(make_snapshot(MARKET.ticker, 2))
    no_ticker.ticker = ""
    no_time = snapshot_to_proto(make_snapshot(MARKET.ticker, 3))
    no_time.ClearField("exchange_time")
    request = ingest_service_pb2.PublishRequest(
        batch_id=11,
        snapshots=[snapshot_to_proto(good), too_expensive, no_ticker, no_time],
    )
    ack = await publisher.send(request)
    assert ack.batch_id == 11
    assert ack.code == code_pb2.INVALID_ARGUMENT
    assert [v.field for v in ack.field_violations] == [
        "snapshots[1].yes_ask",
        "snapshots[2].ticker",
        "snapshots[3].exchange_time",
    ]
    # Nothing of the refused batch was stored, and the stream still takes batches.
    assert await kfeed_server.repositories.snapshots.latest(MARKET.ticker) is None
    ok = await publisher.publish(markets=[MARKET], snapshots=[good], batch_id=12)
    assert (ok.batch_id, ok.code, ok.snapshots_stored) == (12, code_pb2.OK, 1)


async def test_snapshot_of_unknown_market_is_refused(publisher: PublishSession) -> None:
    ack = await publisher.publish(snapshots=[make_snapshot("KXNOBODY", 0)])
    assert ack.code == code_pb2.INVALID_ARGUMENT
    assert [v.field for v in ack.field_violations] == ["snapshots[0].ticker"]
    assert "KXNOBODY" in ack.field_violations[0].description


async def test_market_published_earlier_is_known_to_later_batches(
    publisher: PublishSession,
) -> None:
    assert (await publisher.publish(markets=[MARKET])).code == code_pb2.OK
    ack = await publisher.publish(snapshots=[make_snapshot(MARKET.ticker, 0)])
    assert (ack.code, ack.snapshots_stored) == (code_pb2.OK, 1)
