"""The market model: deterministic, on the tick grid, bids only, full lifecycles."""

from __future__ import annotations

import pytest

from kfeed_sim.config import SimConfig
from kfeed_sim.market_model import (
    FIREHOSE_LIFETIME_FACTOR,
    PRICE_STRUCTURES,
    Exchange,
    MarketStatus,
    price_levels,
)
from tests.support.sim import START

LIFECYCLE = [
    MarketStatus.INITIALIZED,
    MarketStatus.ACTIVE,
    MarketStatus.CLOSED,
    MarketStatus.DETERMINED,
    MarketStatus.FINALIZED,
]


def exchange(
    seed: int = 5, steps: int = 150, firehose: bool = False, depth_changes: int = 0
) -> Exchange:
    model = Exchange(
        SimConfig(
            seed=seed,
            markets=8,
            start_time=START,
            history_steps=80,
            firehose=firehose,
            firehose_depth_changes=depth_changes,
        )
    )
    for _ in range(steps):
        model.step()
    return model


@pytest.mark.parametrize("firehose", [False, True])
def test_same_seed_gives_the_same_states_and_trades(firehose: bool) -> None:
    assert (
        exchange(seed=5, firehose=firehose).truth() == exchange(seed=5, firehose=firehose).truth()
    )


@pytest.mark.parametrize("firehose", [False, True])
def test_another_seed_gives_other_data(firehose: bool) -> None:
    assert (
        exchange(seed=5, firehose=firehose).truth() != exchange(seed=6, firehose=firehose).truth()
    )


def test_tickers_follow_kalshi_style() -> None:
    model = exchange()
    for ticker, market in model.markets.items():
        event_ticker, _, strike = ticker.rpartition("-")
        assert event_ticker == market.event_ticker
        assert market.event_ticker.startswith(market.series_ticker + "-")
        assert strike == f"T{market.floor_strike}"
        assert ticker in model.events[market.event_ticker].market_tickers


def test_every_settled_market_went_through_the_whole_lifecycle_in_order() -> None:
    model = exchange()
    settled = [m for m in model.markets.values() if m.status is MarketStatus.FINALIZED]
    assert len(settled) >= 5  # new markets replace settled ones, so the feed never dries up
    for market in settled:
        statuses = [s.status for s in market.states]
        first_seen = sorted(set(statuses), key=statuses.index)
        assert first_seen == LIFECYCLE
        assert statuses == sorted(statuses, key=LIFECYCLE.index)
        final = market.state
        assert final.result in ("yes", "no")
        assert final.settlement_value == (10_000 if final.result == "yes" else 0)
        times = [s.ts_us for s in market.states]
        assert times == sorted(times)
        assert len(set(times)) == len(times)


def test_quotes_and_trades_are_on_the_market_tick_grid() -> None:
    model = exchange()
    sub_penny_seen = False
    for market in model.markets.values():
        grid = set(market.levels) | {0, 10_000}
        for state in market.states:
            assert {state.yes_bid, state.yes_ask, state.no_bid, state.no_ask} <= grid
        for trade in market.trades:
            assert trade.yes_price in grid
            sub_penny_seen |= trade.yes_price % 100 != 0
    assert sub_penny_seen


@pytest.mark.parametrize("firehose", [False, True])
def test_books_are_bids_only_and_never_crossed(firehose: bool) -> None:
    model = exchange(steps=0, firehose=firehose)
    for _ in range(60):
        model.step()
        for market in model.markets.values():
            yes_bids, no_bids = market.orderbook()
            if not yes_bids:
                continue
            best_yes_ask = 10_000 - max(price for price, _ in no_bids)
            assert max(price for price, _ in yes_bids) < best_yes_ask
            assert market.state.yes_ask == best_yes_ask
            assert market.state.no_ask == 10_000 - market.state.yes_bid


@pytest.mark.parametrize(("firehose", "depth_changes"), [(False, 0), (True, 0), (True, 6)])
def test_book_deltas_replay_onto_the_previous_book(firehose: bool, depth_changes: int) -> None:
    model = exchange(steps=0, firehose=firehose, depth_changes=depth_changes)
    books = {
        ticker: {side: dict(bids) for side, bids in zip("yn", market.orderbook(), strict=True)}
        for ticker, market in model.markets.items()
    }
    for _ in range(40):
        events = model.step()
        for delta in events.book_deltas:
            book = books.setdefault(delta.ticker, {"y": {}, "n": {}})[delta.side[0]]
            book[delta.price] = book.get(delta.price, 0) + delta.delta
            if book[delta.price] == 0:
                del book[delta.price]
    for ticker, market in model.markets.items():
        yes_bids, no_bids = market.orderbook()
        assert sorted(books.get(ticker, {"y": {}})["y"].items()) == yes_bids
        assert sorted(books.get(ticker, {"n": {}})["n"].items()) == no_bids


def test_volume_adds_up_the_trades() -> None:
    for market in exchange().markets.values():
        assert market.state.volume == sum(t.count for t in market.trades)


def test_tapered_grid_is_fine_at_the_tails_and_coarse_in_the_middle() -> None:
    levels = price_levels(PRICE_STRUCTURES["tapered_deci_cent"])
    assert 10 in levels
    assert 9_990 in levels
    assert 5_010 not in levels
    assert 5_000 in levels


def test_live_steps_are_tick_interval_apart_and_history_precedes_them() -> None:
    model = Exchange(SimConfig(tick_interval=0.25, start_time=START, history_steps=10))
    assert model.time_of_step(1) - model.time_of_step(0) == 250_000
    assert model.time_of_step(-1) == model.time_of_step(0) - 60_000_000
    assert model.current_step == -1  # history done, live not started


def open_markets_changed(model: Exchange, steps: int) -> tuple[list[int], list[int], int]:
    """Per step: how many markets were open through it and how many of those sent a ticker
    frame; and the book deltas of all those steps."""
    open_counts, changed_counts, deltas = [], [], 0
    for _ in range(steps):
        before = {t for t, m in model.markets.items() if m.status is MarketStatus.ACTIVE}
        events = model.step()
        still_open = {t for t in before if model.markets[t].status is MarketStatus.ACTIVE}
        open_counts.append(len(still_open))
        changed_counts.append(len(still_open & set(events.ticker_markets)))
        deltas += len(events.book_deltas)
    return open_counts, changed_counts, deltas


def test_firehose_changes_every_open_market_at_every_step_with_about_one_delta() -> None:
    open_counts, changed_counts, deltas = open_markets_changed(exchange(steps=0, firehose=True), 60)
    assert min(open_counts) >= 8
    assert changed_counts == open_counts
    assert deltas < 2 * sum(open_counts)


def test_firehose_depth_changes_add_deltas_below_the_top_without_ticker_frames() -> None:
    deep = exchange(steps=0, firehose=True, depth_changes=6)
    open_counts, changed_counts, deltas = open_markets_changed(deep, 60)
    assert changed_counts == open_counts  # still one ticker frame per market and step
    assert deltas >= 7 * sum(open_counts)  # the top's change and six more
    assert deltas > 3 * open_markets_changed(exchange(steps=0, firehose=True), 60)[2]


def test_without_firehose_markets_rest_now_and_then_and_books_churn() -> None:
    open_counts, changed_counts, deltas = open_markets_changed(exchange(steps=0), 60)
    assert sum(changed_counts) < sum(open_counts)
    assert deltas > 5 * sum(open_counts)


def test_firehose_markets_live_a_hundred_times_longer() -> None:
    markets = exchange(steps=0, firehose=True).markets.values()
    assert FIREHOSE_LIFETIME_FACTOR == 100
    assert min(m.close_step - m.open_step for m in markets) >= 15 * FIREHOSE_LIFETIME_FACTOR
    assert max(m.close_step - m.open_step for m in exchange(steps=0).markets.values()) <= 120


@pytest.mark.parametrize("firehose", [False, True])
def test_book_history_gives_the_book_at_every_step(firehose: bool) -> None:
    """The truth's book history, replayed to any past step, is the book the sim held then."""
    model = exchange(steps=0, firehose=firehose)
    held: list[tuple[int, dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]]]] = []
    for _ in range(30):
        model.step()
        held.append(
            (
                model.now_us,
                {
                    ticker: tuple(sorted(side, reverse=True) for side in market.orderbook())  # type: ignore[misc]
                    for ticker, market in model.markets.items()
                },
            )
        )
    truth = model.truth(books=True)
    changed = 0
    for now_us, books in held:
        for ticker, book in books.items():
            assert model.markets[ticker].book_history.book_at(now_us) == book
            changed += bool(book[0])
    assert changed
    # sub-penny levels and fractional sizes occur, and the truth lists every change
    rows = [row for t in truth.values() for row in t.book_changes]
    assert any(price % 100 for _, _, price, _ in rows)
    assert any(size % 100 for _, _, _, size in rows)
    assert any(size == 0 for _, _, _, size in rows)  # levels empty
