"""The WebSocket client against the simulator: books, gaps and their recovery, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from kfeed.v1 import ingest_service_pb2, types_pb2
from kfeed_ingest.backoff import Backoff
from kfeed_ingest.kalshi.books import BookChange
from kfeed_ingest.kalshi.models import KalshiMarket
from kfeed_ingest.kalshi.normalise import snapshot_from_market
from kfeed_ingest.kalshi.rest import KalshiRestClient, TokenBucket
from kfeed_ingest.kalshi.websocket import FeedItem, KalshiWebSocketClient, LifecycleEvent
from kfeed_sim.config import FaultConfig
from kfeed_sim.market_model import MarketState
from tests.support.sim import SignedSim, signed_simulator
from tests.support.truth import STATUS
from tests.support.waiting import eventually


@dataclass
class Collected:
    """Everything a running client yielded, by kind."""

    client: KalshiWebSocketClient
    snapshots: list[types_pb2.MarketSnapshot] = field(default_factory=list)
    trades: list[types_pb2.Trade] = field(default_factory=list)
    gaps: list[types_pb2.FeedGap] = field(default_factory=list)
    lifecycle: list[LifecycleEvent] = field(default_factory=list)
    markets: list[KalshiMarket] = field(default_factory=list)
    book: list[BookChange | ingest_service_pb2.OrderBookCheckpoint] = field(default_factory=list)

    def add(self, item: FeedItem) -> None:
        if isinstance(item, types_pb2.MarketSnapshot):
            self.snapshots.append(item)
        elif isinstance(item, types_pb2.Trade):
            self.trades.append(item)
        elif isinstance(item, types_pb2.FeedGap):
            self.gaps.append(item)
        elif isinstance(item, KalshiMarket):
            self.markets.append(item)
        elif isinstance(item, BookChange | ingest_service_pb2.OrderBookCheckpoint):
            self.book.append(item)
        else:
            self.lifecycle.append(item)

    def latest(self, ticker: str) -> types_pb2.MarketSnapshot | None:
        mine = [s for s in self.snapshots if s.ticker == ticker]
        return mine[-1] if mine else None


@contextlib.asynccontextmanager
async def rest_client(sim: SignedSim) -> AsyncIterator[KalshiRestClient]:
    async with KalshiRestClient(
        sim.handle.rest_url, credentials=sim.credentials, rate_limiter=TokenBucket(1000)
    ) as rest:
        yield rest


async def seeded_client(
    sim: SignedSim, rest: KalshiRestClient, tickers: list[str]
) -> KalshiWebSocketClient:
    """A client of ``tickers``, its live state seeded from REST as the runner does."""
    now = datetime.now(UTC)
    known = {
        m.ticker: snapshot_from_market(m, now) async for m in rest.iter_markets(tickers=tickers)
    }
    return KalshiWebSocketClient(
        sim.handle.ws_url,
        sim.credentials,
        tickers,
        rest=rest,
        known=known,
        backoff=Backoff(initial=0.01, maximum=0.05),
        coalesce_seconds=0.02,
        resync_delay=0.05,
    )


@contextlib.asynccontextmanager
async def collecting(sim: SignedSim, tickers: list[str]) -> AsyncIterator[Collected]:
    """A client streaming ``tickers``, its live state seeded from REST as the runner does."""
    async with rest_client(sim) as rest:
        client = await seeded_client(sim, rest, tickers)
        collected = Collected(client)

        async def run() -> None:
            async for item in client.stream():
                collected.add(item)

        task = asyncio.create_task(run())
        try:
            yield collected
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _book_matches_truth(sim: SignedSim, collected: Collected, ticker: str) -> bool:
    latest = collected.latest(ticker)
    truth = sim.handle.exchange.markets[ticker].state
    if latest is None:
        return False
    shown = (
        latest.yes_bid.ten_thousandths if latest.HasField("yes_bid") else 0,
        latest.yes_ask.ten_thousandths if latest.HasField("yes_ask") else 10_000,
    )
    return shown == (truth.yes_bid, truth.yes_ask)


async def _subscribed(collected: Collected, tickers: list[str]) -> None:
    """Wait for the four subscriptions and the first book of each market (a book alone is no
    instant: nothing is emitted until the exchange moves)."""
    await eventually(lambda: collected.client.stats.frames >= 4 + len(tickers))


def _all_books_match(sim: SignedSim, collected: Collected, tickers: list[str]) -> bool:
    return all(_book_matches_truth(sim, collected, ticker) for ticker in tickers)


async def _step(sim: SignedSim, steps: int) -> None:
    for _ in range(steps):
        sim.handle.advance()
        await asyncio.sleep(0.02)


async def test_live_snapshots_follow_the_exchange_exactly() -> None:
    async with signed_simulator() as sim:
        tickers = sim.open_tickers()
        async with collecting(sim, tickers) as collected:
            await _subscribed(collected, tickers)
            await _step(sim, 8)
            await eventually(lambda: _all_books_match(sim, collected, tickers))
            # Activity too, once the ticker channel has reported each market's last state.
            await eventually(
                lambda: all(
                    (latest := collected.latest(t)) is not None
                    and latest.volume.hundredths == sim.handle.exchange.markets[t].state.volume
                    for t in tickers
                    if sim.handle.exchange.markets[t].state.volume
                )
            )
        assert collected.gaps == []
        assert {s.source for s in collected.snapshots} == {types_pb2.DATA_SOURCE_WEBSOCKET}
        assert any(s.HasField("exchange_sequence") for s in collected.snapshots)
        truth_trades = {
            t.trade_id for ticker in tickers for t in sim.handle.exchange.markets[ticker].trades
        }
        assert {t.trade_id for t in collected.trades} <= truth_trades


def _gap_keys(gaps: list[types_pb2.FeedGap], *, recovered: bool) -> set[tuple[int, int]]:
    return {
        (g.subscription_id, g.expected_sequence)
        for g in gaps
        if g.channel == "orderbook_delta" and g.recovered == recovered
    }


async def test_sequence_gaps_are_recorded_and_the_books_recovered() -> None:
    async with signed_simulator() as sim:
        tickers = sim.open_tickers()
        async with collecting(sim, tickers) as collected:
            await _subscribed(collected, tickers)
            sim.handle.set_faults(FaultConfig(sequence_gap_rate=0.3))
            await _step(sim, 12)
            sim.handle.set_faults(FaultConfig())
            await eventually(lambda: bool(_gap_keys(collected.gaps, recovered=False)))
            await _step(sim, 3)
            await eventually(
                lambda: (
                    _gap_keys(collected.gaps, recovered=False)
                    <= _gap_keys(collected.gaps, recovered=True)
                    and _all_books_match(sim, collected, tickers)
                )
            )
        for gap in collected.gaps:
            assert gap.received_sequence > gap.expected_sequence
            assert gap.subscription_id > 0
            assert gap.HasField("recover_time") == gap.recovered
        assert collected.client.stats.gaps_recovered >= 1


async def test_a_dropped_socket_is_reconnected_and_resubscribed() -> None:
    async with signed_simulator() as sim:
        tickers = sim.open_tickers()
        async with collecting(sim, tickers) as collected:
            await _subscribed(collected, tickers)
            sim.handle.set_faults(FaultConfig(drop_socket_every=5))
            await _step(sim, 6)
            await eventually(lambda: collected.client.stats.connections >= 2)
            sim.handle.set_faults(FaultConfig())
            await _step(sim, 4)
            await eventually(lambda: _all_books_match(sim, collected, tickers))


async def test_an_unsigned_or_wrongly_signed_handshake_keeps_retrying(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with signed_simulator() as sim:
        async with rest_client(sim) as rest:
            client = KalshiWebSocketClient(
                sim.handle.ws_url, None, sim.open_tickers(), rest=rest, backoff=Backoff(0.01, 0.02)
            )
            items = client.stream()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await anext(items)
            await items.aclose()
        assert client.stats.connections == 0
        assert "refused the WebSocket (HTTP 401): the signature was not accepted" in caplog.text


def _shown(snapshot: types_pb2.MarketSnapshot) -> tuple[int, ...]:
    """A snapshot in the simulator's terms (an empty side is a bid of 0 / an ask of 1.00)."""
    when = snapshot.exchange_time
    return (
        when.seconds * 1_000_000 + when.nanos // 1000,
        int(snapshot.status),
        snapshot.yes_bid.ten_thousandths if snapshot.HasField("yes_bid") else 0,
        snapshot.yes_ask.ten_thousandths if snapshot.HasField("yes_ask") else 10_000,
        snapshot.last_price.ten_thousandths,
        snapshot.volume.hundredths,
        snapshot.open_interest.hundredths,
    )


def _truth(state: MarketState) -> tuple[int, ...]:
    status = STATUS[state.status.value]
    return (state.ts_us, status, state.yes_bid, state.yes_ask, state.last_price, state.volume,
            state.open_interest)  # fmt: skip


def _caught_up(sim: SignedSim, collected: Collected, tickers: list[str]) -> bool:
    """Every market's newest snapshot is its current truth and every gap was recovered."""
    pending = {(g.subscription_id, g.expected_sequence) for g in collected.gaps if not g.recovered}
    recovered = {(g.subscription_id, g.expected_sequence) for g in collected.gaps if g.recovered}
    return pending <= recovered and all(
        (latest := collected.latest(t)) is not None
        and _shown(latest) == _truth(sim.handle.exchange.markets[t].state)
        for t in tickers
    )


async def test_gaps_on_every_channel_are_repaired_and_every_snapshot_is_exact() -> None:
    async with signed_simulator() as sim:
        # Markets that stay open: the socket announces no close (see ADR 0005, "not yet").
        exchange = sim.handle.exchange
        lasting = [
            t
            for t in sim.open_tickers(6)
            if exchange.markets[t].close_step > exchange.current_step + 13
        ]
        tickers = lasting[:4]
        assert len(tickers) >= 2
        async with collecting(sim, tickers) as collected:
            await _subscribed(collected, tickers)
            trades_before = sim.handle.exchange.trade_seq
            sim.handle.set_faults(FaultConfig(sequence_gap_rate=0.3))
            await _step(sim, 12)
            sim.handle.set_faults(FaultConfig())
            await _step(sim, 1)
            await eventually(lambda: _caught_up(sim, collected, tickers))
        assert {"ticker", "trade"} <= {g.channel for g in collected.gaps}
        assert collected.client.stats.rest_resyncs >= 1
        for snapshot in collected.snapshots:
            states = {
                s.ts_us: _truth(s) for s in sim.handle.exchange.markets[snapshot.ticker].states
            }
            shown = _shown(snapshot)
            assert shown == states.get(shown[0]), snapshot.ticker
        # Trades lost with their frames were read again over REST.
        traded = {
            t.trade_id
            for ticker in tickers
            for t in sim.handle.exchange.markets[ticker].trades
            if t.seq > trades_before
        }
        assert traded <= {t.trade_id for t in collected.trades}


Levels = list[tuple[int, int]]


def recorded_book_at(
    records: list[BookChange | ingest_service_pb2.OrderBookCheckpoint], ticker: str, ts_us: int
) -> tuple[Levels, Levels] | None:
    """The book the ingest's records give at ``ts_us`` (None: unknown then, as a LOST marker
    says, or not recorded yet): the latest checkpoint at or before it, then the changes after it.
    An independent replay of what the server stores (kfeed_server.books does it in SQL)."""
    books: tuple[dict[int, int], dict[int, int]] | None = None
    known = False
    events: list[tuple[int, int, BookChange | ingest_service_pb2.OrderBookCheckpoint]] = []
    for order, record in enumerate(records):
        if isinstance(record, BookChange):
            if record.ticker == ticker:
                events.append((record.exchange_time_us, 1, record))
        elif record.book.ticker == ticker:
            stamp = record.book.exchange_time
            # a checkpoint holds every change at its time: it comes after them
            events.append((stamp.seconds * 1_000_000 + stamp.nanos // 1000, 2, record))
        del order
    for when, _, record in sorted(events, key=lambda e: (e[0], e[1])):
        if when > ts_us:
            break
        if isinstance(record, BookChange):
            if books is not None and known:
                side = books[0] if record.side == types_pb2.SIDE_YES else books[1]
                if record.size:
                    side[record.price] = record.size
                else:
                    side.pop(record.price, None)
            continue
        known = record.kind != ingest_service_pb2.ORDER_BOOK_CHECKPOINT_KIND_LOST
        books = (
            {lv.price.ten_thousandths: lv.size.hundredths for lv in record.book.yes_bids},
            {lv.price.ten_thousandths: lv.size.hundredths for lv in record.book.no_bids},
        )
    if books is None or not known:
        return None
    return sorted(books[0].items(), reverse=True), sorted(books[1].items(), reverse=True)


async def test_recorded_books_equal_the_exchange_at_every_step_despite_gaps_and_drops() -> None:
    """Book changes and checkpoints replayed give the exchange's book at every step, except
    where a LOST marker says the book was not seen; recovery is by get_snapshot naming markets."""
    async with signed_simulator(markets=10) as sim:
        exchange = sim.handle.exchange
        tickers = [
            t
            for t in sim.open_tickers(10)
            if exchange.markets[t].close_step > exchange.current_step + 25
        ][:4]
        assert len(tickers) >= 2
        async with collecting(sim, tickers) as collected:
            await _subscribed(collected, tickers)
            first_step = sim.handle.exchange.current_step
            sim.handle.set_faults(FaultConfig(sequence_gap_rate=0.01, seed=3))
            await _step(sim, 10)
            sim.handle.set_faults(FaultConfig(drop_socket_every=25))
            await _step(sim, 6)
            await eventually(lambda: collected.client.stats.connections >= 2)
            sim.handle.set_faults(FaultConfig())
            await eventually(lambda: _all_books_match(sim, collected, tickers))
            # Faults over and the feed in sync: from here every step must be recorded. (How many
            # steps the faults cost depends on how fast the machine reconnects: not counted.)
            in_sync_step = sim.handle.exchange.current_step
            for _ in range(6):
                await _step(sim, 1)
                await eventually(lambda: _all_books_match(sim, collected, tickers))
            last_step = sim.handle.exchange.current_step
        kinds = {
            r.kind for r in collected.book if isinstance(r, ingest_service_pb2.OrderBookCheckpoint)
        }
        assert {
            ingest_service_pb2.ORDER_BOOK_CHECKPOINT_KIND_START,
            ingest_service_pb2.ORDER_BOOK_CHECKPOINT_KIND_LOST,
        } <= kinds
        assert collected.client.stats.gaps_detected >= 1
        assert collected.client.stats.connections >= 2
        compared = 0
        for step in range(first_step + 1, last_step + 1):
            when = exchange.time_of_step(step)
            for ticker in tickers:
                recorded = recorded_book_at(collected.book, ticker, when)
                if recorded is None:
                    assert step <= in_sync_step, ("unknown once in sync", ticker, step)
                    continue
                assert recorded == exchange.markets[ticker].book_history.book_at(when), (
                    ticker,
                    step,
                )
                compared += 1
        assert compared >= (last_step - in_sync_step) * len(tickers), compared
        # the last step of every market is known again
        for ticker in tickers:
            assert recorded_book_at(collected.book, ticker, exchange.now_us) is not None


def _unrecovered_repairable(gaps: list[types_pb2.FeedGap]) -> set[tuple[int, int]]:
    """Gaps a REST read repairs (not order-book ones) that are not recovered yet."""
    keys = {
        (g.subscription_id, g.expected_sequence) for g in gaps if g.channel != "orderbook_delta"
    }
    return keys - {(g.subscription_id, g.expected_sequence) for g in gaps if g.recovered}


async def test_a_repair_in_flight_when_the_stream_is_closed_is_made_by_finish_repairs() -> None:
    """The end of ``--once`` (and a stop): the stream is closed while a gap's REST read waits
    out the exchange's latency, or while its items are handed out; finish_repairs still makes
    or hands out the rest of it, and the gap comes out recovered."""
    async with signed_simulator() as sim, rest_client(sim) as rest:
        tickers = sim.open_tickers()
        client = await seeded_client(sim, rest, tickers)
        collected = Collected(client)
        items = client.stream()

        async def keep_stepping() -> None:
            while True:
                await _step(sim, 1)

        stepping = asyncio.create_task(keep_stepping())
        gapped = False
        async with asyncio.timeout(30):
            async for item in items:
                collected.add(item)
                if not gapped and client.stats.frames >= 4 + len(tickers):
                    sim.handle.set_faults(FaultConfig(sequence_gap_rate=0.3, latency_ms=1_000))
                    gapped = True
                if not _unrecovered_repairable(collected.gaps):
                    continue
                sim.handle.set_faults(FaultConfig(latency_ms=1_000))  # no more gaps
                # its read taken (no longer being collected): close mid-read, or amid its items
                if client._session is not None and client._session.resync is None:
                    break
        stepping.cancel()
        await items.aclose()
        sim.handle.set_faults(FaultConfig())
        lost = _unrecovered_repairable(collected.gaps)
        for item in await client.finish_repairs(grace=10):
            collected.add(item)
        assert lost
        assert _unrecovered_repairable(collected.gaps) == set()
