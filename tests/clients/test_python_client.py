"""kfeed_client against a real server: helpers, paging, errors and the resuming stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest

from kfeed.v1 import market_service_pb2 as pb
from kfeed_client import KfeedClient, RetryPolicy, connect
from kfeed_client.books import LocalOrderBooks
from tests.server.test_order_books import levels
from tests.server.test_stream_order_books import publish_records
from tests.support.book_timeline import MARKET as BOOK_MARKET
from tests.support.book_timeline import Timeline
from tests.support.clients import MARKETS, SNAPSHOT_COUNT, TICKER, TcpProxy
from tests.support.factories import at, make_snapshot
from tests.support.servers import PublishSession

FAST_RETRY = RetryPolicy(initial_backoff=0.01, max_backoff=0.05)
Messages = list[pb.StreamSnapshotsResponse]


@pytest.fixture
async def client(address: str) -> AsyncIterator[KfeedClient]:
    async with connect(address) as kfeed:
        yield kfeed


async def next_messages(stream: AsyncIterator[pb.StreamSnapshotsResponse], n: int) -> Messages:
    """The next ``n`` non-heartbeat messages, failing after 10 s rather than hanging."""

    async def take() -> Messages:
        taken: Messages = []
        async for message in stream:
            if not message.HasField("heartbeat"):
                taken.append(message)
            if len(taken) == n:
                break
        return taken

    return await asyncio.wait_for(take(), timeout=10)


def yes_bids(messages: Messages) -> list[int]:
    return [m.snapshot.snapshot.yes_bid.ten_thousandths for m in messages if m.HasField("snapshot")]


async def test_unary_helpers(client: KfeedClient, seeded: PublishSession) -> None:
    market = await client.get_market(TICKER)
    latest = await client.latest_snapshot(TICKER)
    assert market.title == MARKETS[0].title
    assert latest.yes_bid.ten_thousandths == 4_000 + SNAPSHOT_COUNT - 1


async def test_helpers_follow_every_page(client: KfeedClient, seeded: PublishSession) -> None:
    tickers = [m.ticker async for m in client.list_markets(page_size=2)]
    snapshots = [s async for s in client.iter_snapshots(TICKER, page_size=3)]
    trades = [t async for t in client.iter_trades(TICKER, page_size=2)]
    assert tickers == sorted(m.ticker for m in MARKETS)
    assert [s.yes_bid.ten_thousandths for s in snapshots] == [4_000 + i for i in range(7)]
    assert len(trades) == 3


async def test_snapshot_window_is_start_inclusive_end_exclusive(
    client: KfeedClient, seeded: PublishSession
) -> None:
    window = [s async for s in client.iter_snapshots(TICKER, at(2), at(5), page_size=2)]
    assert [s.yes_bid.ten_thousandths for s in window] == [4_002, 4_003, 4_004]


async def test_errors_carry_the_server_status(client: KfeedClient, seeded: PublishSession) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.get_market("KXNOPE")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_naive_datetimes_are_refused(client: KfeedClient) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _ = [s async for s in client.iter_snapshots(TICKER, start=at(0).replace(tzinfo=None))]


async def test_stream_replays_then_goes_live(client: KfeedClient, seeded: PublishSession) -> None:
    stream = client.stream_snapshots([TICKER], start_time=at(4))
    history = await next_messages(stream, 4)
    await seeded.publish(snapshots=[make_snapshot(TICKER, 7)])
    live = await next_messages(stream, 1)
    await stream.aclose()
    assert yes_bids(history) == [4_004, 4_005, 4_006]
    assert history[-1].caught_up.replayed_count == 3
    assert yes_bids(live) == [4_007]


async def test_stream_resumes_after_a_disconnect_without_gap_or_duplicate(
    proxy: TcpProxy, seeded: PublishSession
) -> None:
    async with connect(f"127.0.0.1:{proxy.port}") as client:
        stream = client.stream_snapshots([TICKER], start_time=at(0), retry=FAST_RETRY)
        before = await next_messages(stream, SNAPSHOT_COUNT + 1)  # history + caught up
        await seeded.publish(snapshots=[make_snapshot(TICKER, i) for i in range(7, 10)])
        live_before_cut = await next_messages(stream, 3)
        proxy.sever()
        # Stored while the client is cut off: it must get these from the replay.
        await seeded.publish(snapshots=[make_snapshot(TICKER, i) for i in range(10, 14)])
        after = await next_messages(stream, 5)  # 4 replayed + the new caught-up marker
        await seeded.publish(snapshots=[make_snapshot(TICKER, 14)])
        live_after = await next_messages(stream, 1)
        await stream.aclose()
    received = [*before, *live_before_cut, *after, *live_after]
    assert yes_bids(received) == [4_000 + i for i in range(15)]
    assert [m.caught_up.replayed_count for m in received if m.HasField("caught_up")] == [7, 4]
    assert proxy.connections == 2


async def test_stream_stops_on_a_status_retrying_cannot_fix(client: KfeedClient) -> None:
    stream = client.stream_snapshots(["KXNOPE"], retry=FAST_RETRY)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await next_messages(stream, 1)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_stream_gives_up_after_max_attempts(unused_tcp_port: int) -> None:
    policy = RetryPolicy(initial_backoff=0.01, max_backoff=0.01, max_attempts=2)
    async with connect(f"127.0.0.1:{unused_tcp_port}") as client:
        stream = client.stream_snapshots(retry=policy)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await next_messages(stream, 1)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_batched_history_is_yielded_one_snapshot_each_with_its_own_token(
    client: KfeedClient, seeded: PublishSession
) -> None:
    stream = client.stream_snapshots([TICKER], start_time=at(0), max_batch_size=4)
    first_three = await next_messages(stream, 3)  # stops inside the first batch of four
    await stream.aclose()
    assert [m.WhichOneof("event") for m in first_three] == ["snapshot"] * 3
    assert all(m.resume_token for m in first_three)
    resumed = client.stream_snapshots([TICKER], resume_token=first_three[-1].resume_token)
    rest = await next_messages(resumed, SNAPSHOT_COUNT - 3 + 1)  # the rest + caught up
    await resumed.aclose()
    assert yes_bids([*first_three, *rest]) == [4_000 + i for i in range(SNAPSHOT_COUNT)]
    assert rest[-1].caught_up.replayed_count == SNAPSHOT_COUNT - 3


async def test_a_conflated_book_stream_applied_locally_ends_as_get_order_book(
    client: KfeedClient, publisher: PublishSession
) -> None:
    timeline = Timeline(seed=3, steps=200)
    await publisher.publish(markets=[BOOK_MARKET])
    await publish_records(publisher, timeline.records[:50], 25)
    stream = client.stream_order_books(
        [BOOK_MARKET.ticker], conflation_interval=timedelta(milliseconds=20), max_batch_size=0
    )
    books = LocalOrderBooks()

    async def apply_until(expected: tuple[list[tuple[int, int]], list[tuple[int, int]]]) -> int:
        """Apply messages until the local book is ``expected``; how many changes came."""
        changes = 0
        async for message in stream:
            changes += message.HasField("change")
            book = books.apply(message)
            if book is not None and (book.yes_bids(), book.no_bids()) == expected:
                return changes
        raise AssertionError("the stream ended")

    async def server_book() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        response = await client.markets.GetOrderBook(
            pb.GetOrderBookRequest(ticker=BOOK_MARKET.ticker)
        )
        return levels(response.book)

    await asyncio.wait_for(apply_until(await server_book()), timeout=10)
    await publish_records(publisher, timeline.records[50:], 10)
    changes = await asyncio.wait_for(apply_until(await server_book()), timeout=10)
    assert changes == 0  # live, only whole books: each replaces the local one
    await stream.aclose()
