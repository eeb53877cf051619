"""Hand-computed backtests: fills at the touch, fees, cash and position limits, settlement and
marking. Money in 1/10,000 USD, counts in 1/100 contract; the arithmetic is in the comments."""

from __future__ import annotations

from kfeed_server.backtest import EngineConfig, FeeRounding, Order, run_backtest
from kfeed_server.records import MarketRecord, MarketResult, OrderAction, Side, SnapshotRecord
from tests.support.backtest import at, quote, scripted_registry, settled

BUY, SELL, SETTLE, MARK = OrderAction.BUY, OrderAction.SELL, OrderAction.SETTLE, OrderAction.MARK
YES, NO = Side.YES, Side.NO


def test_threshold_round_trip_then_marked_at_the_bid() -> None:
    snapshots = [
        quote("A", 0, 1, 3_500, 3_800),  # ask 0.38 <= 0.40: buy 1 YES at the ask
        quote("A", 1, 2, 5_000, 5_200),  # bid 0.50 < 0.60: hold
        quote("A", 2, 3, 6_100, 6_300),  # bid 0.61 >= 0.60: sell at the bid
        quote("A", 3, 4, 3_000, 3_900),  # ask 0.39: buy again
        quote("A", 4, 5, 3_200, 3_400),  # held; the window ends unsettled
    ]
    config = EngineConfig(
        "threshold", ("A",), {"buy_below": 4_000, "sell_above": 6_000, "count": 100}
    )
    result = run_backtest(config, {}, snapshots)

    # Buy at 0.38: cost 3_800, fee 0.07 × 0.38 × 0.62 = 0.016492 → 0.02 = 200; cash 9_996_000.
    # Sell at 0.61: proceeds 6_100, fee 0.07 × 0.61 × 0.39 = 0.016653 → 200; net 5_900;
    #   realised 5_900 − 4_000 = 1_900; cash 10_001_900.
    # Buy at 0.39: 3_900 + fee 0.016653 → 200 = 4_100; cash 9_997_800.
    # Mark at the last bid 0.32: 3_200; unrealised 3_200 − 4_100 = −900.
    observed = [
        (e.action, e.side, e.count, e.price, e.fee, e.cash_after, e.position_after, e.realized_pnl)
        for e in result.executions
    ]
    assert observed == [
        (BUY, YES, 100, 3_800, 200, 9_996_000, 100, 0),
        (SELL, YES, 100, 6_100, 200, 10_001_900, 0, 1_900),
        (BUY, YES, 100, 3_900, 200, 9_997_800, 100, 0),
        (MARK, YES, 100, 3_200, 0, 9_997_800, 100, -900),
    ]
    assert [e.snapshot_id for e in result.executions] == [1, 3, 4, 5]
    assert [e.sequence for e in result.executions] == [1, 2, 3, 4]
    metrics = result.metrics
    assert metrics.total_pnl == 1_000  # 9_997_800 + 3_200 − 10_000_000
    assert metrics.total_pnl == sum(e.realized_pnl for e in result.executions)
    assert metrics.fees_paid == 600
    assert metrics.trade_count == 3
    assert metrics.win_rate == 1.0  # one closed round trip, +1_900
    assert metrics.profit_factor == 0.0  # no losing round trip
    assert metrics.expectancy == 1_900
    # Equity after each snapshot: cash + position at the bid.
    assert [p.equity for p in result.equity_curve] == [
        9_996_000 + 3_500,
        9_996_000 + 5_000,
        10_001_900,
        9_997_800 + 3_000,
        9_997_800 + 3_200,
    ]
    # Positions were open from minute 0 to 2 and from 3 to 4, out of 4 replayed minutes.
    assert metrics.exposure == 0.75


def test_settlement_pays_the_result_for_yes_and_no_positions() -> None:
    script = {1: [Order("WIN", YES, BUY, 200)], 2: [Order("LOSE", NO, BUY, 100)]}
    snapshots = [
        quote("WIN", 0, 1, 5_500, 6_000),  # YES ask 0.60
        quote("LOSE", 1, 2, 2_800, 3_000),  # NO ask 1 − 0.28 = 0.72
        quote("WIN", 10, 3, 9_000, 9_500),
    ]
    markets = {
        "WIN": settled("WIN", MarketResult.YES, 20),
        "LOSE": settled("LOSE", MarketResult.NO, 5),
    }
    config = EngineConfig("scripted", ("WIN", "LOSE"), end_time=at(60))
    result = run_backtest(config, markets, snapshots, registry=scripted_registry(script))

    settlements = [
        (e.ticker, e.side, e.count, e.price, e.realized_pnl, e.time)
        for e in result.executions
        if e.action is SETTLE
    ]
    # LOSE settles NO at minute 5 (before the snapshot at minute 10), WIN settles YES at 20.
    # WIN YES 2 @ 0.60: cost 12_000 + fee 0.07 × 2 × 0.6 × 0.4 = 0.0336 → 400; pays 2 × 1.00.
    # LOSE NO 1 @ 0.72: 7_200 + fee 0.07 × 0.72 × 0.28 = 0.014112 → 200; pays 1.00.
    assert settlements == [
        ("LOSE", NO, 100, 10_000, 10_000 - 7_400, at(5)),
        ("WIN", YES, 200, 10_000, 20_000 - 12_400, at(20)),
    ]
    assert result.metrics.total_pnl == 7_600 + 2_600
    assert result.metrics.fees_paid == 600
    # 10_000_000 − 12_400 − 7_400 + 20_000 + 10_000
    assert result.executions[-1].cash_after == 10_010_200
    assert all(e.action is not MARK for e in result.executions)
    assert result.metrics.win_rate == 1.0
    assert result.metrics.expectancy == 5_100  # (7_600 + 2_600) / 2
    assert result.equity_curve[-1].equity == 10_010_200


def test_buying_no_while_holding_yes_closes_yes_as_on_kalshi() -> None:
    script = {
        1: [Order("WIN", YES, BUY, 200), Order("WIN", NO, BUY, 100)],
        2: [Order("LOSE", YES, BUY, 100), Order("LOSE", NO, BUY, 100)],
    }
    snapshots = [
        quote("WIN", 0, 1, 5_500, 6_000),  # YES ask 0.60, NO ask 1 − 0.55 = 0.45
        quote("LOSE", 1, 2, 2_800, 3_000),  # YES ask 0.30, NO ask 1 − 0.28 = 0.72
        quote("WIN", 10, 3, 9_000, 9_500),
    ]
    markets = {
        "WIN": settled("WIN", MarketResult.YES, 20),
        "LOSE": settled("LOSE", MarketResult.NO, 5),
    }
    config = EngineConfig("scripted", ("WIN", "LOSE"), end_time=at(60))
    result = run_backtest(config, markets, snapshots, registry=scripted_registry(script))

    # WIN BUY YES 2 @ 0.60: 12_000 + fee 0.0336 → 400 = 12_400; cash 9_987_600; +2 YES.
    # WIN BUY NO 1 @ 0.45: 4_500 + fee 0.017325 → 200. It closes 1 YES: the YES+NO pair pays
    #   $1 = 10_000; released cost 12_400 × 1/2 = 6_200; realised 10_000 − 4_700 − 6_200 = −900
    #   (the same as selling 1 YES at 1 − 0.45 = 0.55 = the YES bid); cash +5_300 = 9_992_900.
    # LOSE BUY YES 1 @ 0.30: 3_000 + fee 0.0147 → 200; cash 9_989_700.
    # LOSE BUY NO 1 @ 0.72: 7_200 + fee 0.014112 → 200 closes it: 10_000 − 7_400 − 3_200 = −600;
    #   cash +2_600 = 9_992_300; LOSE is flat, so its NO settlement pays nothing.
    # WIN settles YES: 1 YES pays 10_000; realised 10_000 − 6_200 = 3_800; cash 10_002_300.
    observed = [
        (e.ticker, e.action, e.side, e.count, e.price, e.fee, e.cash_after, e.position_after,
         e.realized_pnl)
        for e in result.executions
    ]  # fmt: skip
    assert observed == [
        ("WIN", BUY, YES, 200, 6_000, 400, 9_987_600, 200, 0),
        ("WIN", BUY, NO, 100, 4_500, 200, 9_992_900, 100, -900),
        ("LOSE", BUY, YES, 100, 3_000, 200, 9_989_700, 100, 0),
        ("LOSE", BUY, NO, 100, 7_200, 200, 9_992_300, 0, -600),
        ("WIN", SETTLE, YES, 100, 10_000, 0, 10_002_300, 0, 3_800),
    ]
    assert result.metrics.total_pnl == 2_300  # −900 − 600 + 3_800
    assert result.metrics.fees_paid == 1_000
    # Round trips: WIN −900 + 3_800 = 2_900, LOSE −600.
    assert result.metrics.win_rate == 0.5
    assert result.metrics.profit_factor == 2_900 / 600
    assert result.metrics.expectancy == 1_150


def test_buying_more_no_than_the_yes_held_flips_the_position() -> None:
    script = {
        1: [Order("F", YES, BUY, 100)],
        2: [Order("F", NO, BUY, 300), Order("F", YES, SELL, 100)],
    }
    snapshots = [quote("F", 0, 1, 4_000, 4_200), quote("F", 1, 2, 4_000, 4_200)]
    result = run_backtest(
        EngineConfig("scripted", ("F",)), {}, snapshots, registry=scripted_registry(script)
    )
    # BUY YES 1 @ 0.42: 4_200 + fee 0.07 × 0.42 × 0.58 = 0.017052 → 200; cash 9_995_600.
    # BUY NO 3 @ 0.60 (1 − 0.40): 18_000, fee 0.07 × 3 × 0.6 × 0.4 = 0.0504 → 600. One contract
    #   closes the YES: its share 6_000 + 200, the pair pays 10_000, released 4_400, realised
    #   10_000 − 6_200 − 4_400 = −600. Two open NO at 12_000 + 400 = 12_400.
    #   Cash 9_995_600 + 10_000 − 18_600 = 9_987_000; position −200 (2 NO).
    # SELL YES 1: nothing YES is held any more, so it is rejected.
    # Marked at the NO bid 1 − 0.42 = 0.58: 2 × 5_800 = 11_600; unrealised 11_600 − 12_400.
    observed = [
        (e.action, e.side, e.count, e.price, e.fee, e.cash_after, e.position_after, e.realized_pnl)
        for e in result.executions
    ]
    assert observed == [
        (BUY, YES, 100, 4_200, 200, 9_995_600, 100, 0),
        (BUY, NO, 300, 6_000, 600, 9_987_000, -200, -600),
        (MARK, NO, 200, 5_800, 0, 9_987_000, -200, -800),
    ]
    assert result.rejected_orders == 1
    assert result.metrics.total_pnl == -1_400  # 9_987_000 + 11_600 − 10_000_000


def test_settlement_after_the_window_is_marked_at_the_bid_instead() -> None:
    script = {1: [Order("LATE", NO, BUY, 100)]}
    snapshots = [quote("LATE", 0, 1, 4_800, 5_000), quote("LATE", 30, 2, 4_000, 4_100)]
    markets = {"LATE": settled("LATE", MarketResult.NO, 120)}
    config = EngineConfig("scripted", ("LATE",), end_time=at(60))
    result = run_backtest(config, markets, snapshots, registry=scripted_registry(script))

    # NO ask 1 − 0.48 = 0.52: 5_200 + fee 0.07 × 0.52 × 0.48 = 0.017472 → 200 = 5_400.
    # Marked at the last NO bid 1 − 0.41 = 0.59 at the window's end: 5_900 − 5_400 = +500.
    mark = result.executions[-1]
    assert (mark.action, mark.side, mark.price, mark.realized_pnl) == (MARK, NO, 5_900, 500)
    assert mark.time == at(60)
    assert mark.cash_after == 10_000_000 - 5_400
    assert result.metrics.total_pnl == 500
    assert result.metrics.win_rate == 0.0  # an open position is not a closed round trip


def test_no_fill_without_a_price_and_never_at_the_mid() -> None:
    script = {
        1: [Order("A", YES, BUY, 100)],  # no YES ask: rejected
        2: [Order("A", YES, BUY, 100)],  # fills at the ask 0.47, not the mid 0.45
        3: [Order("A", YES, SELL, 100)],  # no YES bid: rejected
        4: [Order("B", YES, BUY, 100)],  # B has no snapshot yet: rejected
    }
    snapshots = [
        quote("A", 0, 1, 4_000, None),
        quote("A", 1, 2, 4_300, 4_700),
        quote("A", 2, 3, None, 4_700),
        quote("A", 3, 4, 4_300, 4_700),
    ]
    config = EngineConfig("scripted", ("A", "B"))
    result = run_backtest(config, {}, snapshots, registry=scripted_registry(script))
    fills = [e for e in result.executions if e.action in (BUY, SELL)]
    assert [(e.snapshot_id, e.price) for e in fills] == [(2, 4_700)]
    assert result.rejected_orders == 3


def test_slippage_is_paid_on_both_sides_and_the_fee_is_on_the_touch() -> None:
    script = {1: [Order("A", YES, BUY, 100)], 2: [Order("A", YES, SELL, 100)]}
    snapshots = [quote("A", 0, 1, 3_900, 4_000), quote("A", 1, 2, 5_000, 5_200)]
    config = EngineConfig("scripted", ("A",), slippage=100)
    result = run_backtest(config, {}, snapshots, registry=scripted_registry(script))
    buy, sell = result.executions
    # Buy at 0.40 + 0.01; fee on 0.40: 0.07 × 0.4 × 0.6 = 0.0168 → 200. Cash −4_300.
    assert (buy.price, buy.fee, buy.cash_after) == (4_100, 200, 9_995_700)
    # Sell at 0.50 − 0.01; fee on 0.50: 0.0175 → 200. Net 4_700; realised 4_700 − 4_300 = 400.
    assert (sell.price, sell.fee, sell.cash_after, sell.realized_pnl) == (
        4_900,
        200,
        10_000_400,
        400,
    )


def test_buy_is_reduced_to_what_cash_can_pay() -> None:
    script = {1: [Order("A", YES, BUY, 500)]}
    config = EngineConfig("scripted", ("A",), initial_cash=10_000)  # $1.00
    result = run_backtest(
        config, {}, [quote("A", 0, 1, 3_900, 4_000)], registry=scripted_registry(script)
    )
    # At 0.40 a count n costs n × 40 plus ceil-to-cent(0.07 × n/100 × 0.24):
    #   n = 238: 9_520 + fee(0.039984 → 400) = 9_920 <= 10_000
    #   n = 239: 9_560 + fee(0.040152 → 500) = 10_060 > 10_000
    buy = result.executions[0]
    assert (buy.count, buy.fee, buy.cash_after) == (238, 400, 80)


def test_sell_is_capped_by_the_position_and_buys_by_max_position() -> None:
    script = {
        1: [Order("A", YES, BUY, 300)],  # max_position 150: fills 150
        2: [Order("A", YES, BUY, 100)],  # already at the limit: rejected
        3: [Order("A", YES, SELL, 1_000)],  # only 150 held: sells 150
    }
    snapshots = [quote("A", k, k + 1, 4_000, 4_200) for k in range(3)]
    config = EngineConfig("scripted", ("A",), max_position=150)
    result = run_backtest(config, {}, snapshots, registry=scripted_registry(script))
    assert [(e.action, e.count) for e in result.executions] == [(BUY, 150), (SELL, 150)]
    assert result.rejected_orders == 1


def test_fills_are_capped_by_displayed_size_shared_within_a_snapshot() -> None:
    script = {
        # The YES ask level shows 120: the first buy takes it all, the second gets nothing.
        1: [Order("A", YES, BUY, 300), Order("A", YES, BUY, 100), Order("A", NO, BUY, 500)],
    }
    # Buying NO hits the YES bid level (NO ask = 1 − YES bid), which shows 80.
    snapshot = quote("A", 0, 1, 4_000, 4_200, yes_bid_size=80, yes_ask_size=120)
    config = EngineConfig("scripted", ("A",), cap_by_displayed_size=True)
    result = run_backtest(config, {}, [snapshot], registry=scripted_registry(script))
    fills = [(e.side, e.count) for e in result.executions if e.action is BUY]
    assert fills == [(YES, 120), (NO, 80)]
    assert result.rejected_orders == 1


def test_ten_thousandth_rounding_and_custom_rate() -> None:
    script = {1: [Order("A", YES, BUY, 100)]}
    config = EngineConfig(
        "scripted",
        ("A",),
        taker_fee_rate_ten_thousandths=350,
        fee_rounding=FeeRounding.TEN_THOUSANDTH,
    )
    result = run_backtest(
        config, {}, [quote("A", 0, 1, 4_900, 5_000)], registry=scripted_registry(script)
    )
    # 0.035 × 1 × 0.5 × 0.5 = 0.00875 → $0.0088.
    assert result.executions[0].fee == 88


def test_scalar_settlement_pays_the_settlement_value() -> None:
    script = {1: [Order("S", YES, BUY, 100)], 2: [Order("T", NO, BUY, 100)]}
    markets = {
        ticker: MarketRecord(
            ticker=ticker,
            result=MarketResult.SCALAR,
            settlement_value=3_000,
            settlement_time=at(5),
        )
        for ticker in ("S", "T")
    }
    snapshots: list[SnapshotRecord] = [
        quote("S", 0, 1, 4_000, 4_000),
        quote("T", 0, 2, 4_000, 4_000),
    ]
    result = run_backtest(
        EngineConfig("scripted", ("S", "T")),
        markets,
        snapshots,
        registry=scripted_registry(script),
    )
    # YES is paid the settlement value $0.30, NO the rest, $0.70.
    payouts = [(e.side, e.price) for e in result.executions if e.action is SETTLE]
    assert payouts == [(YES, 3_000), (NO, 7_000)]
