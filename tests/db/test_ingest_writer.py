"""IngestWriter: one transaction per batch, idempotent, unchanged states skipped."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from kfeed_server.db.repositories import Repositories, build_repositories
from kfeed_server.db.repositories.ingest import COPY_THRESHOLD
from kfeed_server.records import DataSource, WriteCounts
from tests.support.factories import (
    at,
    make_event,
    make_gap,
    make_market,
    make_series,
    make_snapshot,
    make_trade,
)


async def test_batch_is_stored_and_counted(repositories: Repositories) -> None:
    snapshots = [make_snapshot("A", i) for i in range(3)] + [make_snapshot("B", 0)]
    result = await repositories.ingest.write_batch(
        series=[make_series()],
        events=[make_event("EV-A")],
        markets=[make_market("A"), make_market("B")],
        snapshots=snapshots,
        trades=[make_trade("A", 0), make_trade("A", 1)],
        feed_gaps=[make_gap(1)],
    )
    assert result.counts == WriteCounts(
        series=1, events=1, markets=2, snapshots=4, trades=2, feed_gaps=1
    )
    ids = [s.snapshot_id for s in result.stored_snapshots]
    assert ids == sorted(ids)
    assert len(set(ids)) == 4
    assert ids[0] > 0
    assert {s.with_id(0) for s in result.stored_snapshots} == set(snapshots)
    assert [g.gap_id > 0 for g in result.stored_gaps] == [True]
    assert await repositories.snapshots.max_snapshot_id() == ids[-1]


async def test_resent_batch_stores_nothing(repositories: Repositories) -> None:
    batch = {
        "series": [make_series()],
        "events": [make_event("EV-A")],
        "markets": [make_market("A")],
        "snapshots": [make_snapshot("A", i) for i in range(5)],
        "trades": [make_trade("A", i) for i in range(3)],
        "feed_gaps": [make_gap(1)],
    }
    first = await repositories.ingest.write_batch(**batch)  # type: ignore[arg-type]
    again = await repositories.ingest.write_batch(**batch)  # type: ignore[arg-type]
    assert first.counts.snapshots == 5
    assert again.counts == WriteCounts()
    assert again.stored_snapshots == []
    assert again.stored_gaps == []
    page = await repositories.snapshots.list_range("A", start=None, end=None, limit=100)
    assert len(page.items) == 5


async def test_large_batch_resent_is_stored_once(repositories: Repositories) -> None:
    """Large enough for PostgreSQL's COPY path."""
    snapshots = [make_snapshot(f"M{i % 7}", i) for i in range(COPY_THRESHOLD * 2)]
    first = await repositories.ingest.insert_snapshots(snapshots)
    again = await repositories.ingest.insert_snapshots(snapshots)
    assert first.counts.snapshots == len(snapshots)
    assert again.counts.snapshots == 0
    assert await repositories.snapshots.count_for_backtest(
        [f"M{i}" for i in range(7)], at(-1), at(10**6)
    ) == len(snapshots)
    assert [s.snapshot_id for s in first.stored_snapshots] == sorted(
        s.snapshot_id for s in first.stored_snapshots
    )
    assert {s.with_id(0) for s in first.stored_snapshots} == set(snapshots)


async def test_unchanged_state_is_not_stored(repositories: Repositories) -> None:
    first = make_snapshot("A", 0)
    same_later = make_snapshot("A", 1, **_state_of(first))
    changed = make_snapshot("A", 2)
    same_as_changed = make_snapshot("A", 3, source=DataSource.POLL, **_state_of(changed))
    # Given out of order: dedup compares in exchange-time order.
    result = await repositories.ingest.insert_snapshots(
        [changed, same_later, first, same_as_changed]
    )
    assert result.counts.snapshots == 2
    assert result.counts.snapshots_unchanged == 2
    assert [s.exchange_time for s in result.stored_snapshots] == [at(0), at(2)]

    # Against the latest stored snapshot of the market, across batches.
    repeat = make_snapshot("A", 4, **_state_of(changed))
    result = await repositories.ingest.insert_snapshots([repeat])
    assert result.counts == WriteCounts(snapshots_unchanged=1)


def _state_of(snapshot: object) -> dict[str, object]:
    fields = ("yes_bid", "yes_ask", "no_bid", "no_ask", "volume", "volume_24h", "exchange_sequence")
    return {name: getattr(snapshot, name) for name in fields}


async def test_unchanged_dedup_sees_writes_by_another_writer(
    repositories: Repositories, engine: AsyncEngine
) -> None:
    # The writer remembers each market's latest stored snapshot; another writer on the same
    # database (say, another process) must make it look again.
    first = make_snapshot("A", 0)
    await repositories.ingest.insert_snapshots([first])
    elsewhere = build_repositories(engine).ingest
    await elsewhere.insert_snapshots([make_snapshot("A", 1)])
    back_to_first = make_snapshot("A", 2, **_state_of(first))
    result = await repositories.ingest.insert_snapshots([back_to_first])
    assert result.counts.snapshots == 1  # a change from the other writer's state, so stored


async def test_unchanged_dedup_survives_a_failed_batch(repositories: Repositories) -> None:
    first = make_snapshot("A", 0)
    await repositories.ingest.insert_snapshots([first])
    changed = make_snapshot("A", 1)
    with pytest.raises(Exception):  # noqa: B017, PT011 - each driver raises its own type
        await repositories.ingest.write_batch(
            snapshots=[changed], trades=[make_trade("A", 0, count=2**63)]
        )
    # The rolled-back state never became the latest: a repeat of the first is still unchanged.
    repeat = make_snapshot("A", 2, **_state_of(first))
    result = await repositories.ingest.insert_snapshots([repeat])
    assert result.counts == WriteCounts(snapshots_unchanged=1)


async def test_same_state_on_another_market_is_stored(repositories: Repositories) -> None:
    a = make_snapshot("A", 0)
    b = make_snapshot("B", 0)
    result = await repositories.ingest.insert_snapshots([a, b])
    assert result.counts.snapshots == 2


async def test_batch_with_a_bad_row_stores_nothing(repositories: Repositories) -> None:
    bad_trade = make_trade("A", 1, count=2**63)  # does not fit BIGINT on either database
    with pytest.raises(Exception):  # noqa: B017, PT011 - each driver raises its own type
        await repositories.ingest.write_batch(
            series=[make_series()],
            markets=[make_market("A")],
            snapshots=[make_snapshot("A", i) for i in range(3)],
            trades=[make_trade("A", 0), bad_trade],
        )
    assert await repositories.markets.get_market("A") is None
    assert await repositories.snapshots.max_snapshot_id() == 0
    page = await repositories.trades.list_range("A", start=None, end=None, limit=10)
    assert page.items == []
    # The writer is usable again afterwards.
    result = await repositories.ingest.write_batch(markets=[make_market("A")])
    assert result.counts.markets == 1


async def test_naive_timestamps_are_refused(repositories: Repositories) -> None:
    naive = make_snapshot("A", 0, exchange_time=at(0).replace(tzinfo=None))
    with pytest.raises(Exception, match=r"naive|timezone"):
        await repositories.ingest.insert_snapshots([naive])


async def test_market_upsert_updates_on_change_only(repositories: Repositories) -> None:
    writer = repositories.ingest
    assert (await writer.write_batch(markets=[make_market("A")])).counts.markets == 1
    stored = await repositories.markets.get_market("A")
    assert stored is not None
    assert stored.update_time is not None

    assert (await writer.write_batch(markets=[make_market("A")])).counts.markets == 0
    unchanged = await repositories.markets.get_market("A")
    assert unchanged == stored

    closed = make_market("A", status=5, title="new title")
    assert (await writer.write_batch(markets=[closed])).counts.markets == 1
    updated = await repositories.markets.get_market("A")
    assert updated is not None
    assert (updated.status, updated.title) == (5, "new title")
    assert stored.update_time is not None
    assert updated.update_time is not None
    assert updated.update_time >= stored.update_time


async def test_duplicate_keys_within_one_batch(repositories: Repositories) -> None:
    result = await repositories.ingest.write_batch(
        markets=[make_market("A", title="first"), make_market("A", title="last")],
        snapshots=[make_snapshot("A", 0), make_snapshot("A", 0)],
        trades=[make_trade("A", 0), make_trade("A", 0)],
        feed_gaps=[make_gap(1), make_gap(1)],
    )
    # The repeated snapshot repeats the market's state too.
    assert result.counts == WriteCounts(
        markets=1, snapshots=1, trades=1, feed_gaps=1, snapshots_unchanged=1
    )
    market = await repositories.markets.get_market("A")
    assert market is not None
    assert market.title == "last"


async def test_gap_recovery_is_an_upsert_that_never_goes_back(repositories: Repositories) -> None:
    writer = repositories.ingest
    gap = make_gap(1, ticker="A")
    first = await writer.write_batch(feed_gaps=[gap])
    recovered = dataclasses.replace(gap, recovered=True, recover_time=at(5))
    second = await writer.write_batch(feed_gaps=[recovered])
    assert second.counts.feed_gaps == 1
    assert second.stored_gaps == [
        dataclasses.replace(recovered, gap_id=first.stored_gaps[0].gap_id)
    ]
    # The original, unrecovered report arriving late changes nothing.
    third = await writer.write_batch(feed_gaps=[gap])
    assert third.counts.feed_gaps == 0
    gaps = await repositories.feed_gaps.list_gaps(tickers=None, after_id=0, limit=10)
    assert [(g.recovered, g.recover_time) for g in gaps] == [(True, at(5))]


async def test_large_batch_with_a_repeated_key_stores_the_first(repositories: Repositories) -> None:
    """On PostgreSQL the direct COPY hits the unique key and falls back to the staging path."""
    snapshots = [make_snapshot("A", i) for i in range(COPY_THRESHOLD + 10)]
    repeated_key = snapshots[-1]._replace(yes_bid=1, last_price=99)
    result = await repositories.ingest.insert_snapshots([*snapshots, repeated_key])
    assert result.counts.snapshots == len(snapshots)
    stored_last = await repositories.snapshots.latest("A")
    assert stored_last is not None
    assert stored_last == snapshots[-1].with_id(result.stored_snapshots[-1].snapshot_id)


async def test_large_backfill_older_than_stored_data(repositories: Repositories) -> None:
    await repositories.ingest.insert_snapshots([make_snapshot("A", 10_000)])
    older = [make_snapshot("A", i, source=DataSource.BACKFILL) for i in range(COPY_THRESHOLD)]
    result = await repositories.ingest.insert_snapshots(older)
    assert result.counts.snapshots == COPY_THRESHOLD
    assert [s.exchange_time for s in result.stored_snapshots] == [
        at(i) for i in range(COPY_THRESHOLD)
    ]
    latest = await repositories.snapshots.latest("A")
    assert latest is not None
    assert latest.exchange_time == at(10_000)
