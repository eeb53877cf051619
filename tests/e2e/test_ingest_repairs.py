"""`kfeed ingest` stopped while its WebSocket is in the reconnect backoff, with feed gaps still
being repaired: sim (sequence gaps, then a socket outage) → ingest → serve as real processes, on
SQLite and PostgreSQL.

A SIGTERM makes the lost connection's repairs (every market and the trades since the last one
received, over REST) before the process leaves; a SIGKILL leaves them to the next process, which
learns from the server what is pending (the stored trades' watermarks, the unrecovered feed
gaps). Either way, once the next process runs: every trade the exchange published once and with
its exact time, every market's lifecycle, only snapshots equal to the exchange's state, no feed
gap left unrecovered, and every open market's latest book the exchange's, not flagged."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from kfeed.v1 import market_service_pb2, market_service_pb2_grpc, types_pb2
from tests.e2e.test_order_books import book_at, book_truth, ladder, true_book
from tests.support.processes import (
    KfeedProcess,
    Server,
    Simulator,
    ingest_args,
    start_kfeed,
    stop_once_agreeing,
)
from tests.support.truth import (
    assert_snapshots_match_truth,
    lifecycle_differences,
    read_everything,
    read_trades,
    trade_differences,
)
from tests.support.waiting import eventually

BOOKS = "orderbook_delta"


async def _open_gaps(address: str) -> list[types_pb2.FeedGap]:
    """Every stored feed gap not recovered."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = market_service_pb2_grpc.MarketServiceStub(channel)
        request = market_service_pb2.ListFeedGapsRequest(page_size=1000)
        page = await stub.ListFeedGaps(request)
        return [gap for gap in page.feed_gaps if not gap.recovered]


async def _steps(simulator: Simulator, count: int) -> None:
    for _ in range(count):
        await simulator.step()
        await asyncio.sleep(0.05)


async def _book_differences(simulator: Simulator, address: str) -> list[str]:
    """How each open market's latest stored book differs from the exchange's (or is flagged)."""
    truth = await book_truth(simulator)
    differences = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = market_service_pb2_grpc.MarketServiceStub(channel)
        for market in truth["markets"]:
            if market["states"][-1]["status"] != "active" or not market["book_changes"]:
                continue
            book = await book_at(stub, market["ticker"], None)
            expected = true_book(market["book_changes"], 2**62)
            if book is None or book.in_feed_gap or ladder(book) != expected:
                shown = "none" if book is None else f"gap={book.in_feed_gap} {ladder(book)}"
                differences.append(f"{market['ticker']}: {shown} != {expected}")
    return differences


async def _truth_differences(simulator: Simulator, address: str, since_us: int) -> list[str]:
    truth = await simulator.truth()
    stored = await read_everything(address)
    trades = await read_trades(address, stored.markets)
    return [
        *lifecycle_differences(stored, truth),
        *trade_differences(trades, truth, since_us),
        *(f"open gap {gap}" for gap in await _open_gaps(address)),
        *await _book_differences(simulator, address),
    ]


async def _lose_the_socket_with_books_awaited(
    simulator: Simulator, server: Server, ingest: KfeedProcess
) -> None:
    """Order-book frames lost, and the fresh books asked for withheld, until the server holds an
    open order-book gap; then the exchange refuses sockets: the next data frame drops the
    connection, with the gap still open."""
    await simulator.set_faults(sequence_gap_rate=0.5, withhold_snapshots=True)

    async def book_gap_open() -> bool:
        ingest.assert_running()
        await _steps(simulator, 1)
        return any(gap.channel == BOOKS for gap in await _open_gaps(server.address))

    await eventually(book_gap_open, within=60, what="an open order-book gap")
    await simulator.set_faults(sequence_gap_rate=0.0, refuse_sockets=True)
    await _steps(simulator, 1)  # its first data frame closes the socket
    await eventually(
        lambda: "WebSocket lost" in ingest.log(), within=30, what="the ingest losing its socket"
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_a_stop_in_the_reconnect_backoff_loses_nothing_and_leaves_no_gap_open(
    simulator: Simulator, server: Server, tmp_path: Path, log_dir: Path, stop: signal.Signals
) -> None:
    await simulator.step(40)
    now = datetime.fromisoformat((await simulator.truth())["now"].replace("Z", "+00:00"))
    since_us = (now - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    # Discovery passes (which read every market's trades again) far apart: the repairs of the
    # lost connection are what brings the outage's trades.
    args = ingest_args(
        simulator, server, tmp_path / "spool", "--mode", "ws", "--discovery-interval", "10"
    )
    ingest = await start_kfeed("ingest", args, log_dir)
    await eventually(
        lambda: "connected to" in ingest.log(), within=120, what="the ingest's WebSocket open"
    )
    await _steps(simulator, 8)
    await _lose_the_socket_with_books_awaited(simulator, server, ingest)
    await _steps(simulator, 12)  # trades and lifecycle changes no socket shows
    await eventually(
        lambda: "refused the WebSocket (HTTP 503)" in ingest.log(),
        within=30,
        what="the ingest in its reconnect backoff",
    )
    outage_truth = await simulator.truth()
    expected = -stop if stop == signal.SIGKILL else 0
    assert await ingest.stop(stop) == expected, ingest.log()

    if stop == signal.SIGTERM:
        # The lost connection's repairs were made before the process left.
        # (The socket's trades keep their whole-second times until the next process's first
        # pass; here only what is missing counts.)
        stored = await read_everything(server.address)
        trades = await read_trades(server.address, stored.markets)
        published = {
            trade["trade_id"]
            for market in outage_truth["markets"]
            if market["ticker"] in stored.markets
            for trade in market["trades"]
            if trade["ts_us"] >= since_us
        }
        assert published - {t.trade_id for ts in trades.values() for t in ts} == set()
        assert lifecycle_differences(stored, outage_truth) == []
        assert "stopping between two connections" in ingest.log()
    # The order-book gap stays open (its repair is a fresh book from a socket): the next
    # process must close it.
    assert [gap for gap in await _open_gaps(server.address) if gap.channel == BOOKS]

    await simulator.set_faults(refuse_sockets=False, withhold_snapshots=False)
    await _steps(simulator, 4)  # the exchange moves on while none runs
    ingest = await start_kfeed("ingest", args, log_dir)
    await eventually(
        lambda: "connected to" in ingest.log(), within=120, what="the ingest's WebSocket open"
    )
    await _steps(simulator, 10)

    await stop_once_agreeing(
        ingest,
        lambda: _truth_differences(simulator, server.address, since_us),
        within=90,
        interval=0.5,
    )
    truth = await simulator.truth()
    stored = await read_everything(server.address)
    trades = await read_trades(server.address, stored.markets)
    assert sum(len(t) for t in trades.values()) > 20
    assert_snapshots_match_truth(stored, truth)  # also: no instant stored twice
    logs = await asyncio.to_thread(lambda: [p.read_text() for p in log_dir.glob("*-ingest.log")])
    assert not [log for log in logs if "Traceback" in log]
