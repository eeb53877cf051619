"""Hand-computed order types and fill models: DEPTH walks the book, limit orders rest and fill as
makers by the queue model, cancels, expiry, latency, and no look-ahead at results. Money in
1/10,000 USD, counts in 1/100 contract; the arithmetic is in the comments."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import ClassVar

from kfeed_server.backtest import EngineConfig, Order, run_backtest
from kfeed_server.backtest.books import BookState
from kfeed_server.backtest.engine import MarketEvent
from kfeed_server.backtest.fees import FeeType, MarketFees
from kfeed_server.backtest.orders import Cancel, Instruction
from kfeed_server.backtest.strategy import MarketView, PortfolioView, Strategy, StrategyRegistry
from kfeed_server.records import (
    MarketResult,
    OrderAction,
    Side,
    SnapshotRecord,
    TradeRecord,
)
from kfeed_server.records.backtest import FillModel
from tests.support.backtest import at, quote, scripted_registry, settled

BUY, SELL = OrderAction.BUY, OrderAction.SELL
YES, NO = Side.YES, Side.NO


def _trade(minutes: float, yes_price: int, count: int, taker: Side) -> TradeRecord:
    return TradeRecord(f"t{minutes}", "M", yes_price, 10_000 - yes_price, count, taker, at(minutes))


def test_depth_walks_the_book_level_by_level_within_the_displayed_size() -> None:
    # YES bids 0.40 × 3, 0.39 × 5; NO bids 0.58 × 2, 0.57 × 4, i.e. YES asks 0.42 × 2, 0.43 × 4.
    book = BookState("A", at(0), ((4_000, 300), (3_900, 500)), ((5_800, 200), (5_700, 400)))
    events: list[MarketEvent] = [
        book,
        quote("A", 0, 1, 4_000, 4_200),
        quote("A", 1, 2, 4_000, 4_200),
    ]
    script = {
        1: [Order("A", YES, BUY, 500), Order("A", YES, BUY, 1_000)],
        2: [Order("A", YES, SELL, 600)],
    }
    config = EngineConfig("scripted", ("A",), fill_model=FillModel.DEPTH)
    result = run_backtest(config, {}, events, registry=scripted_registry(script))

    # BUY 5: 2 @ 0.42 + 3 @ 0.43 = 0.84 + 1.29 = $2.13 = 21_300; average ⌈2_130_000 / 500⌉ = 4_260;
    #   fee 0.07 × (2 × 0.42 × 0.58 + 3 × 0.43 × 0.57) = 0.07 × 1.2225 = 0.085575 → 900;
    #   cash 10_000_000 − 22_200 = 9_977_800.
    # BUY 10 more at the same snapshot: only 1 left displayed at 0.43: 4_300 + fee 0.017157 → 200;
    #   cash 9_973_300. 6 YES held at 22_200 + 4_500 = 26_700.
    # SELL 6 at the next snapshot (sizes shown again): 3 @ 0.40 + 3 @ 0.39 = 23_700, average
    #   ⌊2_370_000 / 600⌋ = 3_950; fee 0.07 × (3 × 0.4 × 0.6 + 3 × 0.39 × 0.61) = 0.100359 → 1_100;
    #   net 22_600, realised 22_600 − 26_700 = −4_100; cash 9_995_900.
    observed = [
        (e.action, e.count, e.price, e.fee, e.cash_after, e.realized_pnl) for e in result.executions
    ]
    assert observed == [
        (BUY, 500, 4_260, 900, 9_977_800, 0),
        (BUY, 100, 4_300, 200, 9_973_300, 0),
        (SELL, 600, 3_950, 1_100, 9_995_900, -4_100),
    ]
    assert result.metrics.total_pnl == -4_100
    assert result.fingerprint.event_count == 1  # the book is part of what the run read


def test_depth_without_a_book_takes_the_top_of_book_and_limits_stop_the_walk() -> None:
    events = [quote("A", 0, 1, 4_000, 4_200, yes_bid_size=300, yes_ask_size=100)]
    script = {1: [Order("A", YES, BUY, 500, limit_price=4_100), Order("A", YES, BUY, 500)]}
    config = EngineConfig("scripted", ("A",), fill_model=FillModel.DEPTH)
    result = run_backtest(config, {}, events, registry=scripted_registry(script))
    # The limit 0.41 is below the ask 0.42: nothing taken, the order rests. The market order
    # takes the 1 contract displayed at 0.42: 4_200 + fee 0.017052 → 200.
    bought = [(e.count, e.price, e.fee) for e in result.executions if e.action is BUY]
    assert bought == [(100, 4_200, 200)]


def test_a_resting_bid_fills_as_a_maker_after_the_queue_ahead_trades() -> None:
    events: list[SnapshotRecord | TradeRecord] = [
        quote("M", 0, 1, 4_000, 4_200, yes_bid_size=300, yes_ask_size=100),
        _trade(1, 4_000, 250, NO),  # sellers hit the 0.40 bids: 3 ahead → 0.5 ahead
        _trade(2, 4_000, 150, NO),  # 0.5 more ahead, then 1 of ours
        quote("M", 3, 2, 3_800, 3_900),  # the ask 0.39 is below our 0.40: the rest fills
    ]
    script = {1: [Order("M", YES, BUY, 200, limit_price=4_000, client_order_id=7)]}
    fees = {"M": MarketFees(FeeType.QUADRATIC_WITH_MAKER_FEES, 10_000)}
    result = run_backtest(
        EngineConfig("scripted", ("M",)), {}, events, fees=fees, registry=scripted_registry(script)
    )
    # Each maker fill: 1 @ 0.40 = 4_000 + maker fee 0.0175 × 0.4 × 0.6 = 0.0042 → 100.
    observed = [(e.time, e.count, e.price, e.fee, e.cash_after) for e in result.executions]
    assert observed[:2] == [
        (at(2), 100, 4_000, 100, 9_995_900),
        (at(3), 100, 4_000, 100, 9_991_800),
    ]
    assert result.maker_fills == 2
    assert result.metrics.fees_paid == 200


class _Queue(Strategy):
    """Joins the 0.40 bid at the first snapshot and records the queue ahead of it after each."""

    name = "queue"
    description = "records queue positions"
    seen: list[int | None]

    def on_start(self, market: MarketView, portfolio: PortfolioView) -> None:
        self.seen = []
        _Queue.last = self

    def on_snapshot(
        self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        orders = portfolio.open_orders("M")
        if orders:
            self.seen.append(orders[0].ahead)
        if snapshot.snapshot_id == 1:
            return (Order("M", YES, BUY, 100, limit_price=4_000, client_order_id=1),)
        if snapshot.snapshot_id == 4:
            return (Cancel("M", 1),)
        return ()

    last: _Queue


def _queue_run(share: int) -> list[int | None]:
    registry = StrategyRegistry()
    registry.register(_Queue)
    events = [
        quote("M", 0, 1, 4_000, 4_200, yes_bid_size=300),  # join behind 3 contracts
        quote("M", 1, 2, 4_000, 4_200, yes_bid_size=500),  # 2 more join behind us
        quote("M", 2, 3, 4_000, 4_200, yes_bid_size=400),  # 1 cancelled, nothing traded
        quote("M", 3, 4, 4_000, 4_200, yes_bid_size=150),  # the level is smaller than our place
        quote("M", 4, 5, 4_000, 4_200, yes_bid_size=150),  # cancelled at snapshot 4
    ]
    config = EngineConfig("queue", ("M",), queue_cancel_share_ten_thousandths=share)
    run_backtest(config, {}, events, registry=registry)
    return _Queue.last.seen


def test_the_queue_ahead_shrinks_by_the_documented_share_of_cancellations() -> None:
    # Seen at snapshots 2, 3 and 4 (cancelled at 4). Joined behind 300; growth to 500 is behind
    # us. Nothing trades, so every decrease is cancellations, a share s of them ahead of us:
    #   at 3: 100 cancelled, ahead = 300 − s × 100;
    #   at 4: 250 cancelled, ahead = min(ahead − s × 250, 150) (never more than the level).
    assert _queue_run(0) == [300, 300, 150]  # risk-averse: cancels are all behind us
    assert _queue_run(5_000) == [300, 250, 125]  # 250 − 125
    assert _queue_run(10_000) == [300, 200, 0]  # 200 − 250, floored at 0


def test_cancel_and_expiry_remove_resting_orders() -> None:
    events = [quote("M", k, k + 1, 4_000, 4_200, yes_bid_size=100) for k in range(4)]
    script: dict[int, list[Instruction]] = {
        1: [
            Order("M", YES, BUY, 100, limit_price=3_000, client_order_id=1),
            Order("M", YES, BUY, 100, limit_price=3_100, expire_after=timedelta(minutes=2)),
        ],
        2: [Cancel("M", 1)],
    }
    result = run_backtest(
        EngineConfig("scripted", ("M",)), {}, events, registry=scripted_registry(script)
    )
    # The second order expires at minute 2, at the snapshot of minute 2.
    assert result.expired_orders == 1
    assert result.executions == []


def test_latency_delays_an_order_to_the_book_in_force_when_it_arrives() -> None:
    events = [
        quote("A", 0, 1, 4_000, 4_200),
        quote("A", 1, 2, 4_300, 4_500),
        quote("A", 2, 3, 4_600, 4_800),
    ]
    script = {1: [Order("A", YES, BUY, 100)]}

    def fill(latency: timedelta) -> tuple[object, ...]:
        config = EngineConfig("scripted", ("A",), latency=latency)
        (execution, *_) = run_backtest(
            config, {}, events, registry=scripted_registry(script)
        ).executions
        return execution.time, execution.price

    # Decided at minute 0. Arriving at 0:30, the book in force is still minute 0's: ask 0.42.
    assert fill(timedelta(seconds=30)) == (at(0.5), 4_200)
    # Arriving at 1:30, minute 1's book is in force: ask 0.45.
    assert fill(timedelta(seconds=90)) == (at(1.5), 4_500)
    # Arriving exactly at minute 2 meets minute 2's book: ask 0.48.
    assert fill(timedelta(minutes=2)) == (at(2), 4_800)


class _Peek(Strategy):
    """Records what ``market()`` says about the result at each snapshot."""

    name = "peek"
    description = "reads the result"
    seen: ClassVar[list[MarketResult]] = []

    def on_snapshot(
        self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        record = market.market("A")
        assert record is not None
        _Peek.seen.append(record.result)
        return ()


def test_a_strategy_cannot_read_the_result_before_the_settlement_time() -> None:
    registry = StrategyRegistry()
    registry.register(_Peek)
    _Peek.seen = []
    events = [quote("A", k, k + 1, 4_000, 4_200) for k in range(4)]
    markets = {"A": settled("A", MarketResult.YES, 2)}
    run_backtest(EngineConfig("peek", ("A",)), markets, events, registry=registry)
    unknown = MarketResult.UNSPECIFIED
    assert _Peek.seen == [unknown, unknown, MarketResult.YES, MarketResult.YES]


def test_the_spread_maker_buys_at_the_bid_and_sells_at_the_ask_as_a_maker() -> None:
    events: list[MarketEvent] = [
        quote("M", 0, 1, 4_000, 4_300, yes_bid_size=200),  # spread 0.03 >= 0.02: bid 1 @ 0.40
        _trade(1, 4_000, 300, NO),  # 2 ahead trade, then our 1 contract: bought @ 0.40
        quote("M", 2, 2, 4_000, 4_300, yes_bid_size=100),  # holding 1: offer it @ 0.43
        quote("M", 3, 3, 4_400, 4_600),  # the bid 0.44 crosses our 0.43 offer: sold
    ]
    config = EngineConfig("spread_maker", ("M",), {"count": 100})
    result = run_backtest(config, {}, events)
    # Quadratic series: makers pay no fee. Bought 4_000, sold 4_300: +300.
    observed = [(e.action, e.count, e.price, e.fee, e.realized_pnl) for e in result.executions]
    assert observed == [(BUY, 100, 4_000, 0, 0), (SELL, 100, 4_300, 0, 300)]
    assert result.maker_fills == 2
    assert result.metrics.total_pnl == 300
