"""`kfeed ingest` end to end on the ingest side: sim → IngestCommand → a real Publish peer."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest

from kfeed.v1 import ingest_service_pb2, types_pb2
from kfeed_ingest.cli import IngestCommand, derive_ws_url
from kfeed_ingest.runner import default_backfill_range
from kfeed_ingest.spool import Spool
from kfeed_sim.config import FaultConfig
from kfeed_sim.market_model import MarketStatus
from tests.support.fake_ingest_server import FakeIngestServer
from tests.support.processes import free_port
from tests.support.sim import KEY_ID, SignedSim, signed_simulator
from tests.support.waiting import eventually


def _command(
    sim: SignedSim, server: FakeIngestServer, tmp_path: Path, **flags: object
) -> IngestCommand:
    key_file = tmp_path / "kalshi.pem"
    if not key_file.exists():
        key_file.write_bytes(sim.private_pem)
    return IngestCommand.model_validate(
        {
            "server": server.target,
            "kalshi_url": sim.handle.rest_url,
            "spool_dir": tmp_path / "spool",
            "api_key_id": KEY_ID,
            "api_private_key_file": key_file,
            "producer": "ingest-test",
            "rate_limit": 1000,
            **flags,
        }
    )


def _stored_snapshots(server: FakeIngestServer) -> list[types_pb2.MarketSnapshot]:
    return [s for request in server.service.stored.values() for s in request.snapshots]


def _stored_trades(server: FakeIngestServer) -> list[types_pb2.Trade]:
    return [t for request in server.service.stored.values() for t in request.trades]


def _price(
    snapshot: types_pb2.MarketSnapshot, name: Literal["yes_bid", "yes_ask"], empty: int
) -> int:
    """The price, or the value Kalshi's truth uses for an empty side."""
    return int(getattr(snapshot, name).ten_thousandths) if snapshot.HasField(name) else empty


async def test_poll_once_stores_exactly_what_the_exchange_shows(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    async with signed_simulator() as sim:
        assert await _command(sim, server, tmp_path, mode="poll", once=True).run() == 0
        exchange = sim.handle.exchange
        open_markets = {t for t, m in exchange.markets.items() if m.status is MarketStatus.ACTIVE}

    snapshots = {s.ticker: s for s in _stored_snapshots(server)}
    assert set(snapshots) == open_markets
    for ticker, snapshot in snapshots.items():
        truth = exchange.markets[ticker].state
        assert _price(snapshot, "yes_bid", 0) == truth.yes_bid
        assert _price(snapshot, "yes_ask", 10_000) == truth.yes_ask
        assert snapshot.volume.hundredths == truth.volume
        assert snapshot.open_interest.hundredths == truth.open_interest
        assert snapshot.status == types_pb2.MARKET_STATUS_OPEN
        exchange_time = snapshot.exchange_time.ToDatetime(tzinfo=UTC)
        assert exchange_time == datetime.fromtimestamp(0, UTC) + timedelta(microseconds=truth.ts_us)
    requests = list(server.service.stored.values())
    markets = {m.ticker: m for r in requests for m in r.markets}
    assert set(markets) == open_markets
    assert all(
        m.series_ticker == exchange.markets[m.ticker].series_ticker for m in markets.values()
    )
    assert {e.event_ticker for r in requests for e in r.events} >= {
        m.event_ticker for m in markets.values()
    }
    assert {s.ticker for r in requests for s in r.series}
    # each open market's REST order book, as a START checkpoint
    books = {c.book.ticker: c for r in requests for c in r.book_checkpoints}
    assert set(books) == open_markets
    for ticker, book in books.items():
        yes, no = exchange.markets[ticker].orderbook()
        assert book.kind == ingest_service_pb2.ORDER_BOOK_CHECKPOINT_KIND_START
        assert _checkpoint_levels(book) == (sorted(yes, reverse=True), sorted(no, reverse=True))
    assert len(Spool.open(tmp_path / "spool")) == 0


async def test_poll_survives_rest_faults_and_still_gets_everything(
    server: FakeIngestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    faults = FaultConfig(error_rate=0.15, rate_limit_rate=0.15, malformed_rate=0.15, seed=3)
    async with signed_simulator(faults=faults) as sim:
        command = _command(
            sim, server, tmp_path, mode="poll", once=True, tickers=sim.open_tickers(3)
        )
        code = await command.run()
    assert "retrying" in caplog.text
    assert code == 0
    assert {s.ticker for s in _stored_snapshots(server)} == set(command.tickers)


def _state(snapshot: types_pb2.MarketSnapshot) -> bytes:
    content = types_pb2.MarketSnapshot()
    content.CopyFrom(snapshot)
    for name in ("exchange_time", "receive_time", "source", "exchange_sequence"):
        content.ClearField(name)
    return content.SerializeToString(deterministic=True)


async def test_ws_once_stores_live_snapshots(server: FakeIngestServer, tmp_path: Path) -> None:
    async with signed_simulator(auto_step=True, tick_interval=0.2) as sim:  # markets live 6–24 s
        tickers = sim.open_tickers(3)
        code = await _command(sim, server, tmp_path, mode="ws", once=True, tickers=tickers).run()
    assert code == 0
    stored = _stored_snapshots(server)
    assert {s.ticker for s in stored} == set(tickers)
    # Live state starts from the REST snapshot: the subscription's first book repeats it, so
    # it is not sent again — every stored snapshot of a market shows a new state.
    for ticker in tickers:
        states = [_state(s) for s in stored if s.ticker == ticker]
        assert all(a != b for a, b in itertools.pairwise(states)), ticker


async def test_backfill_reads_settled_markets_trades_and_candles_across_the_cutoff(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    async with signed_simulator(history_steps=120) as sim:
        exchange = sim.handle.exchange
        start = (
            datetime.fromtimestamp(0, UTC)
            + timedelta(microseconds=exchange.origin_us)
            - timedelta(days=1)
        )
        command = _command(
            sim, server, tmp_path, mode="backfill", once=True, statuses=["settled"], start=start
        )
        assert await command.run() == 0
        settled = {t for t, m in exchange.markets.items() if m.status is MarketStatus.FINALIZED}
        historical = {t for t in settled if exchange.is_historical_market(exchange.markets[t])}
        truth_trades = {tr.trade_id for t in settled for tr in exchange.markets[t].trades}

    requests = list(server.service.stored.values())
    markets = {m.ticker: m for r in requests for m in r.markets}
    assert historical, "the sim should have markets beyond the cutoff"
    assert set(markets) == settled
    assert all(m.status == types_pb2.MARKET_STATUS_FINALIZED for m in markets.values())
    assert all(m.result != types_pb2.MARKET_RESULT_UNSPECIFIED for m in markets.values())
    assert {t.trade_id for t in _stored_trades(server)} == truth_trades
    backfilled = [
        s for s in _stored_snapshots(server) if s.source == types_pb2.DATA_SOURCE_BACKFILL
    ]
    assert {s.ticker for s in backfilled} & historical
    assert {s.ticker for s in backfilled} - historical


def _checkpoint_levels(
    checkpoint: ingest_service_pb2.OrderBookCheckpoint,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    book = checkpoint.book
    return (
        [(lv.price.ten_thousandths, lv.size.hundredths) for lv in book.yes_bids],
        [(lv.price.ten_thousandths, lv.size.hundredths) for lv in book.no_bids],
    )


async def test_backfill_publishes_the_rest_book_of_markets_still_open(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    async with signed_simulator() as sim:
        exchange = sim.handle.exchange
        origin = datetime.fromtimestamp(0, UTC) + timedelta(microseconds=exchange.origin_us)
        tickers = sim.open_tickers(2)
        command = _command(
            sim, server, tmp_path, mode="backfill", once=True, tickers=tickers,
            start=origin - timedelta(days=1), end=origin + timedelta(days=400),
        )  # fmt: skip
        assert await command.run() == 0
        truth = {t: exchange.markets[t].orderbook() for t in tickers}
    books = {c.book.ticker: c for r in server.service.stored.values() for c in r.book_checkpoints}
    assert set(books) == set(tickers)
    for ticker, checkpoint in books.items():
        yes, no = truth[ticker]
        assert checkpoint.kind == ingest_service_pb2.ORDER_BOOK_CHECKPOINT_KIND_START
        assert _checkpoint_levels(checkpoint) == (
            sorted(yes, reverse=True),
            sorted(no, reverse=True),
        )


async def test_unacked_batches_of_a_failed_once_run_are_sent_by_the_next_run(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    async with signed_simulator() as sim:
        await server.stop()
        first = _command(
            sim, server, tmp_path, mode="poll", once=True, batch_rows=2, flush_timeout=0.3
        )
        assert await first.run() == 1  # nothing could be acknowledged
        spooled = len(Spool.open(tmp_path / "spool"))
        assert spooled > 0
        await server.start()
        assert await _command(sim, server, tmp_path, mode="poll", once=True).run() == 0
    assert len(server.service.stored) >= spooled
    assert len(Spool.open(tmp_path / "spool")) == 0


def test_list_flags_take_commas_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFEED_TICKERS", "A,B")
    monkeypatch.setenv("KFEED_MODE", "backfill")
    command = IngestCommand()
    assert command.tickers == ["A", "B"]
    assert command.mode == "backfill"
    assert IngestCommand(statuses="open, settled").statuses == ["open", "settled"]


def test_ws_url_is_derived_from_the_rest_url() -> None:
    assert (
        derive_ws_url("http://127.0.0.1:8765/trade-api/v2") == "ws://127.0.0.1:8765/trade-api/ws/v2"
    )
    assert (
        derive_ws_url("https://demo.example/trade-api/v2/") == "wss://demo.example/trade-api/ws/v2"
    )
    assert IngestCommand().ws_url == "wss://external-api-ws.kalshi.com/trade-api/ws/v2"
    assert IngestCommand(kalshi_ws_url="ws://x/y").ws_url == "ws://x/y"


def test_backfill_range_defaults_to_the_last_day() -> None:
    now = datetime(2026, 11, 25, tzinfo=UTC)
    assert default_backfill_range(None, None, now) == (now - timedelta(days=1), now)
    with pytest.raises(ValueError, match="not before"):
        default_backfill_range(now, now - timedelta(hours=1))


def test_credentials_need_both_halves(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        IngestCommand(api_key_id="k").credentials()


async def test_sigterm_stops_a_running_ingest_cleanly(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    async with signed_simulator(auto_step=True) as sim:
        key_file = tmp_path / "kalshi.pem"
        key_file.write_bytes(sim.private_pem)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kfeed_cli.main",
            "ingest",
            "--server",
            server.target,
            "--kalshi-url",
            sim.handle.rest_url,
            "--mode",
            "ws",
            "--spool-dir",
            str(tmp_path / "spool"),
            "--api-key-id",
            KEY_ID,
            "--api-private-key-file",
            str(key_file),
            env={**os.environ, "KFEED_POLL_INTERVAL": "0.5"},
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await eventually(lambda: bool(server.service.stored), within=30)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                _, stderr = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert b"signal received" in stderr


async def test_ws_mode_reads_a_market_again_just_after_its_close_time(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    """The exchange closes a market and no lifecycle frame says so (the simulator is not stepping,
    so it sends none): the ingest reads the market again at its close time, long before the next
    discovery pass, and sends its new status."""
    async with signed_simulator(tick_interval=0.2) as sim:  # markets close within seconds
        markets = sim.handle.exchange.markets.values()
        soon = time.time() + 1.5  # leaves time to start the ingest before the close
        ahead = [m for m in markets if m.status is MarketStatus.ACTIVE and m.close_us / 1e6 > soon]
        closing = min(ahead, key=lambda m: m.close_us)
        close_in = closing.close_us / 1e6 - time.time()
        assert close_in < 20, close_in

        def sent() -> list[types_pb2.Market]:
            return [
                market
                for request in server.service.stored.values()
                for market in request.markets
                if market.ticker == closing.ticker
            ]

        command = _command(
            sim, server, tmp_path, mode="ws", tickers=closing.ticker, discovery_interval=600
        )
        running = asyncio.ensure_future(command.run())
        try:
            await eventually(lambda: len(sent()) == 1)
            closing.states.append(
                dataclasses.replace(closing.states[-1], status=MarketStatus.CLOSED)
            )
            await eventually(lambda: len(sent()) == 2, within=close_in + 5)
            assert sent()[-1].status == types_pb2.MARKET_STATUS_CLOSED
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)


def _sent_markets(server: FakeIngestServer) -> dict[str, types_pb2.Market]:
    """The last version of each market sent (batches are numbered in the order they were read)."""
    latest: dict[str, types_pb2.Market] = {}
    for _, request in sorted(server.service.stored.items()):
        latest.update((m.ticker, m) for m in request.markets)
    return latest


async def test_ws_mode_follows_every_market_to_finalization_on_one_socket(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    """Markets close, are determined and finalized after they left the open listing; new ones
    open. Each market seen is followed until its final state (result, settlement value and
    time) is sent, new markets are added to the live subscriptions, and the socket is never
    reopened for it."""
    async with signed_simulator(tick_interval=0.2, markets=4) as sim:
        exchange = sim.handle.exchange
        command = _command(sim, server, tmp_path, mode="ws", discovery_interval=0.3)
        running = asyncio.ensure_future(command.run())
        try:
            await eventually(lambda: bool(_sent_markets(server)))
            first = set(_sent_markets(server))
            # Step until every market seen at first is finalized on the exchange.
            async with asyncio.timeout(60):
                while any(exchange.markets[t].status is not MarketStatus.FINALIZED for t in first):
                    sim.handle.advance()
                    await asyncio.sleep(0.03)
            await eventually(
                lambda: all(
                    _sent_markets(server)[t].status == types_pb2.MARKET_STATUS_FINALIZED
                    for t in first
                ),
                within=10,
            )

            def live() -> set[str]:
                return {
                    s.ticker
                    for s in _stored_snapshots(server)
                    if s.source == types_pb2.DATA_SOURCE_WEBSOCKET
                }

            # Markets that opened while the socket was open are added to it and stream live.
            async with asyncio.timeout(30):
                while not live() - first:
                    sim.handle.advance()
                    await asyncio.sleep(0.05)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        assert sim.handle.simulator.hub.accepted == 1

    sent = _sent_markets(server)
    for ticker in first:
        truth = exchange.markets[ticker]
        market = sent[ticker]
        assert market.result == STATUS_RESULT[truth.state.result], ticker
        assert market.settlement_value.ten_thousandths == truth.state.settlement_value, ticker
        settled = datetime.fromtimestamp(0, UTC) + timedelta(microseconds=truth.settle_us)
        assert market.settlement_time.ToDatetime(tzinfo=UTC) == settled, ticker


STATUS_RESULT = {"yes": types_pb2.MARKET_RESULT_YES, "no": types_pb2.MARKET_RESULT_NO}


async def test_sigkill_loses_no_trade_that_was_read_although_no_batch_was_complete(
    tmp_path: Path,
) -> None:
    """The bound on what a SIGKILL loses: rows reach the spool as they are read, not when their
    batch is complete. No server answers, and batches complete only after a minute; the ingest
    is killed; every trade the exchange published on its followed markets from its subscription
    until shortly before the kill is in the spool."""
    async with signed_simulator(auto_step=True, tick_interval=0.1) as sim:
        exchange = sim.handle.exchange
        key_file = tmp_path / "kalshi.pem"
        key_file.write_bytes(sim.private_pem)
        log = tmp_path / "ingest.log"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kfeed_cli.main", "ingest",
            "--server", f"127.0.0.1:{free_port()}",  # nobody listens: nothing is ever acked
            "--kalshi-url", sim.handle.rest_url, "--mode", "ws",
            "--linger", "60", "--batch-rows", "1000000", "--discovery-interval", "3600",
            "--spool-dir", str(tmp_path / "spool"),
            "--api-key-id", KEY_ID, "--api-private-key-file", str(key_file),
            stderr=log.open("wb"),
        )  # fmt: skip
        try:
            await eventually(lambda: sim.handle.simulator.hub.connections != [], within=30)
            subscribed_us = exchange.now_us

            await eventually(lambda: exchange.now_us > subscribed_us + 3_000_000, within=30)
            killed_us = exchange.now_us
            process.kill()
            await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        trades = [t for m in exchange.markets.values() for t in m.trades]
    with Spool.open(tmp_path / "spool") as spool:
        pending = spool.pending()
    followed = {m.ticker for request in pending for m in request.markets}
    # Allow for the subscription being confirmed, and for frames in flight at the kill.
    margin = 500_000
    expected = {
        t.trade_id
        for t in trades
        if t.ticker in followed and subscribed_us + margin < t.ts_us < killed_us - margin
    }
    assert len(expected) >= 5
    spooled = {t.trade_id for request in pending for t in request.trades}
    assert expected <= spooled, sorted(expected - spooled)


async def test_cancelled_command_stops_its_work_before_closing_its_clients(
    server: FakeIngestServer, tmp_path: Path
) -> None:
    """An embedding caller cancels `kfeed ingest`'s run: the reading stops with it. (It used to
    go on after the Kalshi client was closed under it and end in an unretrieved exception.)"""

    def reading() -> list[asyncio.Task[object]]:
        return [
            task
            for task in asyncio.all_tasks()
            if not task.done()
            and getattr(task.get_coro(), "__qualname__", "") == "IngestCommand._mode"
        ]

    async with signed_simulator(tick_interval=0.2) as sim:
        command = _command(sim, server, tmp_path, mode="ws", discovery_interval=1)
        running = asyncio.ensure_future(command.run())
        await eventually(lambda: bool(server.service.stored), within=30)
        assert len(reading()) == 1
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        assert reading() == []
