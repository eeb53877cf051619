"""IngestService.Publish: acks after commit, idempotent resends, invalid rows refused one by one
(the rest stored), error acks for batches that cannot be read row by row; the stream stays."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2

from kfeed.v1 import ingest_service_pb2, market_service_pb2, market_service_pb2_grpc, types_pb2
from kfeed_ingest.columns import snapshot_columns
from kfeed_server.app import KfeedServer
from kfeed_server.records import DataSource, MarketStatus, SnapshotRecord
from kfeed_server.transport.convert import market_to_proto, snapshot_to_proto
from tests.server.test_stream_replay_live import read_one
from tests.support.factories import make_market, make_snapshot, make_trade
from tests.support.servers import PublishSession, refused

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
    same_state_later = first._replace(
        exchange_time=make_snapshot(MARKET.ticker, 2).exchange_time,
        receive_time=make_snapshot(MARKET.ticker, 2).receive_time,
    )
    ack = await publisher.publish(markets=[MARKET], snapshots=[first, same_state_later])
    assert ack.snapshots_stored == 1


async def test_invalid_rows_are_refused_and_the_valid_rest_stored(
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
        markets=[market_to_proto(MARKET)],
        snapshots=[too_expensive, no_ticker, snapshot_to_proto(good), no_time],
    )
    ack = await publisher.send(request)
    assert (ack.batch_id, ack.code, ack.snapshots_stored) == (11, code_pb2.OK, 1)
    assert refused(ack) == [
        ("snapshots", 0, ["snapshots[0].yes_ask"]),
        ("snapshots", 1, ["snapshots[1].ticker"]),
        ("snapshots", 3, ["snapshots[3].exchange_time"]),
    ]
    # Only the valid row was stored, and the stream still takes batches.
    latest = await kfeed_server.repositories.snapshots.latest(MARKET.ticker)
    assert latest is not None
    assert latest.exchange_time == good.exchange_time
    ok = await publisher.publish(snapshots=[make_snapshot(MARKET.ticker, 5)], batch_id=12)
    assert (ok.batch_id, ok.code, ok.snapshots_stored, refused(ok)) == (12, code_pb2.OK, 1, [])


async def test_snapshot_of_unknown_market_is_refused(publisher: PublishSession) -> None:
    ack = await publisher.publish(snapshots=[make_snapshot("KXNOBODY", 0)])
    assert (ack.code, ack.snapshots_stored) == (code_pb2.OK, 0)
    assert refused(ack) == [("snapshots", 0, ["snapshots[0].ticker"])]
    assert "KXNOBODY" in ack.refused_rows[0].field_violations[0].description


async def test_market_published_earlier_is_known_to_later_batches(
    publisher: PublishSession,
) -> None:
    assert (await publisher.publish(markets=[MARKET])).code == code_pb2.OK
    ack = await publisher.publish(snapshots=[make_snapshot(MARKET.ticker, 0)])
    assert (ack.code, ack.snapshots_stored) == (code_pb2.OK, 1)


# --- snapshot_columns --------------------------------------------------------------------------

OTHER = make_market("KXING-2")


def _columns(snapshots: Sequence[SnapshotRecord]) -> ingest_service_pb2.SnapshotColumns:
    """``snapshots`` as columns, encoded as `kfeed ingest` encodes them."""
    return snapshot_columns([snapshot_to_proto(s) for s in snapshots])


def _stored_view(record: SnapshotRecord) -> SnapshotRecord:
    """What should not depend on how the row was sent: all but the market and the id."""
    return record._replace(ticker="", snapshot_id=0)


async def _stored(kfeed_server: KfeedServer, ticker: str) -> list[SnapshotRecord]:
    page = await kfeed_server.repositories.snapshots.list_range(
        ticker, start=None, end=None, limit=100
    )
    return list(page.items)


def _rows(ticker: str) -> list[SnapshotRecord]:
    """Rows with every optional field set, and with some of them unset."""
    return [
        make_snapshot(ticker, 0),
        make_snapshot(ticker, 1, exchange_sequence=None, yes_bid=None, liquidity=None),
        make_snapshot(
            ticker, 2, yes_ask=None, no_bid=None, volume=None, status=MarketStatus.PAUSED
        ),
        make_snapshot(ticker, 3, source=DataSource.POLL, open_interest=None, last_price=0),
    ]


async def test_columns_are_stored_like_the_same_rows_sent_as_messages(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    as_messages = await publisher.publish(markets=[MARKET, OTHER], snapshots=_rows(MARKET.ticker))
    as_columns = await publisher.send(
        ingest_service_pb2.PublishRequest(
            batch_id=100, snapshot_columns=_columns(_rows(OTHER.ticker))
        )
    )
    assert (as_messages.code, as_columns.code) == (code_pb2.OK, code_pb2.OK)
    assert as_columns.snapshots_stored == 4
    from_messages = await _stored(kfeed_server, MARKET.ticker)
    from_columns = await _stored(kfeed_server, OTHER.ticker)
    assert [_stored_view(s) for s in from_columns] == [_stored_view(s) for s in from_messages]
    assert [s.yes_bid for s in from_columns] == [4_000, None, 4_002, 4_003]


async def test_resent_columns_are_stored_once(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    await publisher.publish(markets=[MARKET])
    batch = ingest_service_pb2.PublishRequest(
        batch_id=20, snapshot_columns=_columns(_rows(MARKET.ticker))
    )
    first = await publisher.send(batch)
    again = await publisher.send(batch)
    assert (first.code, first.snapshots_stored) == (code_pb2.OK, 4)
    assert (again.code, again.snapshots_stored) == (code_pb2.OK, 0)
    assert len(await _stored(kfeed_server, MARKET.ticker)) == 4


async def test_messages_and_columns_in_one_batch_keep_messages_first(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    # Two rows of one market and moment: the first in the batch is stored, the other is a
    # duplicate. The messages' rows come first, then the columns'.
    as_message = make_snapshot(MARKET.ticker, 0, yes_bid=1_000)
    as_column = make_snapshot(MARKET.ticker, 0, yes_bid=2_000)
    later_as_column = make_snapshot(MARKET.ticker, 1)
    request = ingest_service_pb2.PublishRequest(
        batch_id=30,
        markets=[market_to_proto(MARKET)],
        snapshots=[snapshot_to_proto(as_message)],
        snapshot_columns=_columns([later_as_column, as_column]),
    )
    ack = await publisher.send(request)
    assert (ack.code, ack.snapshots_stored) == (code_pb2.OK, 2)
    stored = await _stored(kfeed_server, MARKET.ticker)
    assert [_stored_view(s) for s in stored] == [
        _stored_view(s) for s in (as_message, later_as_column)
    ]


async def test_invalid_column_values_refuse_their_rows_naming_column_and_row(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    await publisher.publish(markets=[MARKET])
    columns = _columns(_rows(MARKET.ticker))
    columns.yes_ask[0] = 10_001
    columns.volume[2] = -1  # not checked: row 2 has no volume
    columns.open_interest[1] = -5
    columns.source[2] = types_pb2.DATA_SOURCE_UNSPECIFIED
    columns.present[3] |= 1 << 12
    columns.exchange_time_micros[1] = 2**62
    columns.ticker_index[3] = 1
    ack = await publisher.send(ingest_service_pb2.PublishRequest(snapshot_columns=columns))
    assert (ack.code, ack.snapshots_stored) == (code_pb2.OK, 0)
    assert refused(ack) == [
        ("snapshot_columns", 0, ["snapshot_columns.yes_ask[0]"]),
        (
            "snapshot_columns",
            1,
            ["snapshot_columns.exchange_time_micros[1]", "snapshot_columns.open_interest[1]"],
        ),
        ("snapshot_columns", 2, ["snapshot_columns.source[2]"]),
        (
            "snapshot_columns",
            3,
            ["snapshot_columns.ticker_index[3]", "snapshot_columns.present[3]"],
        ),
    ]
    assert await _stored(kfeed_server, MARKET.ticker) == []
    ok = await publisher.send(
        ingest_service_pb2.PublishRequest(snapshot_columns=_columns(_rows(MARKET.ticker)))
    )
    assert (ok.code, ok.snapshots_stored) == (code_pb2.OK, 4)


async def test_columns_of_different_lengths_refuse_the_whole_batch_naming_them(
    publisher: PublishSession,
) -> None:
    await publisher.publish(markets=[MARKET])
    columns = _columns(_rows(MARKET.ticker))
    del columns.yes_bid[-1]
    columns.receive_time_micros.append(0)
    columns.tickers.append("")
    ack = await publisher.send(ingest_service_pb2.PublishRequest(snapshot_columns=columns))
    assert ack.code == code_pb2.INVALID_ARGUMENT
    assert [v.field for v in ack.field_violations] == [
        "snapshot_columns.receive_time_micros",
        "snapshot_columns.yes_bid",
        "snapshot_columns.tickers[1]",
    ]
    assert "has 3 values" in ack.field_violations[1].description


async def test_columns_of_unknown_market_are_refused(publisher: PublishSession) -> None:
    ack = await publisher.send(
        ingest_service_pb2.PublishRequest(snapshot_columns=_columns(_rows("KXNOBODY")))
    )
    assert (ack.code, ack.snapshots_stored) == (code_pb2.OK, 0)
    assert refused(ack) == [
        ("snapshot_columns", row, ["snapshot_columns.tickers[0]"]) for row in range(4)
    ]


async def test_batch_whose_producer_goes_away_mid_write_is_stored_and_streamed_live(
    kfeed_server: KfeedServer,
    channel: grpc.aio.Channel,
    publisher: PublishSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await publisher.publish(markets=[MARKET])
    markets = market_service_pb2_grpc.MarketServiceStub(channel)
    request = market_service_pb2.StreamSnapshotsRequest(tickers=[MARKET.ticker])
    live = markets.StreamSnapshots(request)
    assert (await read_one(live)).HasField("caught_up")
    writer = kfeed_server.repositories.ingest
    write_batch = writer.write_batch
    writing, finish = asyncio.Event(), asyncio.Event()

    async def held_write(**rows: Any) -> Any:
        writing.set()
        await finish.wait()  # the producer is gone by now: its call was cancelled
        return await write_batch(**rows)

    monkeypatch.setattr(writer, "write_batch", held_write)
    gone = PublishSession(channel)
    sent = asyncio.create_task(
        gone.publish(snapshots=[make_snapshot(MARKET.ticker, i) for i in range(3)])
    )
    await asyncio.wait_for(writing.wait(), 10)
    sent.cancel()  # a killed ingest: its stream ends while the batch is being written
    with pytest.raises(asyncio.CancelledError):
        await sent
    await gone.close()
    finish.set()
    received = [await read_one(live) for _ in range(3)]
    live.cancel()
    assert [m.snapshot.snapshot.yes_bid.ten_thousandths for m in received] == [4000, 4001, 4002]
    monkeypatch.setattr(writer, "write_batch", write_batch)
    ack = await publisher.publish(snapshots=[make_snapshot(MARKET.ticker, 3)])
    assert (ack.code, ack.snapshots_stored) == (code_pb2.OK, 1)
