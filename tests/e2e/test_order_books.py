"""Order books end to end with real processes: `kfeed sim` (sequence gaps, dropped sockets) →
`kfeed ingest --mode ws` → `kfeed serve` (SQLite and PostgreSQL). GetOrderBook at random past
instants equals the simulator's true book at that instant, level for level, except inside the
windows the recording flags as gaps; a StreamOrderBooks subscriber that applies what it
receives holds the simulator's books live, through the gaps and the dropped socket."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf.timestamp_pb2 import Timestamp

from kfeed.v1 import market_service_pb2, market_service_pb2_grpc, types_pb2
from kfeed_client.books import LocalOrderBooks
from tests.support.processes import Server, Simulator, ingest_args, start_kfeed

Ladder = tuple[list[tuple[int, int]], list[tuple[int, int]]]


async def book_truth(simulator: Simulator) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=60) as client:
        reply = await client.get(f"{simulator.base_url}/_sim/truth", params={"books": 1})
        reply.raise_for_status()
        document: dict[str, Any] = reply.json()
        return document


def true_book(changes: list[list[Any]], ts_us: int) -> Ladder:
    """The simulator's book at ``ts_us``: every change at or before it, replayed."""
    sides: dict[str, dict[int, int]] = {"yes": {}, "no": {}}
    for when, side, price, size in changes:
        if when > ts_us:
            break
        if size:
            sides[side][price] = size
        else:
            sides[side].pop(price, None)
    return (
        sorted(sides["yes"].items(), reverse=True),
        sorted(sides["no"].items(), reverse=True),
    )


def ladder(book: types_pb2.OrderBook) -> Ladder:
    return (
        [(lv.price.ten_thousandths, lv.size.hundredths) for lv in book.yes_bids],
        [(lv.price.ten_thousandths, lv.size.hundredths) for lv in book.no_bids],
    )


def stamp(ts_us: int) -> Timestamp:
    value = Timestamp()
    value.FromMicroseconds(ts_us)
    return value


async def book_at(
    stub: market_service_pb2_grpc.MarketServiceAsyncStub, ticker: str, ts_us: int | None
) -> types_pb2.OrderBook | None:
    request = market_service_pb2.GetOrderBookRequest(ticker=ticker)
    if ts_us is not None:
        request.time.CopyFrom(stamp(ts_us))
    try:
        return (await stub.GetOrderBook(request)).book
    except grpc.aio.AioRpcError as error:
        if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            return None  # not recorded (yet) at that instant
        raise


async def _latest_books_match(
    simulator: Simulator,
    stub: market_service_pb2_grpc.MarketServiceAsyncStub,
    applied: LocalOrderBooks,
    created_before_us: int | None = None,
    within: float = 30.0,
) -> list[str]:
    """Waits until every open market's latest stored book, and the book a stream subscriber
    applied, is the simulator's current one; the differences left at the deadline (empty once
    they match)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        truth = await book_truth(simulator)
        differences = []
        for market in truth["markets"]:
            if market["states"][-1]["status"] != "active":
                continue
            if created_before_us is not None and market["states"][0]["ts_us"] >= created_before_us:
                continue  # too new: followed from a discovery pass after the last steps
            book = await book_at(stub, market["ticker"], None)
            expected = true_book(market["book_changes"], 2**62)
            if book is None or book.in_feed_gap or ladder(book) != expected:
                shown = "none" if book is None else f"gap={book.in_feed_gap} {ladder(book)}"
                differences.append(f"{market['ticker']}: {shown} != {expected}")
            streamed = applied.books.get(market["ticker"])
            if (
                streamed is None
                or streamed.in_feed_gap
                or ((streamed.yes_bids(), streamed.no_bids()) != expected)
            ):
                differences.append(f"{market['ticker']} streamed: {streamed} != {expected}")
        if not differences or asyncio.get_running_loop().time() > deadline:
            return differences
        await asyncio.sleep(0.5)


async def _apply_stream(
    stub: market_service_pb2_grpc.MarketServiceAsyncStub, applied: LocalOrderBooks
) -> None:
    """Follow every market's book from now on, as a client does."""
    request = market_service_pb2.StreamOrderBooksRequest(max_batch_size=100)
    async for message in stub.StreamOrderBooks(request):
        applied.apply(message)


async def _steps(simulator: Simulator, count: int) -> None:
    for _ in range(count):
        await simulator.step()
        await asyncio.sleep(0.05)


async def test_books_at_random_past_instants_equal_the_exchange_books(
    simulator: Simulator, server: Server, tmp_path: Path, log_dir: Path
) -> None:
    args = ingest_args(
        simulator,
        server,
        tmp_path / "spool",
        "--mode",
        "ws",
        "--book-checkpoint-changes",
        "25",
        "--discovery-interval",
        "1",
    )
    ingest = await start_kfeed("ingest", args, log_dir)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub: market_service_pb2_grpc.MarketServiceAsyncStub = (
            market_service_pb2_grpc.MarketServiceStub(channel)
        )
        applied = LocalOrderBooks()  # from before the first book: each comes live
        following = asyncio.create_task(_apply_stream(stub, applied))
        try:
            async with asyncio.timeout(60):
                while "connected to" not in ingest.log():  # noqa: ASYNC110 (a log, no event)
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1)  # subscribed: the first books are in
            # a full book is placed in time by the next timed frame after it
            await _steps(simulator, 2)
            assert await _latest_books_match(simulator, stub, applied) == []
            await _steps(simulator, 10)
            await simulator.set_faults(sequence_gap_rate=0.03)
            await _steps(simulator, 15)
            await simulator.set_faults(sequence_gap_rate=0.0, drop_socket_every=60)
            # Step until the simulator has dropped the socket once: how many messages a step
            # sends varies, so a fixed count of steps may not reach the 60th message.
            for _ in range(60):
                await _steps(simulator, 1)
                if "WebSocket lost" in ingest.log():
                    break
            await simulator.set_faults(drop_socket_every=None)
            await _steps(simulator, 10)
            settled = await book_truth(simulator)
            await asyncio.sleep(2.5)  # a discovery pass follows the markets created meanwhile
            await _steps(simulator, 3)
            created_before = max(s["ts_us"] for m in settled["markets"] for s in m["states"])
            assert await _latest_books_match(simulator, stub, applied, created_before) == []
            assert not following.done()  # the stream went on through gaps and the lost socket
        finally:
            following.cancel()
            assert await ingest.stop() == 0, ingest.log()

        truth = await book_truth(simulator)
        assert "sequence gap" in ingest.log()
        assert "WebSocket lost" in ingest.log()
        rng = random.Random(13)
        markets = [m for m in truth["markets"] if m["book_changes"]]
        live_start = min(
            change[0]
            for m in markets
            for change in m["book_changes"]
            if change[0] > truth["markets"][0]["states"][0]["ts_us"]
        )
        now_us = max(m["book_changes"][-1][0] for m in markets)
        compared = flagged = unrecorded = 0
        while compared + flagged < 200:
            market = rng.choice(markets)
            # a step's instant, or any microsecond between two
            if rng.random() < 0.5:
                ts_us = rng.choice(market["book_changes"])[0]
            else:
                ts_us = rng.randint(live_start, now_us)
            book = await book_at(stub, market["ticker"], ts_us)
            if book is None:
                unrecorded += 1
                assert unrecorded < 2_000
                continue
            if book.in_feed_gap:
                flagged += 1
                continue
            assert ladder(book) == true_book(market["book_changes"], ts_us), (
                market["ticker"],
                ts_us,
            )
            assert book.exchange_time.ToMicroseconds() <= ts_us
            compared += 1
        assert flagged < compared, (flagged, compared)
