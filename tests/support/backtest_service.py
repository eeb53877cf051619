"""Recorded data to backtest, configurations, and calls that follow a backtest to its end."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta

from kfeed.v1 import backtest_service_pb2 as pb
from kfeed.v1 import backtest_service_pb2_grpc as pb_grpc
from kfeed_server.backtest.service import RunnerConfig
from kfeed_server.db.repositories import Repositories
from kfeed_server.records import MarketRecord, MarketResult, MarketStatus, SnapshotRecord
from kfeed_server.transport.convert import dollars, timestamp
from tests.support.factories import at, make_market, make_snapshot
from tests.support.servers import PublishSession

TICKER = "KXTEST-A"
OTHER_TICKER = "KXTEST-B"
# Small reports so that short test runs still show progress and take cancels quickly.
TEST_RUNNER = RunnerConfig(workers=1, progress_every=64, persist_interval=0.1)
# Generous: a fresh checkout compiles the backtest kernel (numba) once, ~15 s on a busy machine.
WATCH_TIMEOUT = 60.0


def wave_snapshots(ticker: str, count: int, *, offset: int = 0) -> list[SnapshotRecord]:
    """``count`` snapshots one second apart whose YES mid swings between $0.30 and $0.70, so the
    threshold strategy (buy <= $0.40, sell >= $0.60) trades every cycle."""
    snapshots = []
    for i in range(offset, offset + count):
        mid = 5_000 + round(2_000 * math.sin(i / 7)) + (i % 5) * 10
        bid, ask = mid - 100, mid + 100
        snapshots.append(
            make_snapshot(
                ticker, i, yes_bid=bid, yes_ask=ask, no_bid=10_000 - ask, no_ask=10_000 - bid
            )
        )
    return snapshots


def settled_market(ticker: str, result: MarketResult, settle_after_seconds: float) -> MarketRecord:
    """A market that settled with ``result`` ``settle_after_seconds`` after BASE_TIME."""
    return make_market(
        ticker,
        status=MarketStatus.FINALIZED,
        result=result,
        settlement_time=at(settle_after_seconds),
    )


async def publish_snapshots(publisher: PublishSession, snapshots: list[SnapshotRecord]) -> None:
    """Publishes in batches that stay far below the message size limit."""
    for first in range(0, len(snapshots), 2_000):
        ack = await publisher.publish(snapshots=snapshots[first : first + 2_000])
        assert ack.code == 0, ack.message


def threshold_config(
    tickers: tuple[str, ...] = (TICKER,), *, seconds: int = 10_000, **parameters: int
) -> pb.BacktestConfig:
    """The threshold strategy over [BASE_TIME, BASE_TIME + seconds)."""
    values = {"buy_below": 4_000, "sell_above": 6_000, "count": 100} | parameters
    config = pb.BacktestConfig(
        strategy="threshold",
        tickers=tickers,
        parameters={
            "buy_below": pb.ParameterValue(dollars_value=dollars(values["buy_below"])),
            "sell_above": pb.ParameterValue(dollars_value=dollars(values["sell_above"])),
            "count": pb.ParameterValue(integer_value=values["count"]),
        },
    )
    config.start_time.CopyFrom(timestamp(at(0)))
    config.end_time.CopyFrom(timestamp(at(0) + timedelta(seconds=seconds)))
    return config


async def watch_to_end(
    stub: pb_grpc.BacktestServiceAsyncStub, backtest_id: str, min_interval_ms: int = 10
) -> list[pb.Backtest]:
    """Every message of a WatchBacktest stream (the last one carries the terminal state)."""
    request = pb.WatchBacktestRequest(backtest_id=backtest_id)
    request.min_interval.FromMilliseconds(min_interval_ms)
    seen = [m.backtest async for m in stub.WatchBacktest(request, timeout=WATCH_TIMEOUT)]
    return seen


async def run_to_end(
    stub: pb_grpc.BacktestServiceAsyncStub,
    config: pb.BacktestConfig,
    sweep: pb.ParameterSweep | None = None,
) -> pb.Backtest:
    """Creates a backtest, watches it to its terminal state and returns that (FULL view)."""
    created = await stub.CreateBacktest(pb.CreateBacktestRequest(config=config, sweep=sweep))
    await watch_to_end(stub, created.backtest.backtest_id)
    response = await stub.GetBacktest(
        pb.GetBacktestRequest(backtest_id=created.backtest.backtest_id, view=pb.BACKTEST_VIEW_FULL)
    )
    return response.backtest


async def all_executions(
    stub: pb_grpc.BacktestServiceAsyncStub, backtest_id: str, page_size: int = 0
) -> list[pb.Execution]:
    """Every execution of a backtest, following page tokens."""
    executions: list[pb.Execution] = []
    token = ""
    while True:
        page = await stub.ListExecutions(
            pb.ListExecutionsRequest(backtest_id=backtest_id, page_size=page_size, page_token=token)
        )
        executions.extend(page.executions)
        token = page.next_page_token
        if not token:
            return executions


async def stored_window(
    repositories: Repositories, tickers: Sequence[str], start: datetime, end: datetime
) -> list[SnapshotRecord]:
    """The stored snapshots a backtest over ``tickers`` and [start, end) replays, in its order
    (exchange time, then id), read as records."""
    stored = await repositories.snapshots.list_after_id(0, tickers=tickers, limit=10_000_000)
    window = [row for row in stored if start <= row.exchange_time < end]
    return sorted(window, key=lambda row: (row.exchange_time, row.snapshot_id))
