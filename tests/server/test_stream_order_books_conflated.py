"""StreamOrderBooks with ``conflation_interval``, on a real server fed by real Publish batches, on
both databases. Live, each message holds whole books (one per market at most, flagged with how
many rows each folds in) — fewer messages than changes — and a client applying them ends with
GetOrderBook's books; each message's token is the position of the last change folded in: the
books equal an unconflated stream's at that token, and resuming from it (conflated or not)
continues exactly. Feed gaps keep their meaning."""

from __future__ import annotations

import random
from datetime import timedelta

import grpc
import pytest
from google.protobuf import duration_pb2

from kfeed.v1 import ingest_service_pb2, types_pb2
from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_client.books import LocalOrderBooks
from kfeed_ingest.kalshi.books import LOST, PERIODIC, RESYNC, START, BookChange, checkpoint, micros
from tests.server.test_order_books import levels, stamp
from tests.server.test_stream_order_books import (
    Messages,
    caught_up,
    ladder_of,
    publish_records,
    read_one,
    read_until,
    updates,
)
from tests.support.book_timeline import MARKET, Ladder, Timeline
from tests.support.factories import at, make_gap, make_market
from tests.support.servers import PublishSession, bad_request_fields

OTHER = make_market("KXBOOK-2")
TICKERS = [MARKET.ticker, OTHER.ticker]
Records = list[BookChange | ingest_service_pb2.OrderBookCheckpoint]


def interval(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def two_markets(seed: int, steps: int) -> Records:
    """Two markets' timelines (gaps and checkpoints included), interleaved in random runs."""
    rng = random.Random(seed)
    mine = Timeline(seed=seed, steps=steps).records
    other = Timeline(seed=seed + 1000, steps=steps, ticker=OTHER.ticker).records
    merged: Records = []
    while mine or other:
        source = mine if (mine and rng.random() < 0.5) or not other else other
        take = rng.randint(1, 6)
        merged += source[:take]
        del source[:take]
    return merged


def changes_only(count: int, seed: int) -> Records:
    """Level changes of both markets after every timeline record (300 steps of at most 0.4 s),
    and no full book: a conflated stream shows them only on top of the books it holds."""
    rng = random.Random(seed)
    changes: Records = []
    for index in range(count):
        moment = micros(at(1_000) + timedelta(milliseconds=index))
        side = rng.choice([types_pb2.SIDE_YES, types_pb2.SIDE_NO])
        price, size = rng.randint(1, 9_999), rng.choice([0, 1, 500, rng.randint(1, 10**6)])
        changes.append(
            BookChange(rng.choice(TICKERS), moment, moment, 10_000 + index, side, price, size)
        )
    return changes


def streamed_rows(records: Records) -> int:
    """How many stream rows ``records`` make: changes and full books but PERIODIC ones."""
    return sum(1 for r in records if isinstance(r, BookChange) or r.kind != PERIODIC)


def ladders(books: LocalOrderBooks) -> dict[str, Ladder]:
    return {ticker: ladder_of(books.books.get(ticker)) for ticker in TICKERS}


def applied_books(messages: Messages) -> LocalOrderBooks:
    books = LocalOrderBooks()
    for message in messages:
        books.apply(message)
    return books


def applied(messages: Messages) -> dict[str, Ladder]:
    return ladders(applied_books(messages))


async def server_ladders(stub: pb_grpc.MarketServiceAsyncStub) -> dict[str, Ladder]:
    found = {}
    for ticker in TICKERS:
        book = (await stub.GetOrderBook(pb.GetOrderBookRequest(ticker=ticker))).book
        found[ticker] = levels(book)
    return found


async def read_until_books(
    stream: grpc.aio.UnaryStreamCall[pb.StreamOrderBooksRequest, pb.StreamOrderBooksResponse],
    books: LocalOrderBooks,
    expected: dict[str, Ladder],
) -> Messages:
    """Read and apply messages until ``books`` hold ``expected`` (10 s a message at most)."""
    messages: Messages = []
    while ladders(books) != expected:
        message = await read_one(stream)
        books.apply(message)
        messages.append(message)
    return messages


def book_updates(message: pb.StreamOrderBooksResponse) -> list[tuple[pb.OrderBookUpdate, int]]:
    """The full books a conflated message carries, each with its coalesced count; fails on a
    change (a conflated live stream sends none)."""
    if message.HasField("batch"):
        found = [(u, u.coalesced_count) for u in message.batch.updates]
    else:
        found = [(pb.OrderBookUpdate(book=message.book), message.coalesced_count)]
    assert all(update.HasField("book") for update, _ in found), message
    return found


def conflated_request(**fields: object) -> pb.StreamOrderBooksRequest:
    return pb.StreamOrderBooksRequest(
        tickers=TICKERS,
        conflation_interval=interval(50),
        heartbeat_interval=interval(60_000),
        **fields,  # type: ignore[arg-type]
    )


async def test_conflated_books_hold_every_change_and_resume_exactly(
    publisher: PublishSession, channel: grpc.aio.Channel
) -> None:
    # (seed 7: both markets' recordings end in a fresh book, not LOST, so that the changes after
    # them are the books' changes)
    records = two_markets(seed=7, steps=300)
    history, live, later = records[:150], records[150:], changes_only(150, seed=7)
    await publisher.publish(markets=[MARKET, OTHER])
    await publish_records(publisher, history, 40)
    stub = pb_grpc.MarketServiceStub(channel)
    # The reference: every row, one a message, each with its token.
    reference = stub.StreamOrderBooks(
        pb.StreamOrderBooksRequest(tickers=TICKERS, start_time=stamp(at(0)))
    )
    reference_messages = await read_until(reference, caught_up)
    conflated = stub.StreamOrderBooks(conflated_request(start_time=stamp(at(0))))
    replayed = await read_until(conflated, caught_up)
    # Stored history before the caught-up marker is sent as it is.
    assert updates(replayed) == updates(reference_messages)

    await publish_records(publisher, live, 20)
    expected = await server_ladders(stub)
    books = applied_books(replayed)
    live_messages = await read_until_books(conflated, books, expected)
    last_token = live_messages[-1].resume_token
    reference_messages += await read_until(
        reference, lambda messages: bool(messages) and messages[-1].resume_token == last_token
    )
    assert applied(reference_messages) == expected
    shown = [pair for message in live_messages for pair in book_updates(message)]
    assert len(shown) < streamed_rows(live)
    assert sum(count for _, count in shown) == streamed_rows(live)  # every row folded once
    for message in live_messages:
        tickers = [update.book.ticker for update, _ in book_updates(message)]
        assert len(tickers) == len(set(tickers))  # one book per market per message

    tokens = [message.resume_token for message in reference_messages]
    for index, message in enumerate(live_messages):
        # The token is the position of the last row folded in: the books are the
        # unconflated stream's there.
        position = tokens.index(message.resume_token)
        assert applied(replayed + live_messages[: index + 1]) == applied(
            reference_messages[: position + 1]
        ), index
    for index in random.Random(7).sample(range(len(live_messages)), min(4, len(live_messages))):
        token = live_messages[index].resume_token
        position = tokens.index(token)
        resumed = stub.StreamOrderBooks(
            pb.StreamOrderBooksRequest(tickers=TICKERS, resume_token=token)
        )
        rest = await read_until(resumed, caught_up)
        resumed.cancel()
        # no gap, no duplicate
        assert updates(rest) == updates(reference_messages[position + 1 :]), index

    # Resumed conflated, mid-way (the replay as it is, then conflated books built on it) and
    # at the end (nothing to replay: the books are the server's latest, not sent).
    followers = []
    for index in (len(live_messages) // 2, len(live_messages) - 1):
        stream = stub.StreamOrderBooks(
            conflated_request(resume_token=live_messages[index].resume_token)
        )
        books = applied_books(replayed + live_messages[: index + 1])
        for message in await read_until(stream, caught_up):
            books.apply(message)
        assert ladders(books) == expected
        followers.append((stream, books))
    await publish_records(publisher, later, 20)
    expected = await server_ladders(stub)
    for stream, books in followers:
        later_messages = await read_until_books(stream, books, expected)
        folded = [count for message in later_messages for _, count in book_updates(message)]
        assert sum(folded) == len(later)
        stream.cancel()
    reference.cancel()
    conflated.cancel()


async def test_feed_gaps_keep_their_meaning_when_conflated(
    publisher: PublishSession, channel: grpc.aio.Channel
) -> None:
    await publisher.publish(markets=[MARKET, OTHER])
    stub = pb_grpc.MarketServiceStub(channel)
    stream = stub.StreamOrderBooks(conflated_request(depth=1))
    assert (await read_until(stream, caught_up))[-1].caught_up.replayed_count == 0
    ticker = MARKET.ticker
    steps: list[tuple[Records, Ladder, bool]] = [
        (
            [
                checkpoint(ticker, START, at(1), at(1), 1, {20: 1, 30: 4}, {}),
                BookChange(ticker, micros(at(2)), micros(at(2)), 2, types_pb2.SIDE_NO, 7000, 5),
            ],
            ([(30, 4)], [(7000, 5)]),
            False,
        ),
        (
            [checkpoint(ticker, LOST, at(3), at(3), None, {20: 1}, {7000: 5})],
            ([(20, 1)], [(7000, 5)]),
            True,
        ),
        ([checkpoint(ticker, RESYNC, at(5), at(5), 9, {40: 2}, {})], ([(40, 2)], []), False),
    ]
    for records, ladder, flagged in steps:
        await publish_records(publisher, records, 10)
        message = await read_one(stream)
        [(update, count)] = book_updates(message)
        assert levels(update.book) == ladder  # at the depth asked
        assert update.book.in_feed_gap is flagged
        assert count == len(records)
    await publisher.publish(gaps=[make_gap(1, ticker=ticker, channel="orderbook_delta")])
    message = await read_one(stream)
    assert message.feed_gap.ticker == ticker
    stream.cancel()


@pytest.mark.parametrize(
    "conflation",
    [interval(9), duration_pb2.Duration(seconds=61), duration_pb2.Duration(seconds=-1)],
)
async def test_a_conflation_interval_out_of_range_is_invalid_argument(
    publisher: PublishSession, channel: grpc.aio.Channel, conflation: duration_pb2.Duration
) -> None:
    await publisher.publish(markets=[MARKET])
    stub = pb_grpc.MarketServiceStub(channel)
    request = pb.StreamOrderBooksRequest(tickers=[MARKET.ticker], conflation_interval=conflation)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_until(stub.StreamOrderBooks(request), caught_up)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["conflation_interval"]
