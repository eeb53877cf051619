"""StreamOrderBooks on a real server fed by real Publish batches, on both databases: a stream from
a past start, applied by a client, equals GetOrderBook at the caught-up point and follows live
publishes; a stream resumed from any token continues exactly (no gap, no duplicate), batched or
not; feed gaps bring a flagged book, then a fresh one; bad input gets the right status naming
the field. Random timelines (seeded) with gaps and checkpoints, several per test."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, timedelta

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2

from kfeed.v1 import ingest_service_pb2, types_pb2
from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_client.books import LocalOrderBook, LocalOrderBooks
from kfeed_ingest.kalshi.books import LOST, RESYNC, START, BookChange, checkpoint, micros
from kfeed_server.app import KfeedServer, ServerConfig
from tests.server.test_order_books import levels, stamp
from tests.support.book_timeline import MARKET, Ladder, Timeline, request_of
from tests.support.factories import at, make_gap, make_market
from tests.support.servers import PublishSession, bad_request_fields, serving

Stream = grpc.aio.UnaryStreamCall[pb.StreamOrderBooksRequest, pb.StreamOrderBooksResponse]
Messages = list[pb.StreamOrderBooksResponse]


def ladder_of(book: LocalOrderBook | None) -> Ladder:
    return ([], []) if book is None else (book.yes_bids(), book.no_bids())


def updates(messages: Messages) -> list[bytes]:
    """Every book and change the messages carry, in order, each as its OrderBookUpdate bytes."""
    out: list[bytes] = []
    for message in messages:
        if message.HasField("batch"):
            out += [u.SerializeToString() for u in message.batch.updates]
        elif message.HasField("book"):
            out.append(pb.OrderBookUpdate(book=message.book).SerializeToString())
        elif message.HasField("change"):
            out.append(pb.OrderBookUpdate(change=message.change).SerializeToString())
    return out


def apply_all(books: LocalOrderBooks, messages: Messages) -> LocalOrderBook | None:
    """Apply the messages as a client does; the market's book after them."""
    for message in messages:
        books.apply(message)
    return books.books.get(MARKET.ticker)


async def read_one(stream: Stream) -> pb.StreamOrderBooksResponse:
    message = await asyncio.wait_for(stream.read(), timeout=10)
    assert isinstance(message, pb.StreamOrderBooksResponse), message
    assert message.resume_token, message
    return message


async def read_until(stream: Stream, done: Callable[[Messages], bool]) -> Messages:
    messages: Messages = []
    while not done(messages):
        messages.append(await read_one(stream))
    return messages


def caught_up(messages: Messages) -> bool:
    return bool(messages) and messages[-1].HasField("caught_up")


async def latest_book(stub: pb_grpc.MarketServiceAsyncStub) -> types_pb2.OrderBook:
    return (await stub.GetOrderBook(pb.GetOrderBookRequest(ticker=MARKET.ticker))).book


async def publish_records(
    publisher: PublishSession,
    records: list[BookChange | ingest_service_pb2.OrderBookCheckpoint],
    per_batch: int,
) -> None:
    for start in range(0, len(records), per_batch):
        ack = await publisher.send(request_of(records[start : start + per_batch], 0))
        assert ack.code == code_pb2.OK, ack


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_from_a_past_start_the_applied_book_equals_get_order_book_then_follows_live(
    publisher: PublishSession, channel: grpc.aio.Channel, seed: int
) -> None:
    rng = random.Random(seed)
    timeline = Timeline(seed=seed, steps=250)
    await publisher.publish(markets=[MARKET])
    split = rng.randint(len(timeline.records) // 3, 2 * len(timeline.records) // 3)
    await publish_records(publisher, timeline.records[:split], rng.choice([7, 60, 400]))
    stub = pb_grpc.MarketServiceStub(channel)
    start = rng.choice(timeline.truth[: len(timeline.truth) // 3])[0]
    max_batch_size = rng.choice([0, 1, 5, 1000])
    stream = stub.StreamOrderBooks(
        pb.StreamOrderBooksRequest(
            tickers=[MARKET.ticker], start_time=stamp(start), max_batch_size=max_batch_size
        )
    )
    history = await read_until(stream, caught_up)
    assert len(updates(history)) > 20  # the starting book, then the changes since
    first = history[0].batch.updates[0] if history[0].HasField("batch") else history[0]
    expected_first = await stub.GetOrderBook(
        pb.GetOrderBookRequest(ticker=MARKET.ticker, time=stamp(start))
    )
    assert first.book == expected_first.book  # the book in force at the start
    books = LocalOrderBooks()
    applied = apply_all(books, history)
    server_book = await latest_book(stub)
    assert ladder_of(applied) == levels(server_book)
    assert applied is not None
    assert applied.in_feed_gap == server_book.in_feed_gap
    assert history[-1].caught_up.replayed_count == len(updates(history))

    # live: the rest of the timeline, then the applied book is the server's latest again
    await publish_records(publisher, timeline.records[split:], rng.choice([7, 60]))
    final = levels(await latest_book(stub))
    while ladder_of(applied) != final:
        message = await read_one(stream)
        assert not message.HasField("subscriber_gap")
        applied = apply_all(books, [message])
    stream.cancel()


@pytest.mark.parametrize("max_batch_size", [0, 4])
async def test_resuming_from_any_token_continues_exactly(
    publisher: PublishSession, channel: grpc.aio.Channel, max_batch_size: int
) -> None:
    timeline = Timeline(seed=11 + max_batch_size, steps=200)
    await publisher.publish(markets=[MARKET])
    await publish_records(publisher, timeline.records, 50)
    stub = pb_grpc.MarketServiceStub(channel)
    request = pb.StreamOrderBooksRequest(
        tickers=[MARKET.ticker], start_time=stamp(at(0)), max_batch_size=max_batch_size
    )
    stream = stub.StreamOrderBooks(request)
    full = await read_until(stream, caught_up)
    stream.cancel()
    whole = updates(full)
    assert len(whole) > 100
    # after the starting books (which stand for the position before the first change)
    rng = random.Random(max_batch_size)
    cuts = [*rng.sample(range(1, len(full) - 1), 5), len(full) - 2]
    for cut in cuts:
        resumed_request = pb.StreamOrderBooksRequest(
            tickers=[MARKET.ticker],
            resume_token=full[cut].resume_token,
            max_batch_size=max_batch_size,
        )
        resumed = stub.StreamOrderBooks(resumed_request)
        rest = await read_until(resumed, caught_up)
        resumed.cancel()
        assert updates(full[: cut + 1]) + updates(rest) == whole, cut


async def test_feed_gaps_send_a_flagged_book_then_a_fresh_one_and_live_feed_gaps(
    publisher: PublishSession, channel: grpc.aio.Channel
) -> None:
    await publisher.publish(markets=[MARKET])
    stub = pb_grpc.MarketServiceStub(channel)
    stream = stub.StreamOrderBooks(
        pb.StreamOrderBooksRequest(
            tickers=[MARKET.ticker],
            heartbeat_interval=duration_pb2.Duration(seconds=60),
        )
    )
    assert (await read_until(stream, caught_up))[-1].caught_up.replayed_count == 0  # no book yet
    records: list[BookChange | ingest_service_pb2.OrderBookCheckpoint] = [
        checkpoint(MARKET.ticker, START, at(1), at(1), 1, {20: 1}, {}),
        BookChange(MARKET.ticker, micros(at(2)), micros(at(2)), 2, types_pb2.SIDE_NO, 7000, 5),
        checkpoint(MARKET.ticker, LOST, at(3), at(3), None, {20: 1}, {7000: 5}),
        checkpoint(MARKET.ticker, RESYNC, at(5), at(5), 9, {40: 2}, {}),
    ]
    await publish_records(publisher, records, 10)
    await publisher.publish(gaps=[make_gap(1, ticker=MARKET.ticker, channel="orderbook_delta")])
    live = await read_until(stream, lambda m: len(m) == 5)
    kinds = [m.WhichOneof("event") for m in live]
    assert kinds == ["book", "change", "book", "book", "feed_gap"]
    assert [m.book.in_feed_gap for m in live if m.HasField("book")] == [False, True, False]
    assert levels(live[3].book) == ([(40, 2)], [])
    assert live[4].feed_gap.ticker == MARKET.ticker
    stream.cancel()


async def test_without_a_start_the_stream_begins_with_the_latest_books_at_the_depth_asked(
    publisher: PublishSession, channel: grpc.aio.Channel
) -> None:
    timeline = Timeline(seed=5, steps=120)
    await publisher.publish(markets=[MARKET])
    await publish_records(publisher, timeline.records, 40)
    stub = pb_grpc.MarketServiceStub(channel)
    stream = stub.StreamOrderBooks(pb.StreamOrderBooksRequest(tickers=[MARKET.ticker], depth=2))
    messages = await read_until(stream, caught_up)
    stream.cancel()
    assert [m.WhichOneof("event") for m in messages] == ["book", "caught_up"]
    expected = await stub.GetOrderBook(pb.GetOrderBookRequest(ticker=MARKET.ticker, depth=2))
    assert messages[0].book == expected.book
    assert messages[0].resume_token == messages[1].resume_token


async def test_bad_requests_get_the_right_status_naming_the_field(
    publisher: PublishSession, channel: grpc.aio.Channel
) -> None:
    await publisher.publish(markets=[MARKET])
    stub = pb_grpc.MarketServiceStub(channel)
    ticker = MARKET.ticker
    cases: list[tuple[pb.StreamOrderBooksRequest, grpc.StatusCode, list[str]]] = [
        (pb.StreamOrderBooksRequest(tickers=[ticker], depth=-1),
         grpc.StatusCode.INVALID_ARGUMENT, ["depth"]),
        (pb.StreamOrderBooksRequest(tickers=["KXNOPE"]), grpc.StatusCode.NOT_FOUND, []),
        (pb.StreamOrderBooksRequest(tickers=[ticker], start_time=stamp(at(-7200))),
         grpc.StatusCode.INVALID_ARGUMENT, ["start_time"]),
        (pb.StreamOrderBooksRequest(tickers=[ticker], resume_token="forged"),
         grpc.StatusCode.INVALID_ARGUMENT, ["resume_token"]),
        (pb.StreamOrderBooksRequest(
            tickers=[ticker], conflation_interval=duration_pb2.Duration(seconds=61)),
         grpc.StatusCode.INVALID_ARGUMENT, ["conflation_interval"]),
        (pb.StreamOrderBooksRequest(tickers=[ticker], max_batch_size=-1),
         grpc.StatusCode.INVALID_ARGUMENT, ["max_batch_size"]),
    ]  # fmt: skip
    for request, code, named in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_until(stub.StreamOrderBooks(request), caught_up)
        assert caught.value.code() == code, request
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert bad_request_fields(caught.value) == named, request
    # a snapshot stream's token does not resume an order-book stream
    snapshots = stub.StreamSnapshots(pb.StreamSnapshotsRequest(tickers=[ticker]))
    first_snapshot_message = await snapshots.read()
    assert isinstance(first_snapshot_message, pb.StreamSnapshotsResponse)
    token = first_snapshot_message.resume_token
    snapshots.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_until(
            stub.StreamOrderBooks(pb.StreamOrderBooksRequest(resume_token=token)), caught_up
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
async def server_with_small_queues(database_url: str) -> AsyncIterator[KfeedServer]:
    config = ServerConfig(
        listen="127.0.0.1:0", database_url=database_url, subscriber_queue_capacity=50
    )
    async with serving(config) as server:
        yield server


async def test_a_stalled_subscriber_gets_a_gap_marker_and_resuming_from_it_fills_the_gap(
    server_with_small_queues: KfeedServer,
) -> None:
    address = f"127.0.0.1:{server_with_small_queues.port}"
    request = pb.StreamOrderBooksRequest(tickers=[MARKET.ticker], start_time=stamp(at(0)))
    timeline = Timeline(seed=21, steps=1_500)
    async with grpc.aio.insecure_channel(address) as channel:
        publisher = PublishSession(channel)
        await publisher.publish(markets=[MARKET])
        # Without BDP probing a client that stops reading lets the server write only ~100 KB.
        stalled_channel = grpc.aio.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
        stalled = pb_grpc.MarketServiceStub(stalled_channel).StreamOrderBooks(request)
        await read_until(stalled, caught_up)
        await publish_records(publisher, timeline.records, 100)
        await publisher.close()
        before_gap = await read_until(
            stalled, lambda m: bool(m) and m[-1].HasField("subscriber_gap")
        )
        stalled.cancel()
        await stalled_channel.close()
        assert before_gap[-1].subscriber_gap.dropped_count > 0
        stub = pb_grpc.MarketServiceStub(channel)
        resumed = stub.StreamOrderBooks(
            pb.StreamOrderBooksRequest(
                tickers=[MARKET.ticker], resume_token=before_gap[-1].resume_token
            )
        )
        rest = await read_until(resumed, caught_up)
        resumed.cancel()
        fresh = stub.StreamOrderBooks(request)
        everything = await read_until(fresh, caught_up)
        fresh.cancel()
    assert updates(before_gap) + updates(rest) == updates(everything)


async def test_the_starting_books_of_many_markets_equal_get_order_book_of_each(
    publisher: PublishSession, channel: grpc.aio.Channel
) -> None:
    """The starting books of a stream over many markets (read for all of them at once) are
    each market's GetOrderBook at the start, and the true book outside recorded gaps: at
    instants inside gaps too, before a market's first checkpoint (no book), and with a market
    that never had one."""
    tickers = [f"KXMANY-{n}" for n in range(12)] + ["KXMANY-NONE"]
    timelines = [Timeline(seed=40 + n, steps=120, ticker=t) for n, t in enumerate(tickers[:-1])]
    await publisher.publish(markets=[make_market(ticker) for ticker in tickers])
    for timeline in timelines:
        await publish_records(publisher, timeline.records, 80)
    stub = pb_grpc.MarketServiceStub(channel)
    rng = random.Random(5)
    everything = [moment for t in timelines for moment, _ in t.truth]
    instants = [min(everything) - timedelta(seconds=1), *rng.sample(everything, 4)]
    compared = 0
    for start in instants:
        stream = stub.StreamOrderBooks(
            pb.StreamOrderBooksRequest(tickers=tickers, start_time=stamp(start))
        )
        first: dict[str, types_pb2.OrderBook] = {}  # the starting books: all before a change
        messages = await read_until(stream, caught_up)
        stream.cancel()
        for message in messages:
            for update in message.batch.updates if message.HasField("batch") else [message]:
                if update.HasField("change") or not update.HasField("book"):
                    break
                first.setdefault(update.book.ticker, update.book)
            else:
                continue
            break
        for ticker in tickers:
            try:
                expected = await stub.GetOrderBook(
                    pb.GetOrderBookRequest(ticker=ticker, time=stamp(start))
                )
            except grpc.aio.AioRpcError:  # no book at that instant: none streamed
                # (a book after the start is a recorded checkpoint replayed, not a starting one)
                streamed = first.get(ticker)
                assert streamed is None or streamed.exchange_time.ToDatetime(UTC) > start
                continue
            # a starting book is followed by its changes: the first book of each market is it
            assert first[ticker] == expected.book, (ticker, start)
            timeline = timelines[tickers.index(ticker)]
            if not timeline.in_gap(start):  # and both are the true book
                assert levels(expected.book) == timeline.book_at(start), (ticker, start)
                compared += 1
    assert compared >= 2 * 12
