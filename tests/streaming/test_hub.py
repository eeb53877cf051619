"""The hub routes each item to the subscriptions of its market only (by ticker, event, series, or
all), keeps each subscriber's order, shares one chunk between subscribers offered the same items,
lets only a few subscribers take their items at once, and remembers how deep a queue got before
it overflowed."""

from __future__ import annotations

import asyncio

from kfeed_server.records import SnapshotRecord
from kfeed_server.streaming import hub as hub_module
from kfeed_server.streaming.hub import MarketSelector, SnapshotHub, Subscription
from tests.support.factories import make_gap, make_market, make_snapshot
from tests.support.waiting import eventually

A = make_market("KX-A", event_ticker="EV-1", series_ticker="SER-1")
B = make_market("KX-B", event_ticker="EV-1", series_ticker="SER-2")
C = make_market("KX-C", event_ticker="EV-2", series_ticker="SER-2")


def stored(*tickers: str) -> list[SnapshotRecord]:
    return [make_snapshot(t, i).with_id(i + 1) for i, t in enumerate(tickers)]


def taken(subscription: Subscription) -> list[tuple[str, int]]:
    return [(item.ticker, getattr(item, "snapshot_id", -1)) for item in subscription.take_all()]


async def test_items_reach_exactly_the_subscriptions_of_their_market_in_order() -> None:
    hub = SnapshotHub()
    hub.remember_markets([A, B, C])
    everything = hub.subscribe(MarketSelector())
    only_a = hub.subscribe(MarketSelector(frozenset({A.ticker})))
    a_and_c = hub.subscribe(MarketSelector(frozenset({A.ticker, C.ticker})))
    event_1 = hub.subscribe(MarketSelector(event_ticker="EV-1"))
    series_2 = hub.subscribe(MarketSelector(series_ticker="SER-2"))
    ticker_or_event = hub.subscribe(MarketSelector(frozenset({C.ticker}), event_ticker="EV-1"))
    snapshots = stored("KX-A", "KX-C", "KX-B", "KX-A", "KX-C")
    gap = make_gap(1, ticker="KX-B")
    hub.publish(snapshots, [gap])
    assert taken(everything) == [
        ("KX-A", 1), ("KX-C", 2), ("KX-B", 3), ("KX-A", 4), ("KX-C", 5), ("KX-B", -1)
    ]  # fmt: skip
    assert taken(only_a) == [("KX-A", 1), ("KX-A", 4)]
    assert taken(a_and_c) == [("KX-A", 1), ("KX-C", 2), ("KX-A", 4), ("KX-C", 5)]
    assert taken(event_1) == [("KX-A", 1), ("KX-B", 3), ("KX-A", 4), ("KX-B", -1)]
    assert taken(series_2) == [("KX-C", 2), ("KX-B", 3), ("KX-C", 5), ("KX-B", -1)]
    assert taken(ticker_or_event) == [
        ("KX-A", 1), ("KX-C", 2), ("KX-B", 3), ("KX-A", 4), ("KX-C", 5), ("KX-B", -1)
    ]  # fmt: skip


async def test_a_market_learned_later_reaches_its_event_subscribers() -> None:
    hub = SnapshotHub()
    event_2 = hub.subscribe(MarketSelector(event_ticker="EV-2"))
    hub.publish(stored("KX-C"), [])
    assert taken(event_2) == []  # not known yet to belong to EV-2
    hub.remember_markets([C])
    hub.publish(stored("KX-C"), [])
    assert taken(event_2) == [("KX-C", 1)]


async def test_unsubscribed_subscriptions_leave_every_route() -> None:
    hub = SnapshotHub()
    hub.remember_markets([A])
    subscriptions = [
        hub.subscribe(MarketSelector(frozenset({A.ticker}), event_ticker="EV-1")),
        hub.subscribe(MarketSelector(series_ticker="SER-1")),
        hub.subscribe(MarketSelector()),
    ]
    for subscription in subscriptions:
        hub.unsubscribe(subscription)
    hub.publish(stored("KX-A"), [])
    assert [s.depth for s in subscriptions] == [0, 0, 0]
    assert hub.subscriber_count == 0


async def test_only_a_few_subscribers_hold_a_turn_at_once() -> None:
    hub = SnapshotHub()
    limit = hub_module.CONCURRENT_TURNS
    subscriptions = [hub.subscribe(MarketSelector()) for _ in range(3 * limit)]
    holding: set[int] = set()
    most_holding = 0
    release = asyncio.Event()

    async def subscriber(index: int, subscription: Subscription) -> None:
        nonlocal most_holding
        await subscription.wait(10)
        subscription.take_chunks()
        holding.add(index)
        most_holding = max(most_holding, len(holding))
        await release.wait()
        holding.discard(index)
        await subscription.wait(0)  # back to wait: the turn ends

    tasks = [asyncio.create_task(subscriber(i, s)) for i, s in enumerate(subscriptions)]
    await asyncio.sleep(0)  # every subscriber is waiting
    hub.publish(stored("KX-A"), [])
    await eventually(lambda: len(holding) == limit)
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert most_holding == limit


async def test_fewer_subscribers_take_turns_while_ingest_writes() -> None:
    hub = SnapshotHub()
    subscriptions = [hub.subscribe(MarketSelector()) for _ in range(hub_module.CONCURRENT_TURNS)]
    woken: list[int] = []

    async def subscriber(index: int, subscription: Subscription) -> None:
        await subscription.wait(10)
        woken.append(index)

    tasks = [asyncio.create_task(subscriber(i, s)) for i, s in enumerate(subscriptions)]
    await asyncio.sleep(0)
    with hub.writing():
        hub.publish(stored("KX-A"), [])
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(woken) == hub_module.TURNS_WHILE_WRITING
    await asyncio.wait_for(asyncio.gather(*tasks), 5)  # the rest once the write is done


async def test_a_stream_about_to_send_lets_a_write_in_progress_finish_first() -> None:
    hub = SnapshotHub()
    await asyncio.wait_for(hub.after_writes(), 1)  # no write: at once
    with hub.writing():
        waiting = asyncio.create_task(hub.after_writes())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done()
    await asyncio.wait_for(waiting, 1)  # the write is done


async def test_a_long_write_holds_a_stream_back_only_for_a_while() -> None:
    hub = SnapshotHub()
    with hub.writing():
        # A stuck write (SQLite's lock held elsewhere) must not stop streams and heartbeats.
        await asyncio.wait_for(hub.after_writes(), hub_module.WRITE_PAUSE_SECONDS + 5)


async def test_a_turn_that_runs_too_long_stops_holding_the_others_back() -> None:
    hub = SnapshotHub()
    limit = hub_module.CONCURRENT_TURNS
    subscriptions = [hub.subscribe(MarketSelector()) for _ in range(limit + 1)]
    woken: list[int] = []

    async def stuck(index: int, subscription: Subscription) -> None:
        await subscription.wait(10)
        woken.append(index)
        await asyncio.Event().wait()  # never comes back to wait

    tasks = [asyncio.create_task(stuck(i, s)) for i, s in enumerate(subscriptions)]
    await asyncio.sleep(0)
    hub.publish(stored("KX-A"), [])
    await eventually(lambda: len(woken) == limit + 1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_subscribers_following_the_same_markets_share_one_chunk() -> None:
    hub = SnapshotHub()
    everything = [hub.subscribe(MarketSelector()) for _ in range(2)]
    on_a = [hub.subscribe(MarketSelector(frozenset({"KX-A"}))) for _ in range(2)]
    on_both = hub.subscribe(MarketSelector(frozenset({"KX-A", "KX-B"})))
    hub.publish(stored("KX-A", "KX-B", "KX-A"), [])
    first, second = (s.take_chunks() for s in everything)
    assert first[0] is second[0]
    assert first[0].serial is not None
    a_first, a_second = (s.take_chunks() for s in on_a)
    assert a_first[0] is a_second[0]
    assert len(a_first[0].items) == 2
    mine = on_both.take_chunks()
    assert mine[0].serial is None  # several markets merged: made for this subscription only
    assert [item.ticker for item in mine[0].items] == ["KX-A", "KX-B", "KX-A"]


def test_an_overflow_is_remembered_at_the_depth_it_reached() -> None:
    hub = SnapshotHub(queue_capacity=5)
    subscription = hub.subscribe(MarketSelector())
    hub.publish(stored(*["KX-A"] * 4), [])
    hub.publish(stored(*["KX-A"] * 3), [])
    assert subscription.overflowed
    assert subscription.depth == 0
    assert hub.take_peak_depths() == [7]
    assert hub.take_peak_depths() == [0]
    assert subscription.take_overflow() == 7
