"""What a backtest worker process runs, and the messages it exchanges with the server process.

The worker reads no database. It gets two pipe ends with the job:

* ``data`` (server → worker): replay batches (``replay_batches``: the snapshot columns, each an
  Arrow IPC stream sent with ``send_bytes``) in replay order, then ``None``; before a batch, an
  ``EventBatch`` of the books and trades up to its last row's time (``market_events``: runs that
  read them), which the worker puts before the first row at or after each event's time. The
  objects are pickled (``send``); the worker tells them from Arrow by the IPC marker. The socket
  buffer bounds what is in flight, so memory stays bounded whatever the window's size: the server
  reads and sends the next batch while the worker fingerprints and replays this one.
* ``control`` (both ways): the worker sends ``WorkerStarted`` once, then a ``Progress`` every
  ``progress_every`` snapshots; any message from the server means "stop" (checked at each
  progress report, and every ``STOP_CHECK_EVERY`` snapshots once ``STOP_CHECK_SECONDS`` have
  passed, so a cancel lands promptly even under a slow strategy).

The result (or the exception: BacktestCancelled, StrategyError, ...) returns through the pool's
future.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from kfeed_server.backtest.books import ReplayedEvent, event_time
from kfeed_server.backtest.config import fast_path_applies
from kfeed_server.backtest.engine import (
    DEFAULT_MAX_EQUITY_POINTS,
    DEFAULT_PROGRESS_EVERY,
    BacktestCancelled,
    BacktestResult,
    MarketEvent,
    Progress,
    run_backtest,
)
from kfeed_server.backtest.fees import MarketFees
from kfeed_server.backtest.fingerprint import Fingerprinter
from kfeed_server.backtest.loading import load_strategy_modules
from kfeed_server.backtest.replay_batches import IPC_MARKER, from_ipc, records_from_batch
from kfeed_server.records import MarketRecord, TradeRecord
from kfeed_server.records.backtest import EngineConfig

if TYPE_CHECKING:
    import pyarrow as pa

    from kfeed_server.backtest.fast import ColumnCollector


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    """What a worker loads and allows: the user strategy modules to import before the run, and
    the run's wall-clock time limit in seconds (0: none)."""

    strategy_modules: tuple[str, ...] = ()
    time_limit: float = 0.0


NO_LIMITS = WorkerLimits()


class TimeLimitExceeded(TimeoutError):
    """The run took longer than its time limit (a strategy that runs away)."""

    def __init__(self, limit: float) -> None:
        super().__init__(limit)
        self.limit = limit

    def __str__(self) -> str:
        return f"the run exceeded its time limit of {self.limit:g} s (does the strategy loop?)"


class WorkerKilled(TimeLimitExceeded):
    """The run outlived its time limit by ``KILL_GRACE`` (its strategy swallowed the limit's
    exception, or never returned to Python code): the server killed the worker process."""

    def __str__(self) -> str:
        return f"{super().__str__()}; the worker did not stop and was killed"


KILL_GRACE = 2.0
"""Seconds past its time limit after which the server kills a run's worker from outside."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raises TimeLimitExceeded in this (the worker's main) thread after ``seconds``."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeLimitExceeded(seconds)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True, slots=True)
class WorkerJob:
    """One run's inputs apart from the rows, which stream through the data pipe."""

    config: EngineConfig
    markets: Mapping[str, MarketRecord]
    snapshots_total: int
    progress_every: int = DEFAULT_PROGRESS_EVERY
    max_equity_points: int = DEFAULT_MAX_EQUITY_POINTS
    # Each market's fee terms (series fee type and multiplier).
    fees: Mapping[str, MarketFees] = field(default_factory=dict)
    limits: WorkerLimits = NO_LIMITS
    # A sweep's grid points (same tickers and window as ``config``): run them all over the rows,
    # read once, and return a list of results.
    sweep: tuple[EngineConfig, ...] = ()


class NotCompiled(Exception):
    """A sweep point cannot take the compiled path: run the points one by one instead."""


@dataclass(frozen=True, slots=True)
class WorkerStarted:
    """The worker holds its pipe ends: the server may close its copies of them, so that a dead
    worker shows as a broken pipe. ``pid`` is the worker process's, for the time limit's kill."""

    pid: int


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Books and trades in time order, all at or before the next batch's last row."""

    events: Sequence[ReplayedEvent]


def _messages(data: Connection) -> Iterator[pa.RecordBatch | EventBatch]:
    """What arrives on the data pipe until its ``None``: replay batches and event batches."""
    while True:
        message = data.recv_bytes()
        if message[:4] == IPC_MARKER:
            yield from_ipc(message)
            continue
        received = pickle.loads(message)
        if received is None:
            return
        if not isinstance(received, EventBatch):
            raise TypeError(f"unexpected message on the data pipe: {type(received).__name__}")
        yield received


def _received_rows(data: Connection, fingerprinter: Fingerprinter) -> Iterator[MarketEvent]:
    """The rows of the batches arriving, with the events of the event batches put before the
    first row at or after their time (the rest at the end)."""
    waiting: deque[ReplayedEvent] = deque()
    for message in _messages(data):
        if isinstance(message, EventBatch):
            waiting.extend(message.events)
            continue
        fingerprinter.add_batch(message)
        rows = records_from_batch(message)
        if not waiting:
            yield from rows
            continue
        for row in rows:
            while waiting and event_time(waiting[0]) <= row.exchange_time:
                yield waiting.popleft()
            yield row
    yield from waiting


def _collect(
    job: WorkerJob,
    data: Connection,
    fingerprinter: Fingerprinter,
    report: Callable[[Progress], None],
    should_stop: Callable[[], bool],
) -> tuple[ColumnCollector, list[TradeRecord]]:
    """The batches' columns, collected as they arrive (progress and stops checked meanwhile),
    and the trades of the event batches (runs that read them), in time order."""
    # Imported here: the server process imports this module but never runs the compiled path
    # (numba stays out of it); the forkserver has it loaded already (warm_up).
    from kfeed_server.backtest.fast import ColumnCollector

    collector = ColumnCollector(job.config.tickers)
    trades: list[TradeRecord] = []
    next_report = job.progress_every
    for batch in _messages(data):
        if isinstance(batch, EventBatch):
            # Only trades: a compiled run reads no books (TOUCH, no ``on_book``).
            trades += (e for e in batch.events if isinstance(e, TradeRecord))
            continue
        fingerprinter.add_batch(batch)
        collector.add(batch)
        if len(collector) >= next_report:
            while next_report <= len(collector):
                next_report += job.progress_every
            total = job.snapshots_total
            # Reading is most of the work; the replay itself is the last moment.
            fraction = min(len(collector) / total, 1.0) * 0.9 if total else 0.0
            report(Progress(len(collector), total, fraction, 0))
            if should_stop():
                raise BacktestCancelled(0)
    return collector, trades


def _sweep_compiled(
    job: WorkerJob,
    data: Connection,
    fingerprinter: Fingerprinter,
    report: Callable[[Progress], None],
    should_stop: Callable[[], bool],
) -> list[BacktestResult]:
    """Every grid point over the same columns: read once, the kernel once per point."""
    from kfeed_server.backtest.fast import sweep_fast

    collector, trades = _collect(job, data, fingerprinter, report, should_stop)
    columns = collector.columns()
    results = sweep_fast(
        job.sweep,
        job.markets,
        columns,
        [fingerprinter.copy() for _ in job.sweep],
        fees=job.fees,
        max_equity_points=job.max_equity_points,
        trades=trades,
    )
    done = [r for r in results if r is not None]
    assert len(done) == len(results)  # fast_path_applies said so
    processed = len(columns)
    report(Progress(processed, processed, 1.0, max(r.metrics.total_pnl for r in done)))
    return done


def _replay_compiled(
    job: WorkerJob,
    data: Connection,
    fingerprinter: Fingerprinter,
    report: Callable[[Progress], None],
    should_stop: Callable[[], bool],
) -> BacktestResult:
    """The compiled path: the batches' columns are collected, then the kernel replays them."""
    from kfeed_server.backtest.fast import run_fast

    collector, trades = _collect(job, data, fingerprinter, report, should_stop)
    result = run_fast(
        job.config,
        job.markets,
        collector.columns(),
        fingerprinter,
        fees=job.fees,
        max_equity_points=job.max_equity_points,
        trades=trades,
    )
    assert result is not None  # fast_path_applies said so
    processed = result.fingerprint.row_count
    report(Progress(processed, processed, 1.0, result.metrics.total_pnl))
    return result


def replay_in_worker(
    job: WorkerJob, data: Connection, control: Connection
) -> BacktestResult | list[BacktestResult]:
    """Runs ``job`` over the rows arriving on ``data``; see the module docstring."""
    try:
        control.send(WorkerStarted(os.getpid()))
        # Cached after the first run in this process.
        load_strategy_modules(job.limits.strategy_modules)
        fingerprinter = Fingerprinter()

        def report(progress: Progress) -> None:
            control.send(progress)

        with _time_limit(job.limits.time_limit):
            if job.sweep:
                if not all(fast_path_applies(c, job.fees) for c in job.sweep):
                    raise NotCompiled
                return _sweep_compiled(job, data, fingerprinter, report, control.poll)
            if fast_path_applies(job.config, job.fees):
                return _replay_compiled(job, data, fingerprinter, report, control.poll)
            return run_backtest(
                job.config,
                job.markets,
                _received_rows(data, fingerprinter),
                fees=job.fees,
                total=job.snapshots_total,
                progress=report,
                should_stop=control.poll,
                progress_every=job.progress_every,
                max_equity_points=job.max_equity_points,
                fingerprinter=fingerprinter,
            )
    finally:
        data.close()
        control.close()
