"""Replay feeding: runs one configuration in a worker process and feeds it the window's rows.

The server pins the data set (the highest snapshot id, and book and trade stream ids, at the
start), counts the window, sends the rows to the worker as Arrow record batches through a pipe
while the worker replays the previous one, relays the worker's progress to the ``TrackedRun`` and
its stop requests to the worker. The worker (``worker.py``) reads no database. See
docs/BACKTESTING.md ("The service").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

import pyarrow as pa

from kfeed_server.backtest.engine import BacktestResult, Progress
from kfeed_server.backtest.fees import MarketFees, market_fees
from kfeed_server.backtest.market_events import (
    EventCursor,
    EventPins,
    reads_books,
    reads_trades,
    window_events,
)
from kfeed_server.backtest.quality import UnrecoveredGaps, data_quality, unrecovered
from kfeed_server.backtest.replay_batches import last_exchange_time, to_ipc
from kfeed_server.backtest.tracking import TrackedRun, replaced, with_progress
from kfeed_server.backtest.worker import (
    KILL_GRACE,
    NO_LIMITS,
    EventBatch,
    WorkerJob,
    WorkerKilled,
    WorkerLimits,
    WorkerStarted,
    replay_in_worker,
)
from kfeed_server.db.repositories.books import OrderBookRepository
from kfeed_server.db.repositories.export import ArrowExportReader
from kfeed_server.db.repositories.markets import MarketRepository
from kfeed_server.db.repositories.snapshots import SnapshotRepository
from kfeed_server.db.repositories.trades import FeedGapRepository, TradeRepository
from kfeed_server.records import FeedGapRecord, MarketRecord
from kfeed_server.records.backtest import BacktestRecord, DataQuality, EngineConfig, GapPolicy

log = logging.getLogger(__name__)

# Rows per batch sent to the worker (a read batch is cut to it): the worker reports progress and
# sees a stop request once a batch, and the pipe holds a few of them.
SEND_ROWS = 65_536

# An open window side is read as these bounds.
OPEN_START = datetime(1, 1, 2, tzinfo=UTC)
OPEN_END = datetime(9999, 12, 30, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class FeedSettings:
    """How often progress travels: worker → server every ``progress_every`` snapshots, server →
    database every ``persist_interval`` seconds."""

    progress_every: int
    persist_interval: float


@dataclass(frozen=True, slots=True)
class FeedSources:
    """The repositories a run's data comes from."""

    snapshots: SnapshotRepository
    markets: MarketRepository
    feed_gaps: FeedGapRepository
    books: OrderBookRepository
    trades: TradeRepository
    # The snapshots read as columns.
    columns: ArrowExportReader


class ReplayFeeder:
    """Runs configurations in a pool's workers over the stored rows they need."""

    def __init__(self, sources: FeedSources, settings: FeedSettings) -> None:
        self._snapshots = sources.snapshots
        self._markets = sources.markets
        self._feed_gaps = sources.feed_gaps
        self._sources = sources
        self._settings = settings

    async def check_gaps(self, config: EngineConfig) -> list[FeedGapRecord]:
        """The gaps overlapping the run's markets and window; raises UnrecoveredGaps for a
        GAP_POLICY_REFUSE run when any of them was never recovered."""
        start = config.start_time or OPEN_START
        end = config.end_time or OPEN_END
        gaps = await self._feed_gaps.overlapping(config.tickers, start, end)
        if config.gap_policy is GapPolicy.REFUSE:
            refused = unrecovered(gaps, config.tickers, start, end)
            if refused:
                raise UnrecoveredGaps(refused)
        return gaps

    async def replay(
        self,
        pool: Executor,
        tracked: TrackedRun,
        config: EngineConfig,
        persist_progress: Callable[[BacktestRecord], Awaitable[None]],
        on_change: Callable[[], None] | None,
        limits: WorkerLimits = NO_LIMITS,
    ) -> BacktestResult:
        """Runs ``config`` in a worker, feeding it the window's rows; raises what the run
        raised (BacktestCancelled when stopped). ``persist_progress`` stores the live record at
        most every ``persist_interval``; ``on_change`` is called on every progress report."""
        result = await self._run(pool, tracked, config, (), persist_progress, on_change, limits)
        assert isinstance(result, BacktestResult)
        return result

    async def replay_sweep(
        self,
        pool: Executor,
        tracked: TrackedRun,
        configs: Sequence[EngineConfig],
        persist_progress: Callable[[BacktestRecord], Awaitable[None]],
        limits: WorkerLimits = NO_LIMITS,
    ) -> list[BacktestResult]:
        """Runs every grid point of a sweep in one worker over the window's rows, read once (the
        compiled path; NotCompiled when a point cannot take it). ``tracked`` is the sweep's
        parent: it gets the progress."""
        results = await self._run(
            pool, tracked, configs[0], tuple(configs), persist_progress, None, limits
        )
        assert isinstance(results, list)
        return results

    async def _run(
        self,
        pool: Executor,
        tracked: TrackedRun,
        config: EngineConfig,
        sweep: tuple[EngineConfig, ...],
        persist_progress: Callable[[BacktestRecord], Awaitable[None]],
        on_change: Callable[[], None] | None,
        limits: WorkerLimits,
    ) -> BacktestResult | list[BacktestResult]:
        start = config.start_time or OPEN_START
        end = config.end_time or OPEN_END
        # Pins the data set: ingest may go on, the run reads exactly what it counted, and the
        # books and trades stored by now (market_events.EventPins).
        pinned = await self._snapshots.max_snapshot_id()
        pins = EventPins(
            await self._sources.books.max_stream_id(), await self._sources.trades.max_stream_id()
        )
        total = await self._snapshots.count_for_backtest(
            config.tickers, start, end, max_snapshot_id=pinned
        )
        markets: dict[str, MarketRecord] = {}
        fees: dict[str, MarketFees] = {}
        for ticker in config.tickers:
            market = await self._markets.get_market(ticker)
            if market is not None:
                markets[ticker] = market
                fees[ticker] = await self._market_fees(market)
        tracked.publish(replaced(tracked.record, {"snapshots_total": total}))
        job = WorkerJob(
            config,
            markets,
            total,
            self._settings.progress_every,
            fees=fees,
            limits=limits,
            sweep=sweep,
        )
        data_reader, data_writer = multiprocessing.Pipe(duplex=False)
        control, worker_control = multiprocessing.Pipe()
        loop = asyncio.get_running_loop()
        runaway = _Runaway(limits.time_limit)
        # In a thread: the first submit starts the pool's forkserver, which imports (and warms)
        # the worker's modules; the event loop must not wait for that.
        submitted = await asyncio.to_thread(
            pool.submit, replay_in_worker, job, data_reader, worker_control
        )
        future = asyncio.wrap_future(submitted)

        def on_message() -> None:
            try:
                while control.poll():
                    message = control.recv()
                    if isinstance(message, WorkerStarted):
                        # The worker holds its ends now: without our copies, a dead worker
                        # shows as a broken pipe.
                        data_reader.close()
                        worker_control.close()
                        runaway.started(message.pid, loop.time())
                    elif isinstance(message, Progress):
                        tracked.publish(with_progress(tracked.record, message))
                        if on_change is not None:
                            on_change()
            except (EOFError, OSError):
                loop.remove_reader(control.fileno())

        tracked.control = control
        loop.add_reader(control.fileno(), on_message)
        if tracked.stop_requested.is_set():
            control.send("stop")
        events = self._events(config, fees, start, end, pins)
        feeder = asyncio.create_task(self._feed(data_writer, config, start, end, pinned, events))
        stop_requested = asyncio.ensure_future(tracked.stop_requested.wait())
        watched: set[asyncio.Future[Any]] = {future, feeder, stop_requested}
        try:
            saved = tracked.record
            while not future.done():
                await asyncio.wait(
                    watched,
                    timeout=runaway.wait(self._settings.persist_interval, loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not future.done() and runaway.kill_if_due(loop.time()):
                    # The strategy swallowed the limit (or never returned to Python code): the
                    # worker is gone, its pool broken; the service retires that pool.
                    with contextlib.suppress(Exception):
                        await future
                    raise WorkerKilled(limits.time_limit)
                if stop_requested.done() and not feeder.done():
                    # A worker waiting for rows would not see the stop: ending the data stream
                    # wakes it (and a slow read ends early).
                    feeder.cancel()
                if feeder.done() and not feeder.cancelled() and not future.done():
                    error = feeder.exception()
                    if error is not None:
                        tracked.request_stop(by_user=False)
                        raise error
                if tracked.record is not saved and not future.done():
                    saved = tracked.record
                    await persist_progress(saved)
            return future.result()
        finally:
            tracked.control = None
            stop_requested.cancel()
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(control.fileno())
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            for connection in (control, worker_control, data_reader, data_writer):
                connection.close()

    def _events(
        self,
        config: EngineConfig,
        fees: Mapping[str, MarketFees],
        start: datetime,
        end: datetime,
        pins: EventPins,
    ) -> EventCursor | None:
        """The books and trades the run replays, stored up to ``pins`` (None: it reads
        neither)."""
        books = self._sources.books if reads_books(config) else None
        trades = self._sources.trades if reads_trades(config, fees) else None
        if books is None and trades is None:
            return None
        return EventCursor(window_events(books, trades, config.tickers, start, end, pins))

    async def _market_fees(self, market: MarketRecord) -> MarketFees:
        """The market's fee terms: its series' fee type and multiplier, each replaced by its
        event's override when the event has one."""
        series = (
            await self._markets.get_series(market.series_ticker) if market.series_ticker else None
        )
        event = await self._markets.get_event(market.event_ticker) if market.event_ticker else None
        if event is None:
            return market_fees(series)
        return market_fees(
            series, event.fee_type_override, event.fee_multiplier_override_ten_thousandths
        )

    async def _feed(
        self,
        writer: Connection,
        config: EngineConfig,
        start: datetime,
        end: datetime,
        pinned: int,
        events: EventCursor | None,
    ) -> None:
        """Sends the window's rows to the worker as replay batches of at most ``SEND_ROWS`` rows
        (``events`` ahead of the rows they precede), then None, and closes the pipe (also when
        cancelled: the worker then sees the end of the data at once). The rows are read as
        columns (COPY binary into Arrow on PostgreSQL, off the event loop) and cross the pipe as
        Arrow IPC: no Python object per row on either side. Sending waits in a thread while the
        pipe is full, which bounds memory to a few batches and one read batch."""
        try:
            batches = self._sources.columns.snapshots_for_backtest(
                config.tickers, start, end, max_snapshot_id=pinned
            )
            async for batch in batches:
                for first in range(0, batch.num_rows, SEND_ROWS):
                    await _send_batch(writer, batch.slice(first, SEND_ROWS), events)
            if events is not None and (rest := await events.until(None)):
                await _send(writer, EventBatch(rest))
            await _send(writer, None)
        except (BrokenPipeError, ConnectionResetError, OSError) as error:
            # The worker stopped reading (cancelled or failed): its future says why.
            log.debug("backtest feed ended early: %r", error)
        finally:
            writer.close()


class _Runaway:
    """The time limit enforced from outside: a worker still running ``KILL_GRACE`` seconds past
    its limit (counted from its start) is killed with SIGKILL, which no strategy can catch."""

    def __init__(self, limit: float) -> None:
        self._limit = limit
        self._pid: int | None = None
        self._deadline = math.inf

    def started(self, pid: int, now: float) -> None:
        if self._limit > 0:
            self._pid, self._deadline = pid, now + self._limit + KILL_GRACE

    def wait(self, interval: float, now: float) -> float:
        """How long to wait for the run before looking again."""
        return max(0.0, min(interval, self._deadline - now))

    def kill_if_due(self, now: float) -> bool:
        """Kills the worker when its deadline has passed; whether it did."""
        if self._pid is None or now < self._deadline:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGKILL)
        log.warning("killed backtest worker %d: past its time limit", self._pid)
        return True


def run_data_quality(
    config: EngineConfig, gaps: Sequence[FeedGapRecord], result: BacktestResult
) -> DataQuality:
    """The gap report of a finished run: over its window, an open side bounded by what it
    replayed."""
    start = config.start_time or result.replayed_from
    end = config.end_time or result.replayed_to
    if start is None or end is None:
        start = end = config.start_time or config.end_time or OPEN_START
    return data_quality(gaps, config.tickers, start, end)


async def _send_batch(
    writer: Connection, batch: pa.RecordBatch, events: EventCursor | None
) -> None:
    """Sends the books and trades up to the batch's last time, then the batch."""
    if events is not None and (earlier := await events.until(last_exchange_time(batch))):
        await _send(writer, EventBatch(earlier))
    await _send(writer, batch)


def _write(writer: Connection, message: pa.RecordBatch | EventBatch | None) -> None:
    if isinstance(message, pa.RecordBatch):
        writer.send_bytes(to_ipc(message))
    else:
        writer.send(message)


async def _send(writer: Connection, message: pa.RecordBatch | EventBatch | None) -> None:
    """Sends in a thread (a full pipe blocks; a batch is serialised there too). When the caller
    is cancelled the send still completes or fails before this returns, so the pipe is never
    closed under a running send."""
    sending = asyncio.ensure_future(asyncio.to_thread(_write, writer, message))
    try:
        await asyncio.shield(sending)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await sending
        raise
