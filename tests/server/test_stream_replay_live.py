"""Property tests of the replay→live switch of StreamOrderBooks and StreamTrades on a real server
(loopback gRPC, both databases): a seeded generator draws the markets, the history stored
before the stream starts, where it starts (a past time or live), which markets it follows,
max_batch_size, and the batches a writer publishes while the stream replays — commits land
between the replay's history reads (pages are made small) and across the switch. Whatever the
draw: one caught-up marker, no gap and no duplicate, the applied books equal GetOrderBook at the
end, and resuming from any token continues exactly. And the race forced: rows older than a
stream's start_time that commit only after it went live are left out, as its replay leaves
them out, and so by a stream resumed with the same start_time."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2

from kfeed.v1 import ingest_service_pb2, types_pb2
from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_client.books import LocalOrderBooks
from kfeed_ingest.kalshi.books import BookChange
from kfeed_server.records import TradeRecord
from kfeed_server.streaming import feed as feed_module
from kfeed_server.transport.convert import timestamp
from tests.server.test_order_books import levels
from tests.server.test_stream_order_books import ladder_of, updates
from tests.support.book_timeline import Timeline, request_of
from tests.support.factories import at, make_market, make_snapshot, make_trade
from tests.support.servers import PublishSession

SEEDS = range(4)
HEARTBEAT = duration_pb2.Duration(nanos=200_000_000)
T = TypeVar("T")
BookRecord = BookChange | ingest_service_pb2.OrderBookCheckpoint


@pytest.fixture(autouse=True)
def small_replay_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several history pages per stream, so commits can land between them.
    monkeypatch.setattr(feed_module, "REPLAY_PAGE_SIZE", 7)


def interleaved(rng: random.Random, streams: Sequence[Sequence[T]]) -> list[T]:
    """The items of ``streams`` merged at random, each stream's order kept."""
    positions = [0] * len(streams)
    merged: list[T] = []
    while live := [i for i, s in enumerate(streams) if positions[i] < len(s)]:
        chosen = rng.choice(live)
        merged.append(streams[chosen][positions[chosen]])
        positions[chosen] += 1
    return merged


def cut(rng: random.Random, items: list[T]) -> list[list[T]]:
    batches: list[list[T]] = []
    while items:
        size = rng.randint(1, 25)
        batches.append(items[:size])
        items = items[size:]
    return batches


async def write(rng: random.Random, batches: list[Callable[[], Awaitable[None]]]) -> None:
    """Publish the batches one by one, yielding to the loop a random number of times between."""
    for publish in batches:
        for _ in range(rng.randint(0, 3)):
            await asyncio.sleep(0)
        await publish()


R = TypeVar("R")


async def read_one(stream: grpc.aio.UnaryStreamCall[R, T]) -> T:
    message = await asyncio.wait_for(stream.read(), timeout=10)
    assert message is not grpc.aio.EOF
    return message  # type: ignore[return-value]


@pytest.mark.parametrize("seed", SEEDS)
async def test_order_books_replay_then_live_while_commits_race_the_switch(
    publisher: PublishSession, channel: grpc.aio.Channel, seed: int
) -> None:
    rng = random.Random(seed)
    markets = [make_market(f"KXBOOKRACE-{i}") for i in range(3)]
    await publisher.publish(markets=markets)
    timelines = [
        Timeline(seed * 10 + i, rng.randint(20, 70), market.ticker)
        for i, market in enumerate(markets)
    ]
    records = interleaved(rng, [timeline.records for timeline in timelines])

    def sender(batch: list[BookRecord]) -> Callable[[], Awaitable[None]]:
        async def send() -> None:
            assert (await publisher.send(request_of(batch, 0))).code == code_pb2.OK

        return send

    batches = [sender(batch) for batch in cut(rng, records)]
    before = rng.randint(0, len(batches))
    for publish in batches[:before]:
        await publish()
    followed = rng.sample([m.ticker for m in markets], rng.randint(0, 2))  # 0: all
    selected = followed or [m.ticker for m in markets]
    request = pb.StreamOrderBooksRequest(
        tickers=followed, max_batch_size=rng.choice([0, 1, 3, 100]), heartbeat_interval=HEARTBEAT
    )
    if rng.random() < 0.6:
        request.start_time.CopyFrom(timestamp(at(rng.uniform(0, 8))))
    stub = pb_grpc.MarketServiceStub(channel)
    stream = stub.StreamOrderBooks(request)
    writing = asyncio.create_task(write(rng, batches[before:]))
    messages: list[pb.StreamOrderBooksResponse] = []
    books = LocalOrderBooks()
    final: dict[str, object] | None = None
    while True:
        message = await read_one(stream)
        messages.append(message)
        books.apply(message)
        if final is None and writing.done():
            final = {
                ticker: levels(
                    (await stub.GetOrderBook(pb.GetOrderBookRequest(ticker=ticker))).book
                )
                for ticker in selected
            }
        # Quiet (a heartbeat) after the last commit, with every book as the server has it.
        if (
            final is not None
            and message.HasField("heartbeat")
            and all(ladder_of(books.books.get(ticker)) == final[ticker] for ticker in selected)
        ):
            break
    stream.cancel()
    await writing
    assert [m.WhichOneof("event") for m in messages].count("caught_up") == 1
    assert all(m.resume_token for m in messages)
    changes = [
        (c.ticker, c.exchange_time.ToMicroseconds(), c.side, c.price.ten_thousandths,
         c.exchange_sequence)
        for update in map(pb.OrderBookUpdate.FromString, updates(messages))
        if update.HasField("change")
        for c in [update.change]
    ]  # fmt: skip
    assert len(changes) == len(set(changes))  # no duplicate
    assert {c[0] for c in changes} <= set(selected)
    if request.HasField("start_time"):  # no gap: every change after the start came
        start = request.start_time.ToMicroseconds()
        published = {
            (r.ticker, r.exchange_time_us, r.side, r.price, r.sequence)
            for r in records
            if isinstance(r, BookChange) and r.ticker in selected and r.exchange_time_us > start
        }
        assert published <= set(changes)
    # Resuming from any token after the starting books continues exactly.
    starting = next(
        (i for i, m in enumerate(messages) if m.resume_token != messages[0].resume_token),
        len(messages),
    )
    positions = range(max(starting - 1, 0), len(messages))
    for position in rng.sample(positions, min(3, len(positions))):
        resumed_request = pb.StreamOrderBooksRequest(
            tickers=followed,
            resume_token=messages[position].resume_token,
            max_batch_size=request.max_batch_size,
        )
        resumed = stub.StreamOrderBooks(resumed_request)
        rest: list[pb.StreamOrderBooksResponse] = []
        while not (rest and rest[-1].HasField("caught_up")):
            rest.append(await read_one(resumed))
        resumed.cancel()
        assert updates(messages[: position + 1]) + updates(rest) == updates(messages), position


@pytest.mark.parametrize("seed", SEEDS)
async def test_trades_replay_then_live_while_commits_race_the_switch(
    publisher: PublishSession, channel: grpc.aio.Channel, seed: int
) -> None:
    rng = random.Random(seed)
    markets = [make_market(f"KXTAPERACE-{i}") for i in range(3)]
    await publisher.publish(markets=markets)
    tapes = [[market.ticker] * rng.randint(10, 60) for market in markets]
    # One tape, in time order as the exchange prints it, the markets interleaved.
    trades = [make_trade(ticker, i) for i, ticker in enumerate(interleaved(rng, tapes))]

    def sender(batch: list[TradeRecord]) -> Callable[[], Awaitable[None]]:
        async def send() -> None:
            assert (await publisher.publish(trades=batch)).code == code_pb2.OK

        return send

    batches = [sender(batch) for batch in cut(rng, trades)]
    before = rng.randint(0, len(batches))
    for publish in batches[:before]:
        await publish()
    followed = rng.sample([m.ticker for m in markets], rng.randint(0, 2))  # 0: all
    selected = set(followed or [m.ticker for m in markets])
    in_commit_order = [t.trade_id for t in trades if t.ticker in selected]
    request = pb.StreamTradesRequest(
        tickers=followed, max_batch_size=rng.choice([0, 1, 3, 100]), heartbeat_interval=HEARTBEAT
    )
    if rng.random() < 0.6:
        request.start_time.CopyFrom(timestamp(at(rng.randint(0, len(trades) + 5))))
    # Once the writer is done and the stream is live, one last trade on a followed market,
    # later than every start: the stream delivers in commit order, so when it arrives everything
    # committed before it has too (a heartbeat proves nothing here: under load the commit
    # follower can be slower than it). Sent before the stream is live, a live-only stream could
    # miss it.
    last = make_trade(sorted(selected)[0], len(trades) + 10)
    in_commit_order.append(last.trade_id)
    stub = pb_grpc.MarketServiceStub(channel)
    stream = stub.StreamTrades(request)
    writing = asyncio.create_task(write(rng, batches[before:]))
    messages: list[pb.StreamTradesResponse] = []
    received: list[str] = []
    last_sent = False
    while last.trade_id not in received:
        live = any(m.HasField("caught_up") for m in messages)
        if live and writing.done() and not last_sent:
            await writing
            await sender([last])()
            last_sent = True
        message = await read_one(stream)
        messages.append(message)
        received += [t.trade_id for t in trade_list(message)]
    while not messages[-1].HasField("heartbeat"):  # anything sent after it (a duplicate) counts
        messages.append(await read_one(stream))
        received += [t.trade_id for t in trade_list(messages[-1])]
    stream.cancel()
    await writing
    assert [m.WhichOneof("event") for m in messages].count("caught_up") == 1
    assert all(m.resume_token for m in messages)
    if request.HasField("start_time"):
        start = request.start_time.ToDatetime(tzinfo=trades[0].create_time.tzinfo)
        by_id = {t.trade_id: t for t in [*trades, last]}
        assert received == [i for i in in_commit_order if by_id[i].create_time >= start]
    else:  # live: from some point on, every trade, in commit order, once
        assert received == in_commit_order[len(in_commit_order) - len(received) :]
    for position in rng.sample(range(len(messages)), min(3, len(messages))):
        # The same start_time with the token: it selects the rows after the token's position.
        resumed_request = pb.StreamTradesRequest(
            tickers=followed,
            resume_token=messages[position].resume_token,
            max_batch_size=request.max_batch_size,
        )
        if request.HasField("start_time"):
            resumed_request.start_time.CopyFrom(request.start_time)
        resumed = stub.StreamTrades(resumed_request)
        rest: list[pb.StreamTradesResponse] = []
        while not (rest and rest[-1].HasField("caught_up")):
            rest.append(await read_one(resumed))
        resumed.cancel()
        ids = [t.trade_id for m in [*messages[: position + 1], *rest] for t in trade_list(m)]
        assert ids == received, position


def trade_list(message: pb.StreamTradesResponse) -> list[types_pb2.Trade]:
    if message.HasField("trade"):
        return [message.trade]
    return list(message.trade_batch.trades)


# Rows at these seconds are stored before the streams open; the start is between them.
STORED_AT = (0, 10, 20, 30)
START = 25
# Then, once the streams are live: rows older than the start (alone, and in one batch with a
# newer one), then a row later than everything, published last.
LIVE_BATCHES = ((5,), (15, 35), (40,))
LAST = 40
StreamResponse = pb.StreamSnapshotsResponse | pb.StreamTradesResponse
RowStream = (
    grpc.aio.UnaryStreamCall[pb.StreamSnapshotsRequest, pb.StreamSnapshotsResponse]
    | grpc.aio.UnaryStreamCall[pb.StreamTradesRequest, pb.StreamTradesResponse]
)


class Rows:
    """Snapshots or trades of one market for the start_time tests: publish rows at given
    seconds, open a stream, and read which rows (by their second) a message carries."""

    def __init__(self, kind: str, publisher: PublishSession, channel: grpc.aio.Channel) -> None:
        self.kind = kind
        self.ticker = f"KXSTART-{kind.upper()}"
        self._publisher = publisher
        self._stub = pb_grpc.MarketServiceStub(channel)

    async def publish(self, seconds: Sequence[int]) -> None:
        if self.kind == "trades":
            ack = await self._publisher.publish(
                trades=[make_trade(self.ticker, s) for s in seconds]
            )
        else:
            ack = await self._publisher.publish(
                snapshots=[make_snapshot(self.ticker, s) for s in seconds]
            )
        assert ack.code == code_pb2.OK

    def open(self, start: int | None = None, resume_token: str = "") -> RowStream:
        request = pb.StreamTradesRequest() if self.kind == "trades" else pb.StreamSnapshotsRequest()
        request.tickers.append(self.ticker)
        request.resume_token = resume_token
        request.heartbeat_interval.CopyFrom(HEARTBEAT)
        request.max_batch_size = 3
        if start is not None:
            request.start_time.CopyFrom(timestamp(at(start)))
        if isinstance(request, pb.StreamTradesRequest):
            return self._stub.StreamTrades(request)
        return self._stub.StreamSnapshots(request)

    def seconds(self, message: StreamResponse) -> list[int]:
        """The rows ``message`` carries, by their exchange (trade: create) second."""
        if isinstance(message, pb.StreamTradesResponse):
            times = [t.create_time for t in trade_list(message)]
        else:
            singles = [message.snapshot] if message.HasField("snapshot") else []
            batched = message.snapshot_batch.updates
            times = [u.snapshot.exchange_time for u in [*singles, *batched]]
        base = timestamp(at(0)).seconds
        return [time.seconds - base for time in times]


async def read_rows(
    rows: Rows,
    stream: RowStream,
    until: Callable[[StreamResponse], bool],
) -> tuple[list[StreamResponse], list[int]]:
    """Messages up to the first ``until`` accepts, and the rows they carried."""
    messages: list[StreamResponse] = []
    while not (messages and until(messages[-1])):
        message = await asyncio.wait_for(stream.read(), timeout=10)
        assert isinstance(message, (pb.StreamSnapshotsResponse, pb.StreamTradesResponse))
        messages.append(message)
    return messages, [s for m in messages for s in rows.seconds(m)]


def is_caught_up(message: StreamResponse) -> bool:
    return message.HasField("caught_up")


@pytest.mark.parametrize("kind", ["snapshots", "trades"])
async def test_start_time_leaves_out_old_rows_committed_after_the_stream_went_live(
    publisher: PublishSession, channel: grpc.aio.Channel, kind: str
) -> None:
    """The race forced: rows older than the start commit only once the stream is live. The
    stream with the start leaves them out as its replay would have; one without a start (live)
    delivers them; resuming the filtered stream from a token before they committed, with the
    same start_time, leaves them out too — and the resuming request's start_time is what
    selects: without one, they come."""
    rows = Rows(kind, publisher, channel)
    await publisher.publish(markets=[make_market(rows.ticker)])
    await rows.publish(STORED_AT)
    filtered, live = rows.open(START), rows.open()
    history, replayed = await read_rows(rows, filtered, is_caught_up)
    await read_rows(rows, live, is_caught_up)
    assert replayed == [30]
    for batch in LIVE_BATCHES:
        await rows.publish(batch)

    def has_last(message: StreamResponse) -> bool:
        return LAST in rows.seconds(message)

    _, after_start = await read_rows(rows, filtered, has_last)
    _, everything = await read_rows(rows, live, has_last)
    # Rows sent after the last one (a duplicate) would come before the next heartbeat.
    _, extra = await read_rows(rows, filtered, lambda m: m.HasField("heartbeat"))
    filtered.cancel()
    live.cancel()
    assert after_start == [35, 40]
    assert everything == [5, 15, 35, 40]
    assert extra == []
    token = history[-1].resume_token  # at the switch, before the live rows committed
    for start, expected in ((START, [35, 40]), (None, [5, 15, 35, 40])):
        resumed = rows.open(start, resume_token=token)
        _, rest = await read_rows(rows, resumed, is_caught_up)
        resumed.cancel()
        assert rest == expected, start
