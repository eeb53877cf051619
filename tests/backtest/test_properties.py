"""Properties over random books, trades and orders (market, limit, cancels, expiry, latency, both
fill models, fee terms): the limits keep the account solvent and every unit of PnL is accounted."""

from __future__ import annotations

from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from kfeed_server.backtest import EngineConfig, FeeRounding, Order, run_backtest
from kfeed_server.backtest.engine import MarketEvent
from kfeed_server.backtest.fees import FeeType, MarketFees
from kfeed_server.backtest.orders import Cancel, Instruction
from kfeed_server.records import MarketResult, OrderAction, Side, SnapshotRecord, TradeRecord
from kfeed_server.records.backtest import FillModel
from tests.support.backtest import at, quote, scripted_registry, settled

TICKERS = ("A", "B")


@st.composite
def books(draw: st.DrawFn) -> list[SnapshotRecord]:
    """Snapshots with any prices (including missing sides and sub-penny levels) and sizes."""
    count = draw(st.integers(1, 25))
    snapshots = []
    for k in range(count):
        bid = draw(st.one_of(st.none(), st.integers(0, 9_999)))
        ask = draw(st.one_of(st.none(), st.integers(bid or 1, 10_000)))
        size = st.one_of(st.none(), st.integers(0, 500))
        snapshots.append(
            quote(
                draw(st.sampled_from(TICKERS)),
                k,
                k + 1,
                bid,
                ask,
                yes_bid_size=draw(size),
                yes_ask_size=draw(size),
            )
        )
    return snapshots


orders = st.builds(
    Order,
    ticker=st.sampled_from(TICKERS),
    side=st.sampled_from([Side.YES, Side.NO]),
    action=st.sampled_from([OrderAction.BUY, OrderAction.SELL]),
    count=st.integers(1, 5_000),
)


@settings(max_examples=150, deadline=None)
@given(
    snapshots=books(),
    script=st.dictionaries(st.integers(1, 25), st.lists(orders, max_size=4)),
    initial_cash=st.integers(1, 100_000),
    slippage=st.integers(0, 500),
    max_position=st.integers(0, 1_000),
    capped=st.booleans(),
    rounding=st.sampled_from([FeeRounding.CENT, FeeRounding.TEN_THOUSANDTH]),
    result=st.sampled_from([MarketResult.YES, MarketResult.NO, MarketResult.UNSPECIFIED]),
)
def test_account_stays_solvent_and_fees_non_negative(
    snapshots: list[SnapshotRecord],
    script: dict[int, list[Order]],
    initial_cash: int,
    slippage: int,
    max_position: int,
    capped: bool,
    rounding: FeeRounding,
    result: MarketResult,
) -> None:
    config = EngineConfig(
        "scripted",
        TICKERS,
        initial_cash=initial_cash,
        slippage=slippage,
        max_position=max_position,
        cap_by_displayed_size=capped,
        fee_rounding=rounding,
    )
    markets = {"A": settled("A", result, 12)}
    run = run_backtest(config, markets, snapshots, registry=scripted_registry(script))

    for execution in run.executions:
        assert execution.cash_after >= 0
        assert execution.fee >= 0
        assert execution.count > 0
        if max_position and execution.action is OrderAction.BUY:
            # Net position: YES positive, NO negative, within the limit either way.
            assert abs(execution.position_after) <= max_position
        if execution.action is OrderAction.SETTLE:
            assert execution.position_after == 0
    assert all(point.equity >= 0 for point in run.equity_curve)
    assert run.metrics.fees_paid >= 0
    # Every unit of PnL is accounted for by some execution.
    assert run.metrics.total_pnl == sum(e.realized_pnl for e in run.executions)
    assert 0.0 <= run.metrics.exposure <= 1.0


resting_orders = st.builds(
    Order,
    ticker=st.sampled_from(TICKERS),
    side=st.sampled_from([Side.YES, Side.NO]),
    action=st.sampled_from([OrderAction.BUY, OrderAction.SELL]),
    count=st.integers(1, 5_000),
    limit_price=st.one_of(st.none(), st.integers(1, 9_999)),
    expire_after=st.one_of(st.none(), st.integers(1, 600).map(lambda s: timedelta(seconds=s))),
    client_order_id=st.integers(0, 3),
)
instructions = st.one_of(
    resting_orders, st.builds(Cancel, st.sampled_from(TICKERS), st.integers(0, 3))
)


@settings(max_examples=80, deadline=None)
@given(
    events=books(),
    trades=st.lists(
        st.tuples(
            st.sampled_from(TICKERS),
            st.integers(0, 24),
            st.integers(1, 9_999),
            st.integers(1, 400),
            st.sampled_from([Side.YES, Side.NO]),
        ),
        max_size=10,
    ),
    script=st.dictionaries(st.integers(1, 25), st.lists(instructions, max_size=4)),
    initial_cash=st.integers(1, 100_000),
    latency=st.integers(0, 120).map(lambda s: timedelta(seconds=s)),
    share=st.integers(0, 10_000),
    fill_model=st.sampled_from([FillModel.TOUCH, FillModel.DEPTH]),
    maker_fees=st.booleans(),
)
def test_limit_orders_latency_and_trades_keep_the_account_solvent(
    events: list[SnapshotRecord],
    trades: list[tuple[str, int, int, int, Side]],
    script: dict[int, list[Instruction]],
    initial_cash: int,
    latency: timedelta,
    share: int,
    fill_model: FillModel,
    maker_fees: bool,
) -> None:
    # Trades land half a minute after the snapshot of the same minute.
    tape = [
        TradeRecord(f"t{i}", ticker, price, 10_000 - price, count, taker, at(minute + 0.5))
        for i, (ticker, minute, price, count, taker) in enumerate(trades)
    ]

    def event_time(event: SnapshotRecord | TradeRecord) -> datetime:
        return event.exchange_time if isinstance(event, SnapshotRecord) else event.create_time

    items: list[SnapshotRecord | TradeRecord] = [*events, *tape]
    stream: list[MarketEvent] = [*sorted(items, key=event_time)]
    config = EngineConfig(
        "scripted",
        TICKERS,
        initial_cash=initial_cash,
        latency=latency,
        queue_cancel_share_ten_thousandths=share,
        fill_model=fill_model,
    )
    kind = FeeType.QUADRATIC_WITH_MAKER_FEES if maker_fees else FeeType.QUADRATIC
    fees = {"A": MarketFees(kind, 10_000), "B": MarketFees(FeeType.FLAT, 5_000)}
    run = run_backtest(config, {}, stream, fees=fees, registry=scripted_registry(script))
    for execution in run.executions:
        assert execution.cash_after >= 0
        assert execution.fee >= 0
        assert execution.count > 0
        assert 0 <= execution.price <= 10_000
    assert all(point.equity >= 0 for point in run.equity_curve)
    assert run.metrics.total_pnl == sum(e.realized_pnl for e in run.executions)
    assert run.maker_fills <= run.metrics.trade_count
