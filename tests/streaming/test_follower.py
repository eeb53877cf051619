"""CommitFollower on a real PostgreSQL database, driven by hand-fed notices: what it publishes,
and what it reads back after notices were lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from kfeed_server.db import create_engine
from kfeed_server.db.commits import CommitNotice, Resync
from kfeed_server.db.repositories import Repositories, build_repositories
from kfeed_server.streaming.follower import CommitFollower
from kfeed_server.streaming.hub import MarketSelector, SnapshotHub, StreamKind, Subscription
from tests.support.factories import make_gap, make_market, make_snapshot, make_trade
from tests.support.waiting import eventually

MARKET = make_market("KXFOLLOW-A", event_ticker="EV-FOLLOW")


class Followed:
    """A follower fed from a queue, a hub subscription, and the repositories of its database."""

    def __init__(self, repositories: Repositories, origin: str) -> None:
        self.repositories = repositories
        self.hub = SnapshotHub()
        self.follower = CommitFollower(
            self.hub,
            repositories.snapshots,
            repositories.feed_gaps,
            repositories.markets,
            origin,
            repositories.trades,
            repositories.books,
        )
        self.subscription: Subscription = self.hub.subscribe(MarketSelector())
        self.notices: asyncio.Queue[CommitNotice | Resync] = asyncio.Queue()
        self.asked = 0

    async def _notices(self) -> AsyncIterator[CommitNotice | Resync]:
        while True:
            # The follower asks for notice N+1 only once it is done with notice N.
            self.asked += 1
            yield await self.notices.get()

    async def handled(self, count: int) -> None:
        """Until the follower has handled ``count`` notices (the first Resync included)."""
        await eventually(lambda: self.asked > count, what=f"{count} notices handled")

    def published_ids(self) -> list[int]:
        return [getattr(item, "snapshot_id", -1) for item in self.subscription.take_all()]


@pytest.fixture
async def followed(postgres_url: str) -> AsyncIterator[Followed]:
    engine = create_engine(postgres_url)
    followed = Followed(build_repositories(engine), origin="this-process")
    task = asyncio.ensure_future(followed.follower.follow(followed._notices()))
    followed.notices.put_nowait(Resync())
    await asyncio.wait_for(followed.follower.listening.wait(), 10)
    try:
        yield followed
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await engine.dispose()


async def test_nothing_is_published_without_a_notice_and_a_resync_reads_it_back(
    followed: Followed,
) -> None:
    await followed.handled(1)  # the start's Resync: the follower now waits for a notice
    writer = followed.repositories.ingest  # another origin: this follower never hears of it
    await writer.write_batch(markets=[MARKET])
    stored = await writer.write_batch(snapshots=[make_snapshot(MARKET.ticker, i) for i in range(4)])
    assert followed.published_ids() == []  # it is still waiting: only a notice moves it
    followed.notices.put_nowait(Resync())
    await eventually(lambda: followed.subscription.depth == 4)
    assert followed.published_ids() == [s.snapshot_id for s in stored.stored_snapshots]


async def test_a_notice_from_another_server_is_read_from_the_database(
    followed: Followed,
) -> None:
    writer = followed.repositories.ingest
    await writer.write_batch(markets=[MARKET])
    result = await writer.write_batch(
        snapshots=[make_snapshot(MARKET.ticker, i) for i in range(3)],
        feed_gaps=[make_gap(0, ticker=MARKET.ticker)],
    )
    ids = [s.snapshot_id for s in result.stored_snapshots]
    notice = CommitNotice(
        "another-server", 1, ids[0], ids[-1], tuple(g.gap_id for g in result.stored_gaps)
    )
    followed.notices.put_nowait(notice)
    # Rows already published are never published again (ids only go up).
    followed.notices.put_nowait(CommitNotice("another-server", 2, ids[0], ids[-1]))
    await followed.handled(3)  # the start's Resync and both notices
    items = followed.subscription.take_all()
    assert len(items) == 4
    assert [getattr(i, "snapshot_id", None) for i in items[:3]] == ids
    assert getattr(items[3], "gap_id", None) == result.stored_gaps[0].gap_id
    assert followed.hub.unknown_tickers({MARKET.ticker}) == set()  # learnt from the database


async def test_own_batches_are_published_from_memory_when_their_notice_comes(
    followed: Followed,
) -> None:
    result = await followed.repositories.ingest.write_batch(
        markets=[MARKET], snapshots=[make_snapshot(MARKET.ticker, 0)]
    )
    assert result.notice_batch is not None
    kept = result.stored_snapshots[0]._replace(volume=-1)  # tells the kept copy from a read
    own = type(result)(result.counts, [kept], [], result.notice_batch)
    followed.follower.committed([MARKET], own)
    followed.notices.put_nowait(
        CommitNotice("this-process", result.notice_batch, kept.snapshot_id, kept.snapshot_id)
    )
    await eventually(lambda: followed.subscription.depth == 1)
    assert followed.subscription.take_all() == [kept]


async def test_an_own_notice_that_comes_first_waits_for_its_batch(followed: Followed) -> None:
    result = await followed.repositories.ingest.write_batch(
        markets=[MARKET], snapshots=[make_snapshot(MARKET.ticker, 0)]
    )
    assert result.notice_batch is not None
    kept = result.stored_snapshots[0]._replace(volume=-1)
    followed.notices.put_nowait(
        CommitNotice("this-process", result.notice_batch, kept.snapshot_id, kept.snapshot_id)
    )
    # The follower took the notice, and waits for the servicer's hand-over of its batch.
    await eventually(lambda: followed.asked == 2 and followed.notices.empty())
    assert followed.subscription.depth == 0
    own = type(result)(result.counts, [kept], [], result.notice_batch)
    followed.follower.committed([MARKET], own)
    await eventually(lambda: followed.subscription.depth == 1)
    assert followed.subscription.take_all() == [kept]


async def test_trades_reach_trade_subscriptions_by_notice_and_by_resync(
    followed: Followed,
) -> None:
    tape = followed.hub.subscribe(MarketSelector(), kind=StreamKind.TRADES)
    writer = followed.repositories.ingest
    await writer.write_batch(markets=[MARKET])
    first = await writer.write_batch(trades=[make_trade(MARKET.ticker, i) for i in range(3)])
    ids = [t.stream_id for t in first.stored_trades]
    notice = CommitNotice("another-server", 1, first_trade_id=ids[0], last_trade_id=ids[-1])
    followed.notices.put_nowait(CommitNotice.parse(notice.payload()) or notice)
    await eventually(lambda: tape.depth == 3)
    second = await writer.write_batch(trades=[make_trade(MARKET.ticker, i) for i in range(3, 5)])
    followed.notices.put_nowait(Resync())  # notices missed: the resync reads the rest back
    await eventually(lambda: tape.depth == 5)
    taken = tape.take_all()
    assert [getattr(t, "stream_id", -1) for t in taken] == [
        *ids,
        *(t.stream_id for t in second.stored_trades),
    ]
    assert followed.subscription.take_all() == []  # snapshot streams never see trades
