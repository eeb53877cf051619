"""User strategies from a module of their own, loaded by configuration, run end to end through
CreateBacktest and WatchBacktest on a real server; one that raises or runs away fails its run with
a clear error and the server goes on serving."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kfeed.v1 import backtest_service_pb2 as pb
from kfeed.v1 import backtest_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.backtest.loading import StrategyLoadError, load_strategy_modules
from kfeed_server.backtest.strategy import StrategyRegistry
from kfeed_server.backtest.worker import KILL_GRACE
from kfeed_server.records import SnapshotRecord
from kfeed_server.transport.convert import timestamp
from tests.support.backtest_service import TEST_RUNNER, TICKER, watch_to_end
from tests.support.factories import at
from tests.support.servers import serving

MODULE = "tests.support.user_strategies"
TIME_LIMIT = 3.0


@pytest.fixture
async def backtest_server(database_url: str) -> AsyncIterator[KfeedServer]:
    """A server configured to trust the user strategy module, with a short run time limit."""
    runner = dataclasses.replace(
        TEST_RUNNER, workers=2, strategy_modules=(MODULE,), time_limit=TIME_LIMIT
    )
    config = ServerConfig(listen="127.0.0.1:0", database_url=database_url, backtest=runner)
    async with serving(config) as server:
        yield server


def _config(strategy: str) -> pb.BacktestConfig:
    config = pb.BacktestConfig(strategy=strategy, tickers=[TICKER])
    config.start_time.CopyFrom(timestamp(at(0)))
    config.end_time.CopyFrom(timestamp(at(10_000)))
    return config


async def _run(stub: pb_grpc.BacktestServiceAsyncStub, strategy: str) -> list[pb.Backtest]:
    created = await stub.CreateBacktest(pb.CreateBacktestRequest(config=_config(strategy)))
    return await watch_to_end(stub, created.backtest.backtest_id)


async def test_a_user_strategy_is_listed_and_runs_end_to_end(
    stub: pb_grpc.BacktestServiceAsyncStub, recorded: list[SnapshotRecord]
) -> None:
    listed = {s.name: s for s in (await stub.ListStrategies(pb.ListStrategiesRequest())).strategies}
    user = listed["user_bid_under"]
    assert "resting YES bid" in user.description
    (offset,) = user.parameters
    assert (offset.name, offset.type) == ("offset", pb.PARAMETER_TYPE_DOLLARS)
    assert offset.default_value.dollars_value.ten_thousandths == 100

    messages = await _run(stub, "user_bid_under")
    final = messages[-1]
    assert final.state == pb.BACKTEST_STATE_SUCCEEDED, final.error_message
    executions = (
        await stub.ListExecutions(pb.ListExecutionsRequest(backtest_id=final.backtest_id))
    ).executions
    buys = [e for e in executions if e.action == pb.ORDER_ACTION_BUY]
    sells = [e for e in executions if e.action == pb.ORDER_ACTION_SELL]
    assert buys, "the resting bids filled"
    assert sells, "on_fill's resting sells filled"
    # Resting orders fill at their own limit price: each sell $0.03 above the buy before it.
    last_buy = 0
    for execution in executions:
        if execution.action == pb.ORDER_ACTION_BUY:
            last_buy = execution.price.ten_thousandths
        elif execution.action == pb.ORDER_ACTION_SELL:
            assert execution.price.ten_thousandths == last_buy + 300
    assert final.metrics.trade_count == len(buys) + len(sells)


async def test_a_strategy_that_raises_fails_its_run_and_the_server_serves_on(
    stub: pb_grpc.BacktestServiceAsyncStub, recorded: list[SnapshotRecord]
) -> None:
    failed = (await _run(stub, "user_raises"))[-1]
    assert failed.state == pb.BACKTEST_STATE_FAILED
    assert "ZeroDivisionError: the user's bug" in failed.error_message
    assert "user_raises" in failed.error_message
    after = (await _run(stub, "user_bid_under"))[-1]
    assert after.state == pb.BACKTEST_STATE_SUCCEEDED, after.error_message


async def test_a_strategy_that_runs_away_fails_at_the_time_limit(
    stub: pb_grpc.BacktestServiceAsyncStub, recorded: list[SnapshotRecord]
) -> None:
    started = time.monotonic()
    failed = (await _run(stub, "user_spins"))[-1]
    assert failed.state == pb.BACKTEST_STATE_FAILED
    assert f"time limit of {TIME_LIMIT:g} s" in failed.error_message
    # The limit ends the run; the margin covers a loaded machine starting the worker slowly.
    assert time.monotonic() - started < TIME_LIMIT + 30
    after = (await _run(stub, "user_bid_under"))[-1]
    assert after.state == pb.BACKTEST_STATE_SUCCEEDED, after.error_message


async def test_a_strategy_that_swallows_the_time_limit_is_killed_and_harms_no_other_run(
    stub: pb_grpc.BacktestServiceAsyncStub, recorded: list[SnapshotRecord]
) -> None:
    started = time.monotonic()
    created = await stub.CreateBacktest(pb.CreateBacktestRequest(config=_config("user_swallows")))
    swallowing = asyncio.create_task(watch_to_end(stub, created.backtest.backtest_id))
    # Meanwhile the other worker slot runs a run to success.
    beside = (await _run(stub, "user_bid_under"))[-1]
    assert beside.state == pb.BACKTEST_STATE_SUCCEEDED, beside.error_message
    async with asyncio.timeout(TIME_LIMIT + KILL_GRACE + 30):  # without the kill: forever
        failed = (await swallowing)[-1]
    assert failed.state == pb.BACKTEST_STATE_FAILED, failed
    assert f"time limit of {TIME_LIMIT:g} s" in failed.error_message, failed.error_message
    assert "was killed" in failed.error_message, failed.error_message
    # Not before the limit and its grace (the worker's start, which may wait for the forkserver,
    # comes on top; the timeout above bounds the whole).
    assert time.monotonic() - started >= TIME_LIMIT + KILL_GRACE
    # The killed worker's slot gets a fresh pool: runs go on in both slots.
    after = await asyncio.gather(_run(stub, "user_bid_under"), _run(stub, "user_bid_under"))
    outcomes = [(m[-1].state, m[-1].error_message) for m in after]
    assert outcomes == [(pb.BACKTEST_STATE_SUCCEEDED, "")] * 2, outcomes


def test_a_module_that_cannot_load_is_a_clear_error() -> None:
    with pytest.raises(StrategyLoadError, match="no_such_module"):
        load_strategy_modules(["tests.support.no_such_module"], StrategyRegistry())
    registry = StrategyRegistry()
    assert sorted(load_strategy_modules([MODULE], registry)) == [
        "user_bid_under",
        "user_dawdles",
        "user_raises",
        "user_spins",
        "user_swallows",
    ]


async def test_kfeed_serve_refuses_a_strategy_module_it_cannot_load(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kfeed_cli.main",
        "serve",
        "--strategy-module",
        "tests.support.no_such_module",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        f"sqlite+aiosqlite:///{tmp_path}/kfeed.db",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 1
    lines = output.decode().strip().splitlines()
    assert lines == [
        "kfeed serve: cannot load strategy module 'tests.support.no_such_module': "
        "ModuleNotFoundError: No module named 'tests.support.no_such_module' (--debug shows more)"
    ]
