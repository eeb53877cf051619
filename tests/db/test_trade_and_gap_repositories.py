"""TradeRepository and FeedGapRepository reads."""

from __future__ import annotations

from datetime import datetime

from kfeed_server.db.repositories import Repositories
from kfeed_server.records import FeedGapRecord, Side, TradeRecord
from tests.support.factories import at, make_gap, make_trade


async def test_trades_page_by_time_then_trade_id(repositories: Repositories) -> None:
    # Pairs share a create time: the trade id breaks ties.
    trades = [make_trade("A", i, create_time=at(i // 2), taker_side=Side.NO) for i in range(7)]
    result = await repositories.ingest.write_batch(trades=[*trades, make_trade("B", 0)])
    assert result.counts.trades == 8
    seen: list[TradeRecord] = []
    after: tuple[datetime, str] | None = None
    while True:
        page = await repositories.trades.list_range("A", start=None, end=None, limit=3, after=after)
        seen.extend(page.items)
        if page.next_cursor is None:
            break
        after = (page.items[-1].create_time, page.items[-1].trade_id)
        assert page.next_cursor == after
    assert seen == sorted(trades, key=lambda t: (t.create_time, t.trade_id))
    window = await repositories.trades.list_range("A", start=at(1), end=at(3), limit=10)
    assert [t.trade_id for t in window.items] == [t.trade_id for t in trades[2:6]]


async def test_gaps_by_id_and_ticker(repositories: Repositories) -> None:
    gaps = [make_gap(i, ticker="A" if i % 2 else "B") for i in range(5)]
    stored = (await repositories.ingest.write_batch(feed_gaps=gaps)).stored_gaps
    assert len(stored) == 5
    every = await repositories.feed_gaps.list_gaps(tickers=None, after_id=0, limit=10)
    assert every == stored
    later = await repositories.feed_gaps.list_gaps(tickers=None, after_id=stored[1].gap_id, limit=2)
    assert later == stored[2:4]
    only_a = await repositories.feed_gaps.list_gaps(tickers=["A"], after_id=0, limit=10)
    assert [g.ticker for g in only_a] == ["A", "A"]
    assert await repositories.feed_gaps.list_gaps(tickers=[], after_id=0, limit=10) == []


async def test_gaps_newest_first_by_window_and_ticker(repositories: Repositories) -> None:
    # Two gaps per second (the id breaks ties); gap 3 is recovered at second 2, gap 4 names no
    # market (a whole subscription), the odd ones are of market A.
    gaps = [
        make_gap(
            i,
            detect_time=at(i // 2),
            ticker="" if i == 4 else "A" if i % 2 else "B",
            recovered=i == 3,
            recover_time=at(2) if i == 3 else None,
        )
        for i in range(8)
    ]
    stored = (await repositories.ingest.write_batch(feed_gaps=gaps)).stored_gaps
    newest_first = sorted(stored, key=lambda g: (g.detect_time, g.gap_id), reverse=True)
    seen: list[FeedGapRecord] = []
    before: tuple[datetime, int] | None = None
    while True:
        page = await repositories.feed_gaps.list_newest_first(
            tickers=None, start=None, end=None, limit=3, before=before
        )
        seen.extend(page.items)
        if page.next_cursor is None:
            break
        before = (page.items[-1].detect_time, page.items[-1].gap_id)
        assert page.next_cursor == before
    assert seen == newest_first

    of_a = await repositories.feed_gaps.list_newest_first(
        tickers=["A"], start=None, end=None, limit=10
    )
    assert of_a.items == [g for g in newest_first if g.ticker in ("A", "")]
    # Open at second 2 (gap 3 recovered exactly then is not), detected before second 3.
    window = await repositories.feed_gaps.list_newest_first(
        tickers=None, start=at(2), end=at(3), limit=10
    )
    assert window.items == [
        g for g in newest_first if g.detect_time < at(3) and g.gap_id != stored[3].gap_id
    ]
