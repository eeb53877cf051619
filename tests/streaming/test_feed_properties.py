"""Property tests of the replay→live switch (domain layer: the real hub and feed, an in-memory
store that commits in id order like the server; the feed's items are turned into the wire
responses a subscriber would get, batched or not). Hypothesis draws the interleavings: how the
writer's commits fall between the feed's history reads, batch sizes, markets, where the
subscriber starts, max_batch_size. Whatever the schedule: no gap, no duplicate, one caught-up
marker, and every response's token resumes after the last snapshot it carried."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kfeed.v1 import market_service_pb2 as pb
from kfeed_server.records import SnapshotRecord
from kfeed_server.streaming import feed as feed_module
from kfeed_server.streaming.feed import FeedRequest, feed_items
from kfeed_server.streaming.hub import MarketSelector, SnapshotHub
from kfeed_server.transport.requests import RequestTokens, new_token_key
from kfeed_server.transport.stream_frames import SnapshotFrames
from tests.support.factories import at, make_snapshot, replay_columns

TICKERS = ("KX-A", "KX-B", "KX-C")

TOKENS = RequestTokens(new_token_key())


class CommittingStore:
    """Committed snapshots in id order. A read sees the rows committed when it starts and yields
    to the loop before returning them, as a query does: commits land while results travel."""

    def __init__(self) -> None:
        self.rows: list[SnapshotRecord] = []

    def commit(self, batch: Sequence[SnapshotRecord]) -> list[SnapshotRecord]:
        stored = [s.with_id(len(self.rows) + i + 1) for i, s in enumerate(batch)]
        self.rows.extend(stored)
        return stored

    async def list_after_id(
        self,
        after_id: int,
        *,
        tickers: Sequence[str] | None,
        limit: int,
        min_exchange_time: datetime | None = None,
    ) -> list[SnapshotRecord]:
        rows = [
            r
            for r in self.rows
            if r.snapshot_id > after_id
            and (tickers is None or r.ticker in tickers)
            and (min_exchange_time is None or r.exchange_time >= min_exchange_time)
        ]
        await asyncio.sleep(0)
        return rows[:limit]

    async def snapshots_after_id(
        self,
        after_id: int,
        *,
        tickers: Sequence[str] | None,
        min_exchange_time: datetime | None,
        limit: int,
    ) -> AsyncIterator[pa.RecordBatch]:
        """The same rows as columns, in batches of two (a query yields several)."""
        rows = await self.list_after_id(
            after_id, tickers=tickers, limit=limit, min_exchange_time=min_exchange_time
        )
        for start in range(0, len(rows), 2):
            yield replay_columns(rows[start : start + 2])
            await asyncio.sleep(0)

    async def latest_per_market(self, tickers: Sequence[str] | None) -> list[SnapshotRecord]:
        latest: dict[str, SnapshotRecord] = {}
        for row in self.rows:
            if tickers is None or row.ticker in tickers:
                latest[row.ticker] = row
        await asyncio.sleep(0)
        return list(latest.values())

    async def max_stream_id(self) -> int:
        count = len(self.rows)
        await asyncio.sleep(0)
        return count


batches = st.lists(
    st.tuples(st.integers(1, 6), st.integers(0, 3), st.sampled_from(TICKERS)), max_size=12
)


@pytest.fixture(autouse=True)
def small_replay_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several history pages per stream, so commits can land between them.
    monkeypatch.setattr(feed_module, "REPLAY_PAGE_SIZE", 3)
    monkeypatch.setattr(feed_module, "ROWS_BEFORE_COLUMNS", 3)
    monkeypatch.setattr(feed_module, "COLUMN_REPLAY_ROWS", 5)


@settings(max_examples=250, deadline=None)
@given(
    before=st.integers(0, 10),
    schedule=batches,
    start=st.sampled_from(["time", "resume", "live"]),
    followed=st.sets(st.sampled_from(TICKERS), max_size=2),
    max_batch_size=st.sampled_from([0, 1, 2, 5, 500]),
    columns=st.booleans(),
)
def test_no_gap_and_no_duplicate_across_the_switch(
    before: int,
    schedule: list[tuple[int, int, str]],
    start: str,
    followed: set[str],
    max_batch_size: int,
    columns: bool,
) -> None:
    """``columns``: history after the first page read as columns, as a snapshot stream does."""
    asyncio.run(_run(before, schedule, start, frozenset(followed), max_batch_size, columns))


def _snapshot_ids(message: pb.StreamSnapshotsResponse) -> list[int]:
    if message.HasField("snapshot"):
        return [message.snapshot.snapshot.snapshot_id]
    return [u.snapshot.snapshot_id for u in message.snapshot_batch.updates]


async def _run(
    before: int,
    schedule: list[tuple[int, int, str]],
    start: str,
    followed: frozenset[str],
    max_batch_size: int,
    columns: bool,
) -> None:
    store, hub = CommittingStore(), SnapshotHub()
    counter = iter(range(1_000_000))

    def publish(size: int, ticker: str) -> None:
        batch = [make_snapshot(ticker, next(counter)) for _ in range(size)]
        hub.publish(store.commit(batch), [])

    for index in range(before):
        publish(1, TICKERS[index % len(TICKERS)])
    resume_after = before // 2 if start == "resume" else None
    request = FeedRequest(
        selector=MarketSelector(followed),
        start_time=at(0) if start == "time" else None,
        resume_after_id=resume_after,
        heartbeat_interval=0.005,  # keeps events coming, so the loop below re-checks
        history_tickers=sorted(followed) or None,
    )
    feed = feed_items(request, hub, store, store if columns else None)
    frames = SnapshotFrames(TOKENS)

    async def writer() -> None:
        for size, pauses, ticker in schedule:
            for _ in range(pauses):
                await asyncio.sleep(0)
            publish(size, ticker)

    received: list[int] = []
    caught_up = 0
    writing = asyncio.create_task(writer())
    first_after = 0 if start == "time" else (resume_after or 0)
    try:
        async with asyncio.timeout(2):
            async for item in feed:
                for frame, _ in frames.frames(item, max_batch_size):
                    message = pb.StreamSnapshotsResponse.FromString(frame)
                    if message.HasField("caught_up"):
                        caught_up += 1
                        if start == "live":
                            first_after = TOKENS.decode_resume_token(message.resume_token)
                    ids = _snapshot_ids(message)
                    received.extend(ids)
                    if ids:  # the token resumes right after the last snapshot it carried
                        assert TOKENS.decode_resume_token(message.resume_token) == ids[-1]
                    assert len(ids) <= max(max_batch_size, 1)
                expected = _expected(store, first_after, followed)
                settled = writing.done() and caught_up and received == expected
                if settled or len(received) > len(expected):  # done, or a duplicate: stop
                    break
    finally:
        await feed.aclose()
        await writing
    assert caught_up == 1
    assert received == _expected(store, first_after, followed)
    assert hub.subscriber_count == 0


def _expected(store: CommittingStore, after_id: int, followed: frozenset[str]) -> list[int]:
    return [
        r.snapshot_id
        for r in store.rows
        if r.snapshot_id > after_id and (not followed or r.ticker in followed)
    ]
