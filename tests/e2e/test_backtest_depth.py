"""The DEPTH fill model against the exchange's truth: `kfeed sim` → `kfeed ingest --mode ws`
records the order books into a server; a DEPTH backtest through CreateBacktest sends YES market
orders (tests/support/depth_probe.py) at the recorded snapshots; each fill (count, average price,
cash paid) equals an independent walk of the simulator's true book at the order's instant."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from kfeed.v1 import backtest_service_pb2 as pb
from kfeed.v1 import backtest_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.backtest.service import RunnerConfig
from kfeed_server.books import NotRecordedError, OrderBooks
from tests.e2e.test_order_books import book_truth, true_book
from tests.support.backtest_service import WATCH_TIMEOUT, all_executions, run_to_end
from tests.support.processes import Server, Simulator, ingest_args, start_kfeed
from tests.support.servers import serving
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

COUNT = 25_000  # 250 contracts: sim levels hold 1-400, so orders often walk several levels
FAR_FUTURE_US = 2**62
FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)
ONE_DOLLAR = 10_000
COUNT_SCALE = 100


@pytest.fixture
async def recording_server(database_url: str) -> AsyncIterator[KfeedServer]:
    runner = RunnerConfig(workers=1, strategy_modules=("tests.support.depth_probe",))
    config = ServerConfig(listen="127.0.0.1:0", database_url=database_url, backtest=runner)
    async with serving(config) as server:
        yield server


async def _books_recorded(server: KfeedServer, simulator: Simulator) -> bool:
    """Whether every open market's latest stored book is the simulator's current one."""
    books = OrderBooks(server.repositories.markets, server.repositories.books)
    for market in (await book_truth(simulator))["markets"]:
        if market["states"][-1]["status"] != "active":
            continue
        try:
            stored = await books.book_at(market["ticker"], FAR_FUTURE)
        except NotRecordedError:
            return False
        expected = true_book(market["book_changes"], FAR_FUTURE_US)
        if (list(stored.yes), list(stored.no)) != expected:
            return False
    return True


def _walk(no_bids: list[tuple[int, int]], count: int) -> tuple[int, int, int]:
    """A YES buy of ``count`` against the true book: the NO bids best first, each at its
    complement. (filled count, Σ count × price, levels walked)."""
    filled = paid = levels = 0
    for no_price, size in no_bids:
        if filled == count:
            break
        take = min(size, count - filled)
        filled += take
        paid += take * (ONE_DOLLAR - no_price)
        levels += 1
    return filled, paid, levels


async def test_depth_fills_equal_walks_of_the_true_books(
    simulator: Simulator, recording_server: KfeedServer, tmp_path: Path, log_dir: Path
) -> None:
    address = f"127.0.0.1:{recording_server.port}"
    target = Server(address, recording_server.config.database_url, log_dir)
    args = ingest_args(simulator, target, tmp_path / "spool", "--mode", "ws",
                       "--book-checkpoint-changes", "25")  # fmt: skip
    ingest = await start_kfeed("ingest", args, log_dir)
    try:
        await eventually(lambda: "connected to" in ingest.log(), 60, what="ingest connected")
        for _ in range(25):
            await simulator.step()
            await asyncio.sleep(0.05)
        await eventually(
            lambda: _books_recorded(recording_server, simulator), 30, what="books recorded"
        )
    finally:
        assert await ingest.stop() == 0, ingest.log()
    truth = {m["ticker"]: m for m in (await book_truth(simulator))["markets"]}
    with_books = [t for t, m in truth.items() if m["book_changes"]]
    tickers = sorted(await recording_server.repositories.markets.existing_tickers(with_books))

    config = pb.BacktestConfig(
        strategy="depth_probe",
        tickers=tickers,
        fill_model=pb.FILL_MODEL_DEPTH,
        parameters={"count": pb.ParameterValue(integer_value=COUNT)},
    )
    config.initial_cash.ten_thousandths = 10**13  # never short of cash
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.BacktestServiceStub(channel)
        async with asyncio.timeout(WATCH_TIMEOUT):
            run = await run_to_end(stub, config)
        assert run.state == pb.BACKTEST_STATE_SUCCEEDED, run.error_message
        executions = await all_executions(stub, run.backtest_id)
    assert run.data_fingerprint.event_count > 0  # the books read are fingerprinted

    fills = walked_deep = 0
    previous_cash = config.initial_cash.ten_thousandths
    for execution in executions:
        if execution.action == pb.ORDER_ACTION_BUY:
            when = execution.time.ToMicroseconds()
            _, no_bids = true_book(truth[execution.ticker]["book_changes"], when)
            filled, paid, levels = _walk(no_bids, COUNT)
            where = (execution.ticker, when)
            assert execution.count.hundredths == filled, where
            # The average price rounds up for a buy; the cash paid is the exact sum, rounded up
            # to 1/10,000 USD, plus the fee.
            assert execution.price.ten_thousandths == -(-paid // filled), where
            cost = previous_cash - execution.cash_after.ten_thousandths
            assert cost == -(-paid // COUNT_SCALE) + execution.fee.ten_thousandths, where
            fills += 1
            walked_deep += levels > 1
        previous_cash = execution.cash_after.ten_thousandths
    assert fills >= 20, fills
    assert walked_deep >= 5, walked_deep
