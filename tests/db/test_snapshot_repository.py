"""SnapshotRepository: latest, ranges with keyset pagination, replay by id, backtest reads."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from kfeed_server.backtest.fingerprint import Fingerprinter, fingerprint
from kfeed_server.backtest.replay_batches import (
    REPLAY_SCHEMA,
    batch_from_records,
    records_from_batch,
)
from kfeed_server.db.repositories import Repositories
from kfeed_server.db.repositories.export import MAX_MERGED_MARKETS
from kfeed_server.records import SnapshotRecord
from kfeed_server.records.backtest import FEE_SCHEDULE_VERSION
from tests.support.factories import at, make_snapshot


async def _store(
    repositories: Repositories, snapshots: list[SnapshotRecord]
) -> list[SnapshotRecord]:
    result = await repositories.ingest.insert_snapshots(snapshots)
    assert result.counts.snapshots == len(snapshots)
    return result.stored_snapshots


async def test_timestamps_round_trip_to_the_microsecond_in_utc(repositories: Repositories) -> None:
    plus_two = timezone(timedelta(hours=2))
    exchange_time = datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC_PLUS_0)
    receive_time = datetime(2031, 1, 2, 3, 4, 5, 6, tzinfo=plus_two)
    (stored,) = await _store(
        repositories,
        [make_snapshot("A", 0, exchange_time=exchange_time, receive_time=receive_time)],
    )
    latest = await repositories.snapshots.latest("A")
    assert latest == stored
    assert latest.exchange_time == exchange_time
    assert latest.receive_time == receive_time
    assert latest.receive_time.utcoffset() == timedelta(0)
    assert latest.receive_time.hour == 1
    assert latest.receive_time.microsecond == 6


UTC_PLUS_0 = UTC


async def test_latest_takes_highest_exchange_time_then_id(repositories: Repositories) -> None:
    assert await repositories.snapshots.latest("A") is None
    stored = await _store(
        repositories,
        [
            make_snapshot("A", 5),
            make_snapshot("A", 9),
            make_snapshot("A", 1),
            make_snapshot("A", 10, exchange_time=at(9), receive_time=at(9.5)),
        ],
    )
    latest = await repositories.snapshots.latest("A")
    assert latest is not None
    assert latest.exchange_time == at(9)
    assert latest.snapshot_id == max(s.snapshot_id for s in stored if s.exchange_time == at(9))


async def test_latest_per_market(repositories: Repositories) -> None:
    await _store(repositories, [make_snapshot(t, i) for t in ("B", "A", "C") for i in range(3)])
    await _store(repositories, [make_snapshot("A", 7)])
    everything = await repositories.snapshots.latest_per_market(None)
    assert [(s.ticker, s.exchange_time) for s in everything] == [
        ("A", at(7)),
        ("B", at(2)),
        ("C", at(2)),
    ]
    some = await repositories.snapshots.latest_per_market(["C", "A", "UNKNOWN"])
    assert [(s.ticker, s.exchange_time) for s in some] == [("A", at(7)), ("C", at(2))]
    assert await repositories.snapshots.latest_per_market([]) == []


async def test_latest_per_market_on_empty_database(repositories: Repositories) -> None:
    assert await repositories.snapshots.latest_per_market(None) == []


async def test_list_range_pages_through_equal_timestamps(repositories: Repositories) -> None:
    # Ten snapshots, several sharing an exchange time: the id breaks ties.
    snapshots = [
        make_snapshot("A", i, exchange_time=at(i // 3), receive_time=at(i)) for i in range(10)
    ]
    await _store(repositories, [*snapshots, make_snapshot("B", 0)])
    seen: list[SnapshotRecord] = []
    after: tuple[datetime, int] | None = None
    pages = 0
    while True:
        page = await repositories.snapshots.list_range(
            "A",
            start=None,
            end=None,
            limit=4,
            after=after,
        )
        seen.extend(page.items)
        pages += 1
        if page.next_cursor is None:
            break
        last = page.items[-1]
        assert page.next_cursor == (last.exchange_time, last.snapshot_id)
        after = (last.exchange_time, last.snapshot_id)
    assert pages == 3
    assert len(seen) == 10
    keys = [(s.exchange_time, s.snapshot_id) for s in seen]
    assert keys == sorted(keys)
    assert len(set(keys)) == 10


async def test_list_range_exact_page_has_no_cursor(repositories: Repositories) -> None:
    await _store(repositories, [make_snapshot("A", i) for i in range(4)])
    page = await repositories.snapshots.list_range("A", start=None, end=None, limit=4)
    assert len(page.items) == 4
    assert page.next_cursor is None
    first = await repositories.snapshots.list_range("A", start=None, end=None, limit=3)
    assert first.next_cursor is not None


async def test_list_range_start_inclusive_end_exclusive(repositories: Repositories) -> None:
    await _store(repositories, [make_snapshot("A", i) for i in range(6)])
    page = await repositories.snapshots.list_range("A", start=at(2), end=at(4), limit=100)
    assert [s.exchange_time for s in page.items] == [at(2), at(3)]
    one_micro = timedelta(microseconds=1)
    page = await repositories.snapshots.list_range(
        "A", start=at(2) + one_micro, end=at(4) + one_micro, limit=100
    )
    assert [s.exchange_time for s in page.items] == [at(3), at(4)]


async def test_list_after_id(repositories: Repositories) -> None:
    stored = await _store(repositories, [make_snapshot(t, i) for i in range(4) for t in ("A", "B")])
    ids = [s.snapshot_id for s in stored]
    after = await repositories.snapshots.list_after_id(ids[2], tickers=None, limit=100)
    assert [s.snapshot_id for s in after] == ids[3:]
    only_b = await repositories.snapshots.list_after_id(0, tickers=["B"], limit=2)
    assert [s.ticker for s in only_b] == ["B", "B"]
    assert [s.snapshot_id for s in only_b] == [s.snapshot_id for s in stored if s.ticker == "B"][:2]
    recent = await repositories.snapshots.list_after_id(
        0, tickers=["A"], limit=100, min_exchange_time=at(2)
    )
    assert [s.exchange_time for s in recent] == [at(2), at(3)]
    assert await repositories.snapshots.list_after_id(0, tickers=[], limit=10) == []
    assert await repositories.snapshots.list_after_id(ids[-1], tickers=None, limit=10) == []


async def test_max_snapshot_id(repositories: Repositories) -> None:
    assert await repositories.snapshots.max_snapshot_id() == 0
    stored = await _store(repositories, [make_snapshot("A", i) for i in range(3)])
    assert await repositories.snapshots.max_snapshot_id() == stored[-1].snapshot_id


async def _backtest_rows(
    repositories: Repositories,
    tickers: list[str],
    start: datetime,
    end: datetime,
    *,
    max_snapshot_id: int | None = None,
) -> list[SnapshotRecord]:
    """What a backtest reads (replay batches of columns), as records. Every batch's columns are
    what the same records give, and so is their fingerprint however the rows are cut."""
    pin = max_snapshot_id or await repositories.snapshots.max_snapshot_id()
    read = repositories.exports.snapshots_for_backtest(tickers, start, end, max_snapshot_id=pin)
    batches = [batch async for batch in read]
    rows = [row for batch in batches for row in records_from_batch(batch)]
    for batch in batches:
        rebuilt = batch_from_records(records_from_batch(batch))
        for field in REPLAY_SCHEMA:
            assert batch.column(field.name).equals(rebuilt.column(field.name)), field.name
    expected = fingerprint(rows)
    for size in (1, 7, 4_096):
        fingerprinter = Fingerprinter()
        for batch in batches:
            for first in range(0, batch.num_rows, size):
                fingerprinter.add_batch(batch.slice(first, size))
        fingerprinter.add_terms((), {}, {}, FEE_SCHEDULE_VERSION)
        assert fingerprinter.result() == expected
    return rows


async def test_backtest_reads_in_time_then_id_order(repositories: Repositories) -> None:
    await _store(
        repositories,
        [make_snapshot(t, i, exchange_time=at(i // 2)) for i in range(25) for t in ("A", "B", "C")],
    )
    rows = await _backtest_rows(repositories, ["A", "B"], at(1), at(10))
    keys = [(s.exchange_time, s.snapshot_id) for s in rows]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    assert {s.ticker for s in rows} == {"A", "B"}
    assert all(at(1) <= s.exchange_time < at(10) for s in rows)
    assert len(rows) == 2 * 18
    assert await repositories.snapshots.count_for_backtest(["A", "B"], at(1), at(10)) == 36


async def test_backtest_reads_pinned_to_a_max_id(repositories: Repositories) -> None:
    stored = await _store(repositories, [make_snapshot("A", i) for i in range(5)])
    pin = stored[2].snapshot_id
    await _store(repositories, [make_snapshot("A", 10 + i) for i in range(5)])
    rows = await _backtest_rows(repositories, ["A"], at(0), at(100), max_snapshot_id=pin)
    assert [s.snapshot_id for s in rows] == [s.snapshot_id for s in stored[:3]]
    assert (
        await repositories.snapshots.count_for_backtest(["A"], at(0), at(100), max_snapshot_id=pin)
        == 3
    )
    assert await repositories.snapshots.count_for_backtest([], at(0), at(100)) == 0


async def test_backtest_reads_cross_gaps_bursts_and_ties_in_order(
    repositories: Repositories,
) -> None:
    """Data years apart, a burst far denser than a chunk at one instant, and rows sharing a time
    across markets all come back, once, in order (and fingerprint alike however they are cut)."""
    rng = random.Random(5)
    times = [at(0)] * 40  # a burst: 40 rows at one instant, across markets
    times += [at(rng.uniform(1, 600)) for _ in range(150)]  # minutes apart
    times += [at(3 * 365 * 86_400 + rng.uniform(0, 5)) for _ in range(60)]  # years later
    tickers = ("A", "B", "C")
    snapshots = [
        make_snapshot(tickers[i % 3], i, exchange_time=when) for i, when in enumerate(times)
    ]
    stored = await _store(repositories, snapshots)
    window = (at(-10), at(4 * 365 * 86_400))
    expected = sorted(
        (s for s in stored if s.ticker in ("A", "C")),
        key=lambda s: (s.exchange_time, s.snapshot_id),
    )
    assert await _backtest_rows(repositories, ["A", "C"], *window) == expected


async def test_a_range_page_starts_at_the_later_of_its_start_and_its_cursor(
    repositories: Repositories,
) -> None:
    stored = await _store(
        repositories, [make_snapshot("A", i, exchange_time=at(i)) for i in range(10)]
    )
    list_range = repositories.snapshots.list_range

    def cursor(i: int) -> tuple[datetime, int]:
        return (stored[i].exchange_time, stored[i].snapshot_id)

    before_start = await list_range("A", start=at(5), end=None, limit=3, after=cursor(2))
    assert [s.snapshot_id for s in before_start.items] == [s.snapshot_id for s in stored[5:8]]
    after_start = await list_range("A", start=at(5), end=at(9), limit=10, after=cursor(6))
    assert [s.snapshot_id for s in after_start.items] == [s.snapshot_id for s in stored[7:9]]
    assert after_start.next_cursor is None


async def test_backtest_reads_of_many_markets_are_in_order_too(repositories: Repositories) -> None:
    """More markets than one merged read takes (MAX_MERGED_MARKETS) come back in the same order
    from one sorted query."""
    tickers = [f"M{m:03}" for m in range(MAX_MERGED_MARKETS + 2)]
    stored = await _store(
        repositories,
        [make_snapshot(t, i, exchange_time=at(i % 7)) for i in range(3) for t in tickers],
    )
    expected = sorted(stored, key=lambda s: (s.exchange_time, s.snapshot_id))
    assert await _backtest_rows(repositories, tickers, at(0), at(100)) == expected
    merged = await _backtest_rows(repositories, tickers[:MAX_MERGED_MARKETS], at(0), at(100))
    assert merged == [s for s in expected if s.ticker in tickers[:MAX_MERGED_MARKETS]]
