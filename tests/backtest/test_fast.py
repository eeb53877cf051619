"""The compiled path (threshold, favourite-hold, mean reversion, momentum) gives exactly the
event engine's result (``BacktestResult ==``: executions, curve, fingerprint, every metric and
count), over random markets with settlements, caps, slippage, position and cash limits, fee terms
of each type and windows, and on the edges (an empty window, one snapshot, a market settling
between two snapshots); the runs it cannot take exactly go to the engine."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import numpy as np
import pytest

from kfeed_server.backtest import EngineConfig, FeeRounding, Fingerprinter, run_backtest
from kfeed_server.backtest.config import fast_path_applies
from kfeed_server.backtest.engine import MarketEvent, StrategyError
from kfeed_server.backtest.fast import columns_from_records, run_fast, sweep_fast
from kfeed_server.backtest.fees import FeeType, MarketFees
from kfeed_server.backtest.market_events import reads_trades
from kfeed_server.records import MarketResult, OrderAction, Side, SnapshotRecord, TradeRecord
from kfeed_server.records.backtest import FillModel, ParamValue
from tests.support.backtest import at, quote, settled

TICKERS = ("A", "B", "C")


def _walk(count: int, seed: int, *, calm: bool = False) -> list[SnapshotRecord]:
    """Random quotes of TICKERS; ``calm``: the mid mostly stays and the spread is $0.02, so a
    market maker's quotes stand across snapshots and their queues move."""
    rng = np.random.default_rng(seed)
    mids = {t: 5_000 for t in TICKERS}
    rows = []
    for k in range(count):
        ticker = TICKERS[int(rng.integers(0, 3))]
        moves = [-100, 0, 0, 0, 0, 0, 100] if calm else [-300, -100, 0, 100, 300]
        mids[ticker] = int(np.clip(mids[ticker] + rng.choice(moves), 200, 9_800))
        spread = 200 if calm else int(rng.integers(1, 4)) * 100
        bid = mids[ticker] - spread // 2
        ask = bid + spread
        # Sometimes a side is missing or the size is shown.
        missing = rng.random()
        rows.append(
            quote(
                ticker,
                k * 7.3,  # minutes: the data spans several days
                k + 1,
                None if missing < 0.03 else bid,
                None if 0.03 <= missing < 0.06 else ask,
                yes_bid_size=int(rng.integers(0, 400)) if rng.random() < 0.5 else None,
                yes_ask_size=int(rng.integers(0, 400)) if rng.random() < 0.5 else None,
            )
        )
    return rows


MARKETS = {
    "A": settled("A", MarketResult.YES, 3_000),
    "B": settled("B", MarketResult.NO, 20_000),  # after the data: settles in finish()
}
FEES = {
    "A": MarketFees(FeeType.QUADRATIC, 5_000),
    "B": MarketFees(FeeType.QUADRATIC_WITH_MAKER_FEES, 15_000),
    "C": MarketFees(FeeType.FLAT, 10_000),
}


def _in_window(rows: list[SnapshotRecord], config: EngineConfig) -> list[SnapshotRecord]:
    start, end = config.start_time, config.end_time
    return [r for r in rows if (start is None or r.exchange_time >= start)
            and (end is None or r.exchange_time < end)]  # fmt: skip


def _fingerprinter(rows: list[SnapshotRecord]) -> Fingerprinter:
    fingerprinter = Fingerprinter()
    for row in rows:
        fingerprinter.add(row)
    return fingerprinter


CASES = [
    {},
    {"cap_by_displayed_size": True, "slippage": 50},
    {"max_position": 150, "initial_cash": 20_000},
    {"fee_rounding": FeeRounding.TEN_THOUSANDTH, "initial_cash": 7_000},
    {"start_time": at(300), "end_time": at(5_000)},
]


RULES = [
    EngineConfig("threshold", TICKERS, {"buy_below": 4_600, "sell_above": 5_400, "count": 250}),
    # Favourites at 55-90 cents: YES and NO positions, held to settlement, with forecasts.
    EngineConfig("favourite_hold", TICKERS, {"min_price": 5_500, "max_price": 9_000, "count": 250}),
    # YES and NO entries and exits (sales of either side), on a short window.
    EngineConfig(
        "mean_reversion", TICKERS, {"window": 8, "entry_z": 1.2, "exit_z": 0.3, "count": 250}
    ),
    # Moves of at least $0.015 over 3 mids: YES and NO entries, exits on reversals.
    EngineConfig("momentum", TICKERS, {"lookback": 3, "threshold": 150, "count": 250}),
]


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("changes", CASES)
@pytest.mark.parametrize("rule", RULES, ids=lambda c: c.strategy)
def test_the_compiled_path_equals_the_engine(
    seed: int, changes: dict[str, object], rule: EngineConfig
) -> None:
    rows = _walk(1_500, seed)
    config = replace(rule, **changes)  # type: ignore[arg-type]
    window = _in_window(rows, config)
    expected = run_backtest(config, MARKETS, window, fees=FEES)
    result = run_fast(
        config, MARKETS, columns_from_records(window, TICKERS), _fingerprinter(window), fees=FEES
    )
    assert result is not None
    assert expected.metrics.trade_count > 0
    if rule.strategy != "threshold" and not changes:
        # Both sides held, and forecasts graded: the NO path and the Brier score are compared
        # (small cash or a short window may hold one side only).
        assert {e.side for e in expected.executions} == {Side.YES, Side.NO}
        assert rule.strategy != "favourite_hold" or expected.metrics.brier_score is not None
    assert result.executions == expected.executions
    assert result.equity_curve == expected.equity_curve
    assert result.metrics == expected.metrics
    assert result.fingerprint == expected.fingerprint
    assert result == expected


def test_a_sweep_reads_the_columns_once_and_falls_back_where_it_must() -> None:
    rows = _walk(800, 3)
    columns = columns_from_records(rows, TICKERS)
    base = EngineConfig("threshold", TICKERS, {"buy_below": 4_000, "sell_above": 6_000})
    configs = [
        replace(base, parameters={"buy_below": low, "sell_above": 6_000}) for low in (3_500, 4_500)
    ] + [replace(base, fill_model=FillModel.DEPTH), replace(base, latency=timedelta(seconds=1))]
    results = sweep_fast(configs, {}, columns, [_fingerprinter(rows) for _ in configs])
    assert results[2] is None
    assert results[3] is None
    for config, result in zip(configs[:2], results[:2], strict=True):
        assert result is not None
        assert result.metrics == run_backtest(config, {}, rows).metrics


MAKER = EngineConfig(
    "spread_maker", TICKERS, {"min_spread": 200, "max_inventory": 400, "count": 150}
)

EDGE_RULES = [
    replace(RULES[0], parameters={"buy_below": 4_000, "sell_above": 6_000, "count": 300}),
    replace(RULES[1], parameters={"min_price": 3_500, "max_price": 9_500, "count": 300}),
    replace(RULES[2], parameters={"window": 2, "entry_z": 0.5, "exit_z": 0.0, "count": 300}),
    replace(RULES[3], parameters={"lookback": 1, "threshold": 100, "count": 300}),
]


def _edge_rows() -> list[SnapshotRecord]:
    # A: 3,900/4,100 then 3,500/3,700 then 4,600/4,800 (every rule trades); A settles YES at
    # 2.5 min, between its second and third snapshots, so the third is after settlement.
    # B: one snapshot only.
    return [
        quote("A", 1, 1, 3_900, 4_100, yes_bid_size=500, yes_ask_size=500),
        quote("B", 1.5, 2, 6_000, 6_400),
        quote("A", 2, 3, 3_500, 3_700),
        quote("A", 3, 4, 4_600, 4_800),
    ]


@pytest.mark.parametrize(
    "fees",
    [
        {},
        {"A": MarketFees(FeeType.QUADRATIC_WITH_MAKER_FEES, 20_000)},
        {"A": MarketFees(FeeType.FLAT, 10_000), "B": MarketFees(FeeType.FLAT, 5_000)},
    ],
    ids=["quadratic", "with_maker_fees", "flat"],
)
@pytest.mark.parametrize(
    "window",
    [(None, None), (at(2), at(2.5)), (at(10), at(20)), (at(1.5), at(1.6))],
    ids=["all", "one_A_snapshot", "empty", "one_B_snapshot"],
)
@pytest.mark.parametrize("rule", EDGE_RULES, ids=lambda c: c.strategy)
def test_the_compiled_path_equals_the_engine_on_the_edges(
    rule: EngineConfig, window: tuple[datetime | None, datetime | None], fees: dict[str, MarketFees]
) -> None:
    rows = _edge_rows()
    start, end = window
    config = replace(rule, tickers=("A", "B"), start_time=start, end_time=end)
    kept = _in_window(rows, config)
    markets = {"A": settled("A", MarketResult.YES, 2.5)}
    expected = run_backtest(config, markets, kept, fees=fees)
    result = run_fast(
        config, markets, columns_from_records(kept, ("A", "B")), _fingerprinter(kept), fees=fees
    )
    assert result == expected
    if window == (None, None):
        # Something traded, was settled mid-run and was refused after the settlement.
        assert any(e.action is OrderAction.SETTLE for e in expected.executions)
        assert expected.metrics.trade_count > 0


@pytest.mark.parametrize("rule", [*RULES, MAKER], ids=lambda c: c.strategy)
@pytest.mark.parametrize(
    "changes",
    [{"latency": timedelta(milliseconds=1)}, {"fill_model": FillModel.DEPTH}],
    ids=["latency", "depth"],
)
def test_runs_the_kernel_cannot_take_exactly_run_in_the_engine(
    rule: EngineConfig, changes: dict[str, object]
) -> None:
    # The kernel neither delays instructions nor walks books: such runs read trades (and books)
    # and go through the event engine.
    config = replace(rule, **changes)  # type: ignore[arg-type]
    assert fast_path_applies(rule)
    assert not fast_path_applies(config)
    assert reads_trades(config, {})
    rows = _edge_rows()
    assert run_fast(config, {}, columns_from_records(rows, TICKERS), _fingerprinter(rows)) is None


def _trades_for(rows: list[SnapshotRecord], seed: int) -> list[TradeRecord]:
    """Public trades among ``rows``: at a snapshot's time or between two, at (or through) the
    touch of the market's latest quotes, either taker side, so resting bids and offers see their
    queues consumed and are filled."""
    rng = np.random.default_rng(seed)
    trades = []
    for k, row in enumerate(rows):
        if rng.random() < 0.5 or row.yes_bid is None or row.yes_ask is None:
            continue
        hits_bid = rng.random() < 0.5  # a taker selling YES (buying NO) hits the YES bids
        touch = row.yes_bid if hits_bid else row.yes_ask
        price = int(np.clip(touch + int(rng.choice([-100, 0, 0, 0, 100])), 1, 9_999))
        later = timedelta(minutes=float(rng.choice([0.0, 0.0, 1.0, 3.0])))
        trades.append(
            TradeRecord(f"t{k}", row.ticker, price, 10_000 - price, int(rng.integers(1, 400)),
                        Side.NO if hits_bid else Side.YES, row.exchange_time + later)
        )  # fmt: skip
    return sorted(trades, key=lambda t: t.create_time)


def _merged(rows: list[SnapshotRecord], trades: list[TradeRecord]) -> list[MarketEvent]:
    """The worker's order: each trade before the first snapshot at or after its time."""
    events: list[MarketEvent] = []
    waiting = list(trades)
    for row in rows:
        while waiting and waiting[0].create_time <= row.exchange_time:
            events.append(waiting.pop(0))
        events.append(row)
    return events + waiting


@pytest.mark.parametrize(("seed", "calm"), [(1, False), (2, False), (3, True), (4, True)])
@pytest.mark.parametrize(
    "changes",
    [
        *CASES,
        {"queue_cancel_share_ten_thousandths": 5_000, "maker_fee_rate_ten_thousandths": 300},
        {"queue_cancel_share_ten_thousandths": 10_000, "initial_cash": 3_000},
    ],
)
def test_the_compiled_market_maker_equals_the_engine(
    seed: int, calm: bool, changes: dict[str, object]
) -> None:
    rows = _walk(1_500, seed, calm=calm)
    trades = _trades_for(rows, seed)
    config = replace(MAKER, **changes)  # type: ignore[arg-type]
    window = _in_window(rows, config)
    expected = run_backtest(config, MARKETS, _merged(window, trades), fees=FEES)
    columns = columns_from_records(window, TICKERS)
    result = run_fast(config, MARKETS, columns, _fingerprinter(window), fees=FEES, trades=trades)
    assert result is not None
    # Resting orders filled as a maker, by trades and by prices through them, and the trades
    # fingerprinted.
    assert expected.maker_fills > 10
    assert expected.fingerprint.event_count > 0
    assert result.executions == expected.executions
    assert result.equity_curve == expected.equity_curve
    assert result.metrics == expected.metrics
    assert result == expected


@pytest.mark.parametrize(
    "fees",
    [
        {},
        {"A": MarketFees(FeeType.QUADRATIC_WITH_MAKER_FEES, 20_000)},
        {"A": MarketFees(FeeType.FLAT)},
    ],
    ids=["quadratic", "with_maker_fees", "flat"],
)
@pytest.mark.parametrize(
    "window",
    [(None, None), (at(2), at(2.5)), (at(10), at(20)), (at(1.5), at(1.6))],
    ids=["all", "one_A_snapshot", "empty", "one_B_snapshot"],
)
def test_the_compiled_market_maker_equals_the_engine_on_the_edges(
    window: tuple[datetime | None, datetime | None], fees: dict[str, MarketFees]
) -> None:
    # A: the bid 3,900 rests at 1 min; a trade at 1.2 min sells 6 contracts into it (5 shown
    # ahead), filling 1; the 2 min quotes move; A settles YES at 2.5 min with the contract held,
    # and the 3 min quotes are refused (settled).
    rows = _edge_rows()
    trades = [TradeRecord("t1", "A", 3_900, 6_100, 600, Side.NO, at(1.2))]
    start, end = window
    parameters: dict[str, ParamValue] = {"min_spread": 100, "max_inventory": 300, "count": 100}
    config = replace(
        MAKER, tickers=("A", "B"), start_time=start, end_time=end, parameters=parameters
    )
    kept = _in_window(rows, config)
    markets = {"A": settled("A", MarketResult.YES, 2.5)}
    expected = run_backtest(config, markets, _merged(kept, trades), fees=fees)
    result = run_fast(config, markets, columns_from_records(kept, ("A", "B")),
                      _fingerprinter(kept), fees=fees, trades=trades)  # fmt: skip
    assert result == expected
    if window == (None, None):
        assert expected.maker_fills == 1
        assert [e.action for e in expected.executions] == [OrderAction.BUY, OrderAction.SETTLE]
        assert expected.rejected_orders > 0


@pytest.mark.parametrize(("bid", "ask"), [(0, 300), (9_700, 10_000)])
def test_a_quote_the_engine_refuses_fails_the_compiled_run_alike(bid: int, ask: int) -> None:
    # A $0 bid (or a $1 ask, once something is held: the trade at 1.5 min goes through the
    # resting $0.40 bid and fills it) makes a limit price outside 1..9,999.
    rows = [quote("A", 1, 1, 4_000, 4_300), quote("A", 2, 2, bid, ask)]
    trades = [TradeRecord("t", "A", 3_900, 6_100, 500, Side.NO, at(1.5))]
    config = replace(MAKER, tickers=("A",))
    with pytest.raises(StrategyError) as engine_error:
        run_backtest(config, {}, _merged(rows, trades))
    with pytest.raises(StrategyError) as compiled_error:
        run_fast(config, {}, columns_from_records(rows, ("A",)), _fingerprinter(rows),
                 trades=trades)  # fmt: skip
    assert str(compiled_error.value) == str(engine_error.value)
