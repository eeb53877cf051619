"""BacktestRepository: runs, executions, equity curves."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest

from kfeed_server.backtest import BacktestMetrics, EngineConfig, FeeRounding
from kfeed_server.db.repositories import BacktestRecord, Repositories
from kfeed_server.records import (
    BacktestState,
    EquityPointRecord,
    ExecutionRecord,
    OrderAction,
    Side,
)
from kfeed_server.records.backtest import SweepSpec
from tests.support.factories import at


def _config(strategy: str = "momentum") -> EngineConfig:
    return EngineConfig(
        strategy=strategy,
        tickers=("A", "B"),
        parameters={"threshold": 250, "z": 0.25, "flag": True, "name": "x"},
        start_time=at(0),
        end_time=None,
        initial_cash=5_000_000,
        fee_rounding=FeeRounding.TEN_THOUSANDTH,
        slippage=3,
        max_position=1_000,
        cap_by_displayed_size=True,
    )


def _backtest(i: int, strategy: str = "momentum", **fields: object) -> BacktestRecord:
    values: dict[str, object] = {
        "backtest_id": str(uuid.UUID(int=i)),
        "config": _config(strategy),
        "create_time": at(i),
        **fields,
    }
    return BacktestRecord(**values)  # type: ignore[arg-type]


METRICS = BacktestMetrics(
    total_pnl=12_345,
    total_return=0.0123,
    sharpe_ratio=1.5,
    sortino_ratio=2.25,
    max_drawdown=700,
    max_drawdown_fraction=0.01,
    max_drawdown_duration=timedelta(hours=3, microseconds=7),
    win_rate=0.5,
    profit_factor=1.75,
    expectancy=-3,
    trade_count=4,
    fees_paid=200,
    exposure=0.3,
    brier_score=None,
)


def _execution(sequence: int) -> ExecutionRecord:
    return ExecutionRecord(
        sequence=sequence,
        ticker="A",
        time=at(sequence),
        snapshot_id=100 + sequence,
        side=Side.YES,
        action=OrderAction.BUY,
        count=1_000,
        price=4_500,
        fee=70,
        cash_after=1_000_000 - sequence,
        position_after=1_000 * sequence,
        realized_pnl=0,
    )


async def test_create_get_update(repositories: Repositories) -> None:
    backtests = repositories.backtests
    record = _backtest(
        1,
        sweep=SweepSpec(grid={"threshold": [100, 200], "z": [0.5]}, rank_by="sharpe"),
        ranked_child_ids=("c1", "c2"),
    )
    await backtests.create(record)
    assert await backtests.get(record.backtest_id) == record
    assert await backtests.get("missing") is None

    updated = await backtests.update(
        record.backtest_id,
        state=BacktestState.SUCCEEDED,
        fraction_done=1.0,
        metrics=METRICS,
        run_end_time=at(50),
        ranked_child_ids=("c2", "c1"),
    )
    assert updated is not None
    assert updated.state is BacktestState.SUCCEEDED
    assert updated.metrics == METRICS
    assert updated.ranked_child_ids == ("c2", "c1")
    assert updated.run_end_time == at(50)
    assert await backtests.get(record.backtest_id) == updated
    assert await backtests.update("missing", state=BacktestState.FAILED) is None
    with pytest.raises(TypeError):
        await backtests.update(record.backtest_id, no_such_field=1)


async def test_list_newest_first_with_filters(repositories: Repositories) -> None:
    backtests = repositories.backtests
    parent = _backtest(0)
    await backtests.create(parent)
    for i in range(1, 6):
        await backtests.create(
            _backtest(
                i,
                strategy="momentum" if i % 2 else "mean_reversion",
                state=BacktestState.RUNNING if i < 3 else BacktestState.PENDING,
                parent_backtest_id=parent.backtest_id,
                # Two runs created at the same instant: the id breaks the tie.
                create_time=at(min(i, 4)),
            )
        )
    seen: list[BacktestRecord] = []
    after: tuple[datetime, str] | None = None
    while True:
        page = await backtests.list(
            limit=2, after=after, strategy=None, state=None, parent_backtest_id=None
        )
        seen.extend(page.items)
        if page.next_cursor is None:
            break
        after = (page.items[-1].create_time, page.items[-1].backtest_id)
    assert [b.backtest_id for b in seen] == [_backtest(i).backtest_id for i in (5, 4, 3, 2, 1, 0)]

    momentum = await backtests.list(
        limit=10, after=None, strategy="momentum", state=None, parent_backtest_id=None
    )
    assert {b.strategy for b in momentum.items} == {"momentum"}
    running = await backtests.list(
        limit=10, after=None, strategy=None, state=BacktestState.RUNNING, parent_backtest_id=None
    )
    assert [b.backtest_id for b in running.items] == [_backtest(i).backtest_id for i in (2, 1)]
    children = await backtests.list(
        limit=10, after=None, strategy=None, state=None, parent_backtest_id=parent.backtest_id
    )
    assert len(children.items) == 5


async def test_executions_and_equity(repositories: Repositories) -> None:
    backtests = repositories.backtests
    record = _backtest(1)
    await backtests.create(record)
    executions = [_execution(i) for i in range(5)]
    await backtests.add_executions(record.backtest_id, executions)
    await backtests.add_executions(record.backtest_id, executions[:2])  # idempotent
    first = await backtests.list_executions(record.backtest_id, limit=3, after_sequence=-1)
    assert first.items == executions[:3]
    assert first.next_cursor == (2,)
    rest = await backtests.list_executions(record.backtest_id, limit=3, after_sequence=2)
    assert rest.items == executions[3:]
    assert rest.next_cursor is None

    points = [EquityPointRecord(time=at(i // 2), equity=1_000_000 + i) for i in range(5)]
    await backtests.add_equity_points(record.backtest_id, points)
    assert await backtests.equity_curve(record.backtest_id) == points
    assert await backtests.equity_curve("missing") == []


async def test_executions_of_unknown_backtest_are_refused(repositories: Repositories) -> None:
    with pytest.raises(Exception):  # noqa: B017, PT011 - each driver raises its own type
        await repositories.backtests.add_executions("missing", [_execution(0)])
