"""Order books through IngestService.Publish and GetOrderBook: the book at any instant equals the
book the published changes made, level for level; gaps are flagged; resends are stored once; bad
input gets the right status naming the field. Both databases, real server, real gRPC."""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2

from kfeed.v1 import ingest_service_pb2, market_service_pb2, market_service_pb2_grpc, types_pb2
from kfeed_ingest.kalshi.books import (
    LOST,
    RESYNC,
    START,
    BookChange,
    change_columns,
    checkpoint,
    micros,
    recorded_change_columns,
)
from kfeed_server.app import KfeedServer
from kfeed_server.transport.convert import market_to_proto
from tests.support.book_timeline import (
    MARKET,
    Ladder,
    Timeline,
    publish_timeline,
    request_of,
)
from tests.support.factories import at
from tests.support.servers import PublishSession, bad_request_fields, refused


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def levels(book: types_pb2.OrderBook) -> Ladder:
    return (
        [(lv.price.ten_thousandths, lv.size.hundredths) for lv in book.yes_bids],
        [(lv.price.ten_thousandths, lv.size.hundredths) for lv in book.no_bids],
    )


@pytest.mark.parametrize("per_batch", [40, 5000])  # 5000: COPY on PostgreSQL
async def test_the_book_at_any_instant_is_the_book_the_changes_made(
    publisher: PublishSession, channel: grpc.aio.Channel, per_batch: int
) -> None:
    timeline = Timeline(seed=per_batch, steps=600)
    changes = sum(isinstance(r, BookChange) for r in timeline.records)
    assert await publish_timeline(publisher, timeline, per_batch) == changes
    stub = market_service_pb2_grpc.MarketServiceStub(channel)
    rng = random.Random(1)
    first, last = timeline.truth[0][0], timeline.truth[-1][0]
    instants = [w for w, _ in rng.sample(timeline.truth, 60)]
    instants += [first + (last - first) * rng.random() for _ in range(60)]
    flagged = 0
    for moment in instants:
        moment = moment.replace(microsecond=moment.microsecond)  # whole µs
        response = await stub.GetOrderBook(
            market_service_pb2.GetOrderBookRequest(ticker=MARKET.ticker, time=stamp(moment))
        )
        book = response.book
        if timeline.in_gap(moment):
            assert book.in_feed_gap, moment
            flagged += 1
            continue
        assert not book.in_feed_gap, moment
        assert levels(book) == timeline.book_at(moment), moment
        assert book.exchange_time.ToDatetime(tzinfo=moment.tzinfo) <= moment
    assert flagged < len(instants) // 2
    # depth: the best levels only; latest (no time) is the last instant's book
    latest = await stub.GetOrderBook(
        market_service_pb2.GetOrderBookRequest(ticker=MARKET.ticker, depth=2)
    )
    if not timeline.in_gap(last):
        yes, no = timeline.book_at(last)
        assert levels(latest.book) == (yes[:2], no[:2])
        assert latest.book.HasField("exchange_sequence")


async def test_a_resent_batch_is_stored_once(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    timeline = Timeline(seed=3, steps=300)
    await publisher.publish(markets=[MARKET])
    request = request_of(timeline.records, 0)
    first = await publisher.send(request)
    again = await publisher.send(request)
    assert first.book_changes_stored == sum(isinstance(r, BookChange) for r in timeline.records)
    assert first.book_checkpoints_stored >= 1
    assert (again.code, again.book_changes_stored, again.book_checkpoints_stored) == (
        code_pb2.OK,
        0,
        0,
    )


async def test_changes_without_a_dictionary_as_merged_spool_rows_are_stored(
    publisher: PublishSession, channel: grpc.aio.Channel
) -> None:
    await publisher.publish(markets=[MARKET])
    request = ingest_service_pb2.PublishRequest(producer="tests")
    request.book_checkpoints.append(
        checkpoint(MARKET.ticker, START, at(0), at(0), None, {4200: 100}, {})
    )
    for rows in ((1, 2), (3,)):  # rows recorded in two records, merged as the spool merges them
        part = ingest_service_pb2.PublishRequest()
        part.book_changes.CopyFrom(
            recorded_change_columns([
                BookChange(MARKET.ticker, micros(at(row)), micros(at(row)), row,
                           types_pb2.SIDE_NO, 4999 + row, 700)
                for row in rows
            ])
        )  # fmt: skip
        request.MergeFrom(part)
    assert (await publisher.send(request)).book_changes_stored == 3
    stub = market_service_pb2_grpc.MarketServiceStub(channel)
    book = (
        await stub.GetOrderBook(
            market_service_pb2.GetOrderBookRequest(ticker=MARKET.ticker, time=stamp(at(2)))
        )
    ).book
    assert levels(book) == ([(4200, 100)], [(5001, 700), (5000, 700)])
    assert book.exchange_sequence == 2


async def test_bad_requests_get_the_right_status_naming_the_field(
    publisher: PublishSession, channel: grpc.aio.Channel
) -> None:
    await publisher.publish(markets=[MARKET])
    stub = market_service_pb2_grpc.MarketServiceStub(channel)
    cases: list[tuple[dict[str, Any], grpc.StatusCode, list[str]]] = [
        ({"ticker": MARKET.ticker, "depth": -1}, grpc.StatusCode.INVALID_ARGUMENT, ["depth"]),
        ({"ticker": MARKET.ticker, "depth": 10**6}, grpc.StatusCode.INVALID_ARGUMENT, ["depth"]),
        ({"ticker": ""}, grpc.StatusCode.INVALID_ARGUMENT, ["ticker"]),
        ({"ticker": "A\x00B"}, grpc.StatusCode.INVALID_ARGUMENT, ["ticker"]),
        ({"ticker": "KXNOPE"}, grpc.StatusCode.NOT_FOUND, []),
        # before the market opened (an hour before at(0))
        (
            {"ticker": MARKET.ticker, "time": stamp(at(-7200))},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["time"],
        ),
        ({"ticker": MARKET.ticker, "time": Timestamp(seconds=-(10**12))},
         grpc.StatusCode.INVALID_ARGUMENT, ["time"]),
        # open, but no book recorded yet
        ({"ticker": MARKET.ticker, "time": stamp(at(0))}, grpc.StatusCode.NOT_FOUND, []),
    ]  # fmt: skip
    for fields, code, named in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetOrderBook(market_service_pb2.GetOrderBookRequest(**fields))
        assert caught.value.code() == code, fields
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert bad_request_fields(caught.value) == named, fields


async def test_invalid_book_rows_are_refused_naming_column_and_row(
    publisher: PublishSession,
) -> None:
    await publisher.publish(markets=[MARKET])
    good = BookChange(MARKET.ticker, micros(at(1)), micros(at(1)), 1, types_pb2.SIDE_YES, 10, 1)
    request = ingest_service_pb2.PublishRequest(producer="tests")
    request.book_changes.CopyFrom(
        change_columns([good, good._replace(price=10_000), good._replace(size=-1)])
    )
    bad_checkpoint = checkpoint(MARKET.ticker, START, at(0), at(0), None, {0: 5}, {})
    bad_checkpoint.kind = 9  # type: ignore[assignment]
    request.book_checkpoints.append(bad_checkpoint)
    ack = await publisher.send(request)
    # Each bad row is refused on its own; the good change is stored.
    assert (ack.code, ack.book_changes_stored) == (code_pb2.OK, 1)
    assert refused(ack) == [
        ("book_changes", 1, ["book_changes.price[1]"]),
        ("book_changes", 2, ["book_changes.size[2]"]),
        (
            "book_checkpoints",
            0,
            ["book_checkpoints[0].kind", "book_checkpoints[0].book.yes_bids[0].price"],
        ),
    ]
    # Columns of different lengths cannot be told apart: the whole batch is refused.
    short = ingest_service_pb2.PublishRequest(producer="tests")
    short.book_changes.CopyFrom(change_columns([good, good]))
    del short.book_changes.size[1]
    ack = await publisher.send(short)
    assert ack.code == code_pb2.INVALID_ARGUMENT
    assert [v.field for v in ack.field_violations] == ["book_changes.size"]
    unknown = ingest_service_pb2.PublishRequest(producer="tests")
    later = good._replace(sequence=2)
    unknown.book_changes.CopyFrom(
        change_columns([good._replace(ticker="KXNOPE"), later, later._replace(ticker="KXNOPE")])
    )
    ack = await publisher.send(unknown)
    assert (ack.code, ack.book_changes_stored) == (code_pb2.OK, 1)
    assert [(row.field, row.index) for row in ack.refused_rows] == [
        ("book_changes", 0),
        ("book_changes", 2),
    ]
    assert market_to_proto(MARKET).ticker == MARKET.ticker


async def test_a_restart_without_a_lost_marker_flags_the_unseen_stretch(
    publisher: PublishSession, channel: grpc.aio.Channel
) -> None:
    """An ingest killed mid-run leaves no LOST marker: the next START says the recording
    restarted, so the instants between the last record and it are flagged; a LOST marker's
    stretch is flagged until the RESYNC after it."""
    await publisher.publish(markets=[MARKET])
    change = BookChange(MARKET.ticker, micros(at(2)), micros(at(2)), 2, types_pb2.SIDE_YES, 10, 5)
    records: list[BookChange | ingest_service_pb2.OrderBookCheckpoint] = [
        checkpoint(MARKET.ticker, START, at(1), at(1), 1, {20: 1}, {}),
        change,
        checkpoint(MARKET.ticker, START, at(10), at(10), 1, {30: 1}, {}),  # killed, restarted
        checkpoint(MARKET.ticker, LOST, at(20), at(20), None, {30: 1}, {}),
        checkpoint(MARKET.ticker, RESYNC, at(25), at(25), 9, {40: 2}, {}),
    ]
    assert (await publisher.send(request_of(records, 0))).code == code_pb2.OK
    stub = market_service_pb2_grpc.MarketServiceStub(channel)

    async def book(seconds: float) -> types_pb2.OrderBook:
        request = market_service_pb2.GetOrderBookRequest(
            ticker=MARKET.ticker, time=stamp(at(seconds))
        )
        return (await stub.GetOrderBook(request)).book

    expected = {  # instant: (YES bids, in_feed_gap)
        1.5: ([(20, 1)], True),  # before a restart nobody announced: the stretch is unseen
        5: ([(20, 1), (10, 5)], True),
        12: ([(30, 1)], False),
        21: ([(30, 1)], True),  # after LOST: the last known book, flagged
        26: ([(40, 2)], False),
    }
    for seconds, (yes, in_gap) in expected.items():
        found = await book(seconds)
        assert levels(found)[0] == yes, seconds
        assert found.in_feed_gap == in_gap, seconds
    assert (await book(26)).exchange_sequence == 9
