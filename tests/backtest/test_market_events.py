"""The books and trades a run replays, read from storage: each replayed book equals the book
GetOrderBook's domain code rebuilds at that instant, at every instant a market's book changed,
whatever the window's start and the page size; trades and books merge in time order. Both
databases, a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from kfeed.v1 import backtest_service_pb2 as pb
from kfeed.v1 import backtest_service_pb2_grpc as pb_grpc
from kfeed.v1 import types_pb2
from kfeed_ingest.kalshi.books import START, BookChange, checkpoint, micros
from kfeed_server.app import KfeedServer
from kfeed_server.backtest import BookState, EngineConfig, run_backtest
from kfeed_server.backtest.books import event_time
from kfeed_server.backtest.config import fast_path_applies
from kfeed_server.backtest.engine import MarketEvent
from kfeed_server.backtest.market_events import window_events
from kfeed_server.books import OrderBooks
from kfeed_server.db.repositories.export import ArrowExportReader
from kfeed_server.records import Side, SnapshotRecord, TradeRecord
from kfeed_server.records.backtest import ParamValue
from kfeed_server.transport.backtest_servicer import metrics_to_proto
from kfeed_server.transport.convert import dollars, timestamp
from tests.support.backtest_service import (
    TICKER,
    all_executions,
    publish_snapshots,
    run_to_end,
    stored_window,
    threshold_config,
    wave_snapshots,
)
from tests.support.book_timeline import MARKET, Timeline, publish_timeline, request_of
from tests.support.factories import at, make_market, make_snapshot, make_trade
from tests.support.servers import PublishSession

END = at(100_000)


@pytest.mark.parametrize("page", [5, 4_096])
async def test_replayed_books_are_the_books_rebuilt_at_each_instant(
    backtest_server: KfeedServer,
    publisher: PublishSession,
    page: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("kfeed_server.backtest.market_events.EVENT_PAGE", page)
    timeline = Timeline(seed=7, steps=300)
    await publish_timeline(publisher, timeline, per_batch=500)
    repositories = backtest_server.repositories
    rebuilt = OrderBooks(repositories.markets, repositories.books)
    instants = [when for when, _ in timeline.truth]
    # From the first record, and from mid-way (the book in force then is placed at the start).
    for start in (at(0), instants[len(instants) // 2] - timedelta(microseconds=1)):
        events = [
            e async for e in window_events(repositories.books, None, [MARKET.ticker], start, END)
        ]
        books = [e for e in events if isinstance(e, BookState)]
        assert books == events
        times = [b.exchange_time for b in books]
        assert times == sorted(set(times))
        assert times[0] == start or start == at(0)
        # One book per recorded instant in the window (a gap records none).
        recorded = {t for t in instants if t > start and not timeline.in_gap(t)}
        assert recorded <= set(times)
        for book in books:
            expected = await rebuilt.book_at(MARKET.ticker, book.exchange_time)
            assert (book.yes_bids, book.no_bids) == (expected.yes, expected.no), book.exchange_time
            if not expected.in_feed_gap:
                truth = timeline.book_at(book.exchange_time)
                assert (list(book.yes_bids), list(book.no_bids)) == truth


async def test_trades_come_before_books_of_their_instant_and_in_time_order(
    backtest_server: KfeedServer, publisher: PublishSession
) -> None:
    timeline = Timeline(seed=8, steps=40)
    await publish_timeline(publisher, timeline, per_batch=500)
    instants = [when for when, _ in timeline.truth]
    # One trade at an instant the book changed, one between two instants, one after the end.
    trades = [
        make_trade(MARKET.ticker, 0, create_time=instants[5]),
        make_trade(MARKET.ticker, 1, create_time=instants[9] + timedelta(microseconds=3)),
        make_trade(MARKET.ticker, 2, create_time=END),
    ]
    await publisher.publish(trades=trades)
    repositories = backtest_server.repositories
    events = [
        e
        async for e in window_events(
            repositories.books, repositories.trades, [MARKET.ticker], at(0), END
        )
    ]
    order = [(event_time(e), isinstance(e, BookState)) for e in events]
    assert order == sorted(order)
    replayed: list[TradeRecord] = [e for e in events if isinstance(e, TradeRecord)]
    assert replayed == trades[:2]  # the window's end is exclusive
    at_trade = events.index(trades[0])
    assert isinstance(events[at_trade + 1], BookState)
    assert event_time(events[at_trade + 1]) == instants[5]


async def _record_a_deep_book(publisher: PublishSession) -> pb.BacktestConfig:
    """Records a market whose snapshots show one contract at a $0.40 YES ask while the stored
    book holds more behind it; returns a DEPTH threshold run buying 3 contracts at <= $0.40."""
    await publisher.publish(markets=[make_market(TICKER)])
    await publish_snapshots(
        publisher,
        [
            make_snapshot(TICKER, i, yes_bid=3_800, yes_ask=4_000, no_bid=6_000, no_ask=6_200,
                          yes_bid_size=1_000, yes_ask_size=100)
            for i in range(3)
        ],
    )  # fmt: skip
    opened = at(0) - timedelta(milliseconds=1)
    start = checkpoint(TICKER, START, opened, opened, 1, {3_800: 1_000}, {6_000: 50, 5_900: 500})
    assert (await publisher.send(request_of([start], 0))).code == 0
    config = threshold_config(buy_below=4_000, sell_above=9_000, count=300)
    config.fill_model = pb.FILL_MODEL_DEPTH
    return config


async def test_a_depth_run_through_create_backtest_walks_the_stored_book(
    stub: pb_grpc.BacktestServiceAsyncStub, publisher: PublishSession
) -> None:
    config = await _record_a_deep_book(publisher)
    first = await run_to_end(stub, config)
    assert first.state == pb.BACKTEST_STATE_SUCCEEDED, first.error_message
    buys = [
        e for e in await all_executions(stub, first.backtest_id) if e.action == pb.ORDER_ACTION_BUY
    ]
    # 3 contracts at the first snapshot, taking the NO bids at their complements: 0.5 contract
    # at $0.40 (NO bid $0.60) and 2.5 at $0.41 (NO bid $0.59). Average, rounded up for a buy:
    # (50 × 4,000 + 250 × 4,100) / 300 = 1,225,000 / 300 = 4,083.33… → 4,084. (The snapshot
    # alone would have filled one contract at $0.40.)
    assert [(e.count.hundredths, e.price.ten_thousandths) for e in buys] == [(300, 4_084)]
    assert buys[0].time == timestamp(at(0))
    # The one book in force at the window's start was read and fingerprinted.
    assert first.data_fingerprint.event_count == 1

    # A later change of the book (the $0.60 NO bid gone) is read too: same fills, new hash.
    gone = BookChange(TICKER, micros(at(1)), micros(at(1)), 2, types_pb2.SIDE_NO, 6_000, 0)
    assert (await publisher.send(request_of([gone], 0))).code == 0
    second = await run_to_end(stub, config)
    assert second.metrics == first.metrics
    assert second.data_fingerprint.event_count == 2
    assert second.data_fingerprint.content_hash != first.data_fingerprint.content_hash


async def test_books_and_trades_committed_while_a_run_reads_are_not_read_by_it(
    stub: pb_grpc.BacktestServiceAsyncStub,
    publisher: PublishSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = await _record_a_deep_book(publisher)
    assert (await publisher.publish(trades=[make_trade(TICKER, 0)])).code == 0
    before = await run_to_end(stub, config)
    assert before.state == pb.BACKTEST_STATE_SUCCEEDED, before.error_message
    # The book in force at the start and the one trade.
    assert before.data_fingerprint.event_count == 2

    # The next run commits a book change and a trade inside its window once it has pinned its
    # data and read its first snapshots, before it reads the books and trades (they are read
    # lazily, as the snapshot chunks go out): it must not see them.
    original = ArrowExportReader.snapshots_for_backtest
    committed: list[int] = []

    async def commit_while_reading(
        self: ArrowExportReader, *args: Any, **kwargs: Any
    ) -> AsyncIterator[Any]:
        async for batch in original(self, *args, **kwargs):
            yield batch
            if not committed:
                gone = BookChange(
                    TICKER, micros(at(1)), micros(at(1)), 2, types_pb2.SIDE_NO, 6_000, 0
                )
                committed.append((await publisher.send(request_of([gone], 0))).book_changes_stored)
                ack = await publisher.publish(trades=[make_trade(TICKER, 2)])
                committed.append(ack.trades_stored)

    monkeypatch.setattr(ArrowExportReader, "snapshots_for_backtest", commit_while_reading)
    during = await run_to_end(stub, config)
    monkeypatch.setattr(ArrowExportReader, "snapshots_for_backtest", original)
    assert committed == [1, 1]  # both were stored while the run read
    assert during.state == pb.BACKTEST_STATE_SUCCEEDED, during.error_message
    # It read what the run before read: same fingerprint, same result.
    assert during.data_fingerprint == before.data_fingerprint
    assert during.metrics == before.metrics
    assert during.equity_curve == before.equity_curve
    assert [e.SerializeToString() for e in await all_executions(stub, during.backtest_id)] == [
        e.SerializeToString() for e in await all_executions(stub, before.backtest_id)
    ]

    # A run started after the commits reads them: one more book instant and one more trade.
    after = await run_to_end(stub, config)
    assert after.data_fingerprint.event_count == 4
    assert after.data_fingerprint.content_hash != before.data_fingerprint.content_hash
    assert after.data_fingerprint.row_count == before.data_fingerprint.row_count


async def test_a_spread_maker_run_reads_the_trades_compiled_and_equals_the_engine(
    backtest_server: KfeedServer, stub: pb_grpc.BacktestServiceAsyncStub, publisher: PublishSession
) -> None:
    await publisher.publish(markets=[make_market(TICKER)])
    await publish_snapshots(publisher, wave_snapshots(TICKER, 300))
    rows = await stored_window(backtest_server.repositories, (TICKER,), at(0), at(300))
    # Every 7th second half a second after a snapshot, a taker sells 2 contracts at a cent under
    # its YES bid: through a bid resting there, which fills as a maker.
    trades = [
        make_trade(TICKER, i, yes_price=row.yes_bid - 100, no_price=10_100 - row.yes_bid,
                   count=200, taker_side=Side.NO, create_time=row.exchange_time
                   + timedelta(milliseconds=500))
        for i, row in enumerate(rows) if i % 7 == 3 and row.yes_bid is not None
    ]  # fmt: skip
    assert (await publisher.publish(trades=trades)).code == 0
    parameters: dict[str, ParamValue] = {"min_spread": 200, "max_inventory": 400, "count": 200}
    config = pb.BacktestConfig(
        strategy="spread_maker",
        tickers=[TICKER],
        parameters={
            "min_spread": pb.ParameterValue(dollars_value=dollars(200)),
            "max_inventory": pb.ParameterValue(integer_value=400),
            "count": pb.ParameterValue(integer_value=200),
        },
    )
    config.start_time.CopyFrom(timestamp(at(0)))
    config.end_time.CopyFrom(timestamp(at(300)))
    run = await run_to_end(stub, config)
    assert run.state == pb.BACKTEST_STATE_SUCCEEDED, run.error_message

    # The engine over the same stored rows and trades (each trade before the next snapshot).
    engine_config = EngineConfig(
        "spread_maker", (TICKER,), parameters, start_time=at(0), end_time=at(300)
    )
    assert fast_path_applies(engine_config)  # the service ran it compiled
    market = await backtest_server.repositories.markets.get_market(TICKER)
    assert market is not None
    events: list[MarketEvent] = sorted(
        [*rows, *trades],
        key=lambda e: (e.create_time if isinstance(e, TradeRecord) else e.exchange_time,
                       isinstance(e, SnapshotRecord)),
    )  # fmt: skip
    expected = run_backtest(engine_config, {TICKER: market}, events)
    assert expected.maker_fills > 5
    assert run.metrics == metrics_to_proto(expected.metrics)
    assert run.data_fingerprint.event_count == len(trades)
    assert run.data_fingerprint.content_hash == expected.fingerprint.content_hash
