"""BacktestService through a real server and the generated stubs, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pyarrow as pa
import pytest
from google.protobuf import duration_pb2

from kfeed.v1 import backtest_service_pb2 as pb
from kfeed.v1 import backtest_service_pb2_grpc as pb_grpc
from kfeed.v1 import market_service_pb2, market_service_pb2_grpc
from kfeed_server import __version__
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.backtest import EngineConfig, run_backtest
from kfeed_server.backtest.fingerprint import FINGERPRINT_VERSION
from kfeed_server.backtest.service import RESTART_MESSAGE
from kfeed_server.backtest.tracking import SHUTDOWN_MESSAGE
from kfeed_server.build import code_version
from kfeed_server.db import create_engine
from kfeed_server.db.repositories import BacktestRecord, build_repositories
from kfeed_server.records import BacktestState, MarketRecord, SnapshotRecord
from kfeed_server.transport.backtest_servicer import execution_to_proto, metrics_to_proto
from kfeed_server.transport.convert import dollars
from tests.support.backtest_service import (
    OTHER_TICKER,
    TEST_RUNNER,
    TICKER,
    all_executions,
    publish_snapshots,
    run_to_end,
    stored_window,
    threshold_config,
    watch_to_end,
    wave_snapshots,
)
from tests.support.factories import at, make_market
from tests.support.servers import PublishSession, bad_request_fields, serving

BOTH = (TICKER, OTHER_TICKER)
# Rows added for the runs that must still be running when the test acts (the worker holds the
# first read batch and waits for the end of the data).
MORE_ROWS = 4_196


async def _engine_result_on_stored_rows(
    server: KfeedServer, tickers: tuple[str, ...], buy_below: int = 4_000
) -> Any:
    repositories = server.repositories
    rows = await stored_window(repositories, tickers, at(0), at(10_000))
    markets: dict[str, MarketRecord] = {}
    for ticker in tickers:
        market = await repositories.markets.get_market(ticker)
        assert market is not None
        markets[ticker] = market
    config = EngineConfig(
        strategy="threshold",
        tickers=tickers,
        parameters={"buy_below": buy_below, "sell_above": 6_000, "count": 100},
        start_time=at(0),
        end_time=at(10_000),
    )
    return run_backtest(config, markets, rows)


async def test_a_backtest_runs_to_success_with_the_engine_results(
    backtest_server: KfeedServer,
    stub: pb_grpc.BacktestServiceAsyncStub,
    recorded: list[SnapshotRecord],
) -> None:
    created = await stub.CreateBacktest(pb.CreateBacktestRequest(config=threshold_config(BOTH)))
    assert created.backtest.state == pb.BACKTEST_STATE_PENDING
    messages = await watch_to_end(stub, created.backtest.backtest_id)
    processed = [m.progress.snapshots_processed for m in messages]
    assert processed == sorted(processed)
    backtest = (
        await stub.GetBacktest(
            pb.GetBacktestRequest(
                backtest_id=created.backtest.backtest_id, view=pb.BACKTEST_VIEW_FULL
            )
        )
    ).backtest
    assert messages[-1].state == pb.BACKTEST_STATE_SUCCEEDED, messages[-1].error_message
    assert not messages[-1].equity_curve  # watch messages use the BASIC view

    expected = await _engine_result_on_stored_rows(backtest_server, BOTH)
    assert backtest.state == pb.BACKTEST_STATE_SUCCEEDED
    assert backtest.metrics == metrics_to_proto(expected.metrics)
    assert backtest.metrics.trade_count > 10
    executions = await all_executions(stub, backtest.backtest_id, page_size=7)
    assert executions == [execution_to_proto(e) for e in expected.executions]
    assert any(e.action == pb.ORDER_ACTION_SETTLE for e in executions)
    assert [(p.equity.ten_thousandths) for p in backtest.equity_curve] == [
        p.equity for p in expected.equity_curve
    ]
    fingerprint = backtest.data_fingerprint
    assert (
        fingerprint.row_count,
        fingerprint.first_snapshot_id,
        fingerprint.last_snapshot_id,
        fingerprint.content_hash,
        fingerprint.version,
    ) == (
        expected.fingerprint.row_count,
        expected.fingerprint.first_snapshot_id,
        expected.fingerprint.last_snapshot_id,
        expected.fingerprint.content_hash,
        FINGERPRINT_VERSION,
    )
    assert fingerprint.row_count == len(recorded)
    assert backtest.progress.fraction_done == 1.0
    assert backtest.progress.snapshots_processed == backtest.progress.snapshots_total == 1_200
    # The version and the exact commit of the checkout the server runs from.
    assert backtest.code_version == code_version()
    git = await asyncio.create_subprocess_exec(
        "git", "rev-parse", "HEAD", stdout=asyncio.subprocess.PIPE
    )
    commit = (await git.communicate())[0].decode().strip()
    assert backtest.code_version.startswith(f"{__version__}+g{commit[:12]}")
    assert backtest.config.initial_cash.ten_thousandths == 10_000_000  # the default, spelled out
    assert backtest.HasField("run_start_time")
    assert backtest.HasField("run_end_time")


async def test_runs_are_deterministic_and_changed_data_changes_the_fingerprint(
    stub: pb_grpc.BacktestServiceAsyncStub,
    publisher: PublishSession,
    recorded: list[SnapshotRecord],
) -> None:
    first = await run_to_end(stub, threshold_config())
    second = await run_to_end(stub, threshold_config())
    assert first.backtest_id != second.backtest_id
    assert second.metrics == first.metrics
    assert second.data_fingerprint == first.data_fingerprint
    assert second.equity_curve == first.equity_curve
    assert await all_executions(stub, second.backtest_id) == await all_executions(
        stub, first.backtest_id
    )

    await publish_snapshots(publisher, wave_snapshots(TICKER, 1, offset=700))
    third = await run_to_end(stub, threshold_config())
    assert third.data_fingerprint.row_count == first.data_fingerprint.row_count + 1
    assert third.data_fingerprint.content_hash != first.data_fingerprint.content_hash


@pytest.fixture
def gated_reads(backtest_server: KfeedServer, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Backtest reads deliver their first batch, then wait for the returned event: runs stay
    RUNNING (their worker waiting for rows) until it is set."""
    columns = backtest_server.repositories.exports
    original = columns.snapshots_for_backtest
    gate = asyncio.Event()

    async def first_batch_then_wait(*args: Any, **kwargs: Any) -> AsyncIterator[pa.RecordBatch]:
        async for batch in original(*args, **kwargs):
            yield batch
            await gate.wait()

    monkeypatch.setattr(columns, "snapshots_for_backtest", first_batch_then_wait)
    return gate


async def _running(stub: pb_grpc.BacktestServiceAsyncStub, backtest_id: str) -> pb.Backtest:
    request = pb.WatchBacktestRequest(backtest_id=backtest_id)
    async for message in stub.WatchBacktest(request, timeout=10):
        if message.backtest.progress.snapshots_processed > 0:
            assert message.backtest.state == pb.BACKTEST_STATE_RUNNING
            return message.backtest
    raise AssertionError("the backtest ended before it made progress")


@pytest.mark.usefixtures("gated_reads")
async def test_cancel_stops_running_and_pending_backtests(
    stub: pb_grpc.BacktestServiceAsyncStub,
    publisher: PublishSession,
    recorded: list[SnapshotRecord],
) -> None:
    await publish_snapshots(publisher, wave_snapshots(TICKER, MORE_ROWS, offset=600))
    running = (
        await stub.CreateBacktest(pb.CreateBacktestRequest(config=threshold_config()))
    ).backtest
    await _running(stub, running.backtest_id)
    # One worker (TEST_RUNNER): this one waits for it.
    pending = (
        await stub.CreateBacktest(pb.CreateBacktestRequest(config=threshold_config()))
    ).backtest

    cancelled = await stub.CancelBacktest(pb.CancelBacktestRequest(backtest_id=pending.backtest_id))
    assert cancelled.backtest.state == pb.BACKTEST_STATE_CANCELLED
    still = await stub.GetBacktest(pb.GetBacktestRequest(backtest_id=running.backtest_id))
    assert still.backtest.state == pb.BACKTEST_STATE_RUNNING

    began = time.monotonic()
    cancelled = await stub.CancelBacktest(pb.CancelBacktestRequest(backtest_id=running.backtest_id))
    assert cancelled.backtest.state == pb.BACKTEST_STATE_CANCELLED
    assert time.monotonic() - began < 5
    assert not cancelled.backtest.HasField("metrics")
    watched = await watch_to_end(stub, running.backtest_id)
    assert [m.state for m in watched] == [pb.BACKTEST_STATE_CANCELLED]
    again = await stub.CancelBacktest(pb.CancelBacktestRequest(backtest_id=running.backtest_id))
    assert again.backtest == cancelled.backtest  # cancelling a finished backtest changes nothing


def _grid(name: str, *prices: int) -> pb.ParameterSweep:
    values = [pb.ParameterValue(dollars_value=dollars(p)) for p in prices]
    return pb.ParameterSweep(grid={name: pb.ParameterValues(values=values)}, rank_by="total_pnl")


async def _list_all(stub: pb_grpc.BacktestServiceAsyncStub, **filters: Any) -> list[pb.Backtest]:
    backtests: list[pb.Backtest] = []
    token = ""
    while True:
        page = await stub.ListBacktests(
            pb.ListBacktestsRequest(page_size=2, page_token=token, **filters)
        )
        assert len(page.backtests) <= 2
        backtests.extend(page.backtests)
        token = page.next_page_token
        if not token:
            return backtests


async def test_a_sweep_runs_one_child_per_point_and_ranks_them(
    backtest_server: KfeedServer,
    stub: pb_grpc.BacktestServiceAsyncStub,
    recorded: list[SnapshotRecord],
) -> None:
    parent = await run_to_end(stub, threshold_config(), _grid("buy_below", 3_000, 3_500, 4_000))
    assert parent.state == pb.BACKTEST_STATE_SUCCEEDED, parent.error_message
    assert parent.sweep.rank_by == "total_pnl"
    children = await _list_all(stub, parent_backtest_id=parent.backtest_id)
    assert len(children) == 3
    assert {c.parent_backtest_id for c in children} == {parent.backtest_id}
    assert all(c.state == pb.BACKTEST_STATE_SUCCEEDED for c in children)
    by_id = {c.backtest_id: c for c in children}
    assert sorted(
        c.config.parameters["buy_below"].dollars_value.ten_thousandths for c in children
    ) == [3_000, 3_500, 4_000]
    ranked_pnl = [by_id[i].metrics.total_pnl.ten_thousandths for i in parent.ranked_child_ids]
    assert sorted(parent.ranked_child_ids) == sorted(by_id)
    assert ranked_pnl == sorted(ranked_pnl, reverse=True)
    assert parent.metrics == by_id[parent.ranked_child_ids[0]].metrics
    # The threshold sweep took the compiled path (the rows read once, every point over them):
    # each child is exactly the engine's run of its point.
    for child in children:
        low = child.config.parameters["buy_below"].dollars_value.ten_thousandths
        expected = await _engine_result_on_stored_rows(backtest_server, (TICKER,), low)
        assert child.metrics == metrics_to_proto(expected.metrics)
        assert child.data_fingerprint.content_hash == expected.fingerprint.content_hash

    everything = await _list_all(stub)
    assert everything[0].backtest_id != parent.backtest_id  # newest (a child) first
    assert len({b.backtest_id for b in everything}) == 4
    assert len(await _list_all(stub, strategy="threshold", state=pb.BACKTEST_STATE_SUCCEEDED)) == 4
    assert await _list_all(stub, strategy="momentum") == []
    assert await _list_all(stub, state=pb.BACKTEST_STATE_RUNNING) == []


def _with(config: pb.BacktestConfig, **changes: Any) -> pb.BacktestConfig:
    changed = pb.BacktestConfig()
    changed.CopyFrom(config)
    for name, value in changes.items():
        if name == "parameters":
            for key, parameter in value.items():
                if parameter is None:
                    del changed.parameters[key]
                else:
                    changed.parameters[key].CopyFrom(parameter)
        elif name == "tickers":
            del changed.tickers[:]
            changed.tickers.extend(value)
        elif isinstance(value, int | str):
            setattr(changed, name, value)
        else:
            getattr(changed, name).CopyFrom(value)
    return changed


async def test_bad_requests_name_the_offending_field(
    stub: pb_grpc.BacktestServiceAsyncStub, recorded: list[SnapshotRecord]
) -> None:
    base = threshold_config()
    config_cases = {
        "config.strategy": _with(base, strategy="nope"),
        "config.tickers": _with(base, tickers=[]),
        "config.parameters.buy_below": _with(
            base, parameters={"buy_below": pb.ParameterValue(string_value="cheap")}
        ),
        "config.parameters.foo": _with(
            base, parameters={"foo": pb.ParameterValue(integer_value=1)}
        ),
        "config.parameters.count": _with(base, parameters={"count": pb.ParameterValue()}),
        "config.parameters.sell_above": _with(
            base, parameters={"sell_above": pb.ParameterValue(dollars_value=dollars(1_000))}
        ),
        "config.end_time": _with(base, end_time=base.start_time),
        "config.fee_rounding": _with(base, fee_rounding=99),
        "config.slippage": _with(base, slippage=dollars(20_000)),
        "config.fill_model": _with(base, fill_model=99),
        "config.gap_policy": _with(base, gap_policy=-1),
        "config.latency": _with(base, latency=duration_pb2.Duration(seconds=-1)),
        "config.queue_cancel_share_ten_thousandths": _with(
            base, queue_cancel_share_ten_thousandths=10_001
        ),
        "config.maker_fee_rate_ten_thousandths": _with(base, maker_fee_rate_ten_thousandths=-3),
    }
    long_latency = _with(base)
    long_latency.latency.FromSeconds(2 * 3_600)
    config_cases["config.latency"] = long_latency
    for field, config in config_cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateBacktest(pb.CreateBacktestRequest(config=config))
        assert bad_request_fields(caught.value) == [field], field

    sweep_cases = {
        "sweep.grid": pb.ParameterSweep(rank_by="total_pnl"),
        "sweep.grid.count": pb.ParameterSweep(grid={"count": pb.ParameterValues()}),
        "sweep.grid.foo": _grid("foo", 1),
        "sweep.grid.buy_below": _grid("buy_below", -5),
        "sweep.rank_by": pb.ParameterSweep(grid=_grid("buy_below", 3_000).grid, rank_by="luck"),
    }
    for field, sweep in sweep_cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateBacktest(pb.CreateBacktestRequest(config=base, sweep=sweep))
        assert bad_request_fields(caught.value) == [field], field

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateBacktest(
            pb.CreateBacktestRequest(config=_with(base, tickers=[TICKER, "KXNOPE"]))
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "KXNOPE" in (caught.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListBacktests(pb.ListBacktestsRequest(page_token="garbage"))
    assert bad_request_fields(caught.value) == ["page_token"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBacktest(pb.GetBacktestRequest())
    assert bad_request_fields(caught.value) == ["backtest_id"]
    assert (await stub.ListBacktests(pb.ListBacktestsRequest())).backtests == []


async def test_unknown_backtests_are_not_found(stub: pb_grpc.BacktestServiceAsyncStub) -> None:
    calls = (
        stub.GetBacktest(pb.GetBacktestRequest(backtest_id="missing")),
        stub.CancelBacktest(pb.CancelBacktestRequest(backtest_id="missing")),
        stub.ListExecutions(pb.ListExecutionsRequest(backtest_id="missing")),
        watch_to_end(stub, "missing"),
    )
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_strategies_exposes_the_parameter_schemas(
    stub: pb_grpc.BacktestServiceAsyncStub,
) -> None:
    strategies = {
        s.name: s for s in (await stub.ListStrategies(pb.ListStrategiesRequest())).strategies
    }
    assert {"threshold", "mean_reversion", "momentum", "favourite_hold"} <= set(strategies)
    buy_below = {p.name: p for p in strategies["threshold"].parameters}["buy_below"]
    assert buy_below.type == pb.PARAMETER_TYPE_DOLLARS
    assert buy_below.default_value.dollars_value.ten_thousandths == 4_000
    assert buy_below.maximum.dollars_value.ten_thousandths == 10_000


async def _next(
    stream: grpc.aio.UnaryStreamCall[Any, market_service_pb2.StreamSnapshotsResponse],
) -> market_service_pb2.StreamSnapshotsResponse:
    message = await stream.read()
    assert isinstance(message, market_service_pb2.StreamSnapshotsResponse), message
    return message


async def test_streams_keep_flowing_while_a_backtest_runs(
    backtest_channel: grpc.aio.Channel,
    stub: pb_grpc.BacktestServiceAsyncStub,
    publisher: PublishSession,
    recorded: list[SnapshotRecord],
) -> None:
    await publish_snapshots(publisher, wave_snapshots(TICKER, 6_000, offset=600))
    market = market_service_pb2_grpc.MarketServiceStub(backtest_channel)
    request = market_service_pb2.StreamSnapshotsRequest(tickers=[OTHER_TICKER])
    request.heartbeat_interval.FromMilliseconds(100)
    stream = market.StreamSnapshots(request)
    while not (await _next(stream)).HasField("caught_up"):
        pass  # the replay, up to the "caught up" marker
    created = await stub.CreateBacktest(pb.CreateBacktestRequest(config=threshold_config()))
    backtest_id = created.backtest.backtest_id
    gaps: list[float] = []
    live_published = False
    live_received = False
    last = time.monotonic()
    while True:
        state = (await stub.GetBacktest(pb.GetBacktestRequest(backtest_id=backtest_id))).backtest
        if state.state not in (pb.BACKTEST_STATE_PENDING, pb.BACKTEST_STATE_RUNNING):
            break
        if state.state == pb.BACKTEST_STATE_RUNNING and not live_published:
            await publish_snapshots(publisher, wave_snapshots(OTHER_TICKER, 1, offset=5_000))
            live_published = True
        message = await asyncio.wait_for(_next(stream), timeout=2)
        live_received |= message.HasField("snapshot")
        now = time.monotonic()
        gaps.append(now - last)
        last = now
    stream.cancel()
    assert state.state == pb.BACKTEST_STATE_SUCCEEDED, state.error_message
    assert state.data_fingerprint.row_count == 6_600
    assert gaps, "the backtest ended before the stream was read"
    assert max(gaps) < 1.0
    assert live_received or not live_published


async def test_shutdown_fails_running_backtests_and_start_fails_stale_ones(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ServerConfig(listen="127.0.0.1:0", database_url=database_url, backtest=TEST_RUNNER)
    async with (
        serving(config) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        publisher = PublishSession(channel)
        await publisher.publish(markets=[make_market(TICKER)])
        await publish_snapshots(publisher, wave_snapshots(TICKER, MORE_ROWS))
        await publisher.close()
        gate = asyncio.Event()
        original = server.repositories.exports.snapshots_for_backtest

        async def never_ending(*args: Any, **kwargs: Any) -> AsyncIterator[pa.RecordBatch]:
            async for batch in original(*args, **kwargs):
                yield batch
            await gate.wait()

        monkeypatch.setattr(server.repositories.exports, "snapshots_for_backtest", never_ending)
        stub = pb_grpc.BacktestServiceStub(channel)
        created = await stub.CreateBacktest(pb.CreateBacktestRequest(config=threshold_config()))
        await _running(stub, created.backtest.backtest_id)

    engine = create_engine(database_url)
    try:
        backtests = build_repositories(engine).backtests
        stopped = await backtests.get(created.backtest.backtest_id)
        assert stopped is not None
        assert (stopped.state, stopped.error_message) == (BacktestState.FAILED, SHUTDOWN_MESSAGE)
        await backtests.create(
            BacktestRecord(
                backtest_id="stale",
                config=EngineConfig(strategy="threshold", tickers=(TICKER,)),
                state=BacktestState.RUNNING,
            )
        )
    finally:
        await engine.dispose()

    restarted = KfeedServer(config)
    await restarted.start()
    try:
        stale = await restarted.repositories.backtests.get("stale")
        assert stale is not None
        assert (stale.state, stale.error_message) == (BacktestState.FAILED, RESTART_MESSAGE)
    finally:
        await restarted.stop(grace=0)
