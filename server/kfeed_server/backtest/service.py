"""The backtest service's domain layer: runs backtests in a process pool and tracks their state.

``BacktestRunner`` owns the pool, the state machine (PENDING → RUNNING → SUCCEEDED | FAILED |
CANCELLED), progress fan-out to watchers, cancellation and sweeps. It speaks records and engine
types (no gRPC) and stores through the repositories (no SQL). See docs/BACKTESTING.md
("The service").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from typing import Any

from kfeed_server import __version__
from kfeed_server.backtest.chunks import EncodedChunk, encode_chunk
from kfeed_server.backtest.config import EngineConfig, validate_config
from kfeed_server.backtest.engine import (
    DEFAULT_PROGRESS_EVERY,
    FINGERPRINT_CHUNK,
    BacktestCancelled,
    BacktestResult,
    Progress,
)
from kfeed_server.backtest.fees import FeeRounding
from kfeed_server.backtest.metrics import BacktestMetrics
from kfeed_server.backtest.params import ConfigError, ParamValue
from kfeed_server.backtest.sweep import rank, sweep_grid
from kfeed_server.backtest.worker import WorkerJob, WorkerStarted, replay_in_worker
from kfeed_server.db.repositories import BacktestRecord, Repositories
from kfeed_server.records import (
    BacktestState,
    EquityPointRecord,
    ExecutionRecord,
    Page,
    SnapshotRecord,
)

log = logging.getLogger(__name__)

DEFAULT_RANK_BY = "total_pnl"
"""What a sweep ranks by when the request names no metric."""
SHUTDOWN_MESSAGE = "the server shut down before the backtest finished"
RESTART_MESSAGE = "the server stopped before the backtest finished"
# An open window side is read as these bounds.
_OPEN_START = datetime(1, 1, 2, tzinfo=UTC)
_OPEN_END = datetime(9999, 12, 30, tzinfo=UTC)
_PROGRESS_FIELDS = ("fraction_done", "snapshots_processed", "snapshots_total", "interim_pnl")


def _default_workers() -> int:
    # One core stays with the event loop; more than two workers rarely pays on a shared server.
    return min(2, max(1, (os.cpu_count() or 2) - 1))


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    """How the runner runs backtests."""

    # Worker processes, and so backtests running at once (the others wait PENDING).
    workers: int = field(default_factory=_default_workers)
    # Snapshots between progress reports (and cancellation checks) in a worker.
    progress_every: int = DEFAULT_PROGRESS_EVERY
    # Seconds between progress writes to the database (watchers get every report).
    persist_interval: float = 1.0
    # Largest sweep grid accepted.
    max_sweep_points: int = 256
    # "forkserver": workers fork from a small pre-imported server, which is safe with the event
    # loop's threads and cheap after the first start.
    start_method: str = "forkserver"


@dataclass(frozen=True, slots=True)
class SweepSpec:
    """A parameter grid (one child run per point) and the metric ranking the children."""

    grid: Mapping[str, Sequence[ParamValue]]
    rank_by: str = DEFAULT_RANK_BY


class UnknownMarkets(Exception):
    """Some of a backtest's tickers are not known markets."""

    def __init__(self, tickers: Sequence[str]) -> None:
        super().__init__(", ".join(tickers))
        self.tickers = tuple(tickers)


# --- documents: how configurations, sweeps and metrics are stored (JSON) -------------------------


def config_document(config: EngineConfig) -> dict[str, Any]:
    """``config`` as the JSON document stored with a backtest."""
    return {
        "strategy": config.strategy,
        "tickers": list(config.tickers),
        "parameters": dict(config.parameters),
        "start_time": None if config.start_time is None else config.start_time.isoformat(),
        "end_time": None if config.end_time is None else config.end_time.isoformat(),
        "initial_cash": config.initial_cash,
        "taker_fee_rate_ten_thousandths": config.taker_fee_rate_ten_thousandths,
        "fee_rounding": int(config.fee_rounding),
        "slippage": config.slippage,
        "max_position": config.max_position,
        "cap_by_displayed_size": config.cap_by_displayed_size,
    }


def config_from_document(document: Mapping[str, Any]) -> EngineConfig:
    """The configuration ``config_document`` stored."""

    def moment(name: str) -> datetime | None:
        value = document.get(name)
        return None if value is None else datetime.fromisoformat(value)

    return EngineConfig(
        strategy=document["strategy"],
        tickers=tuple(document["tickers"]),
        parameters=dict(document["parameters"]),
        start_time=moment("start_time"),
        end_time=moment("end_time"),
        initial_cash=document["initial_cash"],
        taker_fee_rate_ten_thousandths=document["taker_fee_rate_ten_thousandths"],
        fee_rounding=FeeRounding(document["fee_rounding"]),
        slippage=document["slippage"],
        max_position=document["max_position"],
        cap_by_displayed_size=document["cap_by_displayed_size"],
    )


def sweep_document(sweep: SweepSpec) -> dict[str, Any]:
    """``sweep`` as the JSON document stored with a sweep's parent."""
    return {
        "grid": {name: list(values) for name, values in sweep.grid.items()},
        "rank_by": sweep.rank_by,
    }


def sweep_from_document(document: Mapping[str, Any]) -> SweepSpec:
    """The sweep ``sweep_document`` stored."""
    return SweepSpec(grid=dict(document["grid"]), rank_by=document["rank_by"])


def metrics_document(metrics: BacktestMetrics) -> dict[str, Any]:
    """``metrics`` as JSON: the drawdown duration in microseconds, everything else as is."""
    document = {f.name: getattr(metrics, f.name) for f in fields(BacktestMetrics)}
    document["max_drawdown_duration"] = metrics.max_drawdown_duration // timedelta(microseconds=1)
    return document


def metrics_from_document(document: Mapping[str, Any]) -> BacktestMetrics:
    """The metrics ``metrics_document`` stored."""
    values = dict(document)
    values["max_drawdown_duration"] = timedelta(microseconds=values["max_drawdown_duration"])
    return BacktestMetrics(**values)


def _now() -> datetime:
    return datetime.now(UTC)


def _new_backtest_id() -> str:
    return uuid.uuid4().hex


# --- tracking ----------------------------------------------------------------------------------


class _Tracked:
    """A backtest this server is running: its latest record (fresher than the database's, which
    gets progress every ``persist_interval``), a broadcast of changes, and how to stop it."""

    def __init__(self, record: BacktestRecord, children: Sequence[_Tracked] = ()) -> None:
        self.record = record
        self.children = tuple(children)
        self.stop_reason: str | None = None  # None, or the message a FAILED stop carries
        self.stop_requested = asyncio.Event()
        self.user_cancelled = False
        self.control: Connection | None = None  # the worker's control pipe while it runs
        self._changed = asyncio.Event()

    def publish(self, record: BacktestRecord) -> None:
        """Makes ``record`` current and wakes every watcher."""
        self.record = record
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self, seen: BacktestRecord) -> None:
        """Returns once the current record is not ``seen``."""
        changed = self._changed
        if self.record is seen:
            await changed.wait()

    def request_stop(self, *, by_user: bool) -> None:
        """Asks the run (and a sweep's children) to stop: CANCELLED when a user asked, else
        FAILED with ``SHUTDOWN_MESSAGE``."""
        if not self.stop_requested.is_set():
            self.user_cancelled = by_user
            self.stop_reason = None if by_user else SHUTDOWN_MESSAGE
            self.stop_requested.set()
            if self.control is not None:
                with contextlib.suppress(OSError):
                    self.control.send("stop")
        for child in self.children:
            child.request_stop(by_user=by_user)


class BacktestRunner:
    """Creates, runs, tracks and stops backtests; see the module docstring.

    Call ``recover`` once at start (backtests a previous process left unfinished become FAILED)
    and ``close`` at shutdown (running ones stop and become FAILED, the pool shuts down). The
    worker pool starts with the first run.
    """

    def __init__(
        self,
        repositories: Repositories,
        config: RunnerConfig | None = None,
        code_version: str = __version__,
    ) -> None:
        self._backtests = repositories.backtests
        self._snapshots = repositories.snapshots
        self._markets = repositories.markets
        self._config = config or RunnerConfig()
        self._code_version = code_version
        self._executor: ProcessPoolExecutor | None = None
        self._slots = asyncio.Semaphore(self._config.workers)
        self._tracked: dict[str, _Tracked] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle -------------------------------------------------------------------------------

    async def recover(self) -> int:
        """Marks backtests left PENDING or RUNNING by a previous process FAILED; returns how
        many. (One server runs backtests per database: replicas would need leases.)"""
        recovered = 0
        for state in (BacktestState.PENDING, BacktestState.RUNNING):
            while page := (await self._backtests.list(limit=500, state=state)).items:
                for record in page:
                    await self._backtests.update(
                        record.backtest_id,
                        state=BacktestState.FAILED,
                        error_message=RESTART_MESSAGE,
                        run_end_time=_now(),
                    )
                recovered += len(page)
        if recovered:
            log.warning("marked %d unfinished backtests FAILED", recovered)
        return recovered

    async def close(self, grace: float = 10.0) -> None:
        """Stops every running backtest (FAILED, ``SHUTDOWN_MESSAGE``), waits for them to be
        stored, and shuts the pool down."""
        for tracked in list(self._tracked.values()):
            tracked.request_stop(by_user=False)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace)
        self._shutdown_pool()

    def _shutdown_pool(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            context = multiprocessing.get_context(self._config.start_method)
            if self._config.start_method == "forkserver":
                context.set_forkserver_preload(["kfeed_server.backtest.worker"])
            self._executor = ProcessPoolExecutor(self._config.workers, mp_context=context)
        return self._executor

    # --- requests ------------------------------------------------------------------------------

    async def create(self, config: EngineConfig, sweep: SweepSpec | None = None) -> BacktestRecord:
        """Validates and stores a backtest (a sweep: its parent and one child per grid point)
        PENDING, starts it, and returns the stored record at once.

        Raises ConfigError (fields as in the proto: ``strategy``, ``parameters.<name>``,
        ``sweep.grid.<name>``, ``sweep.rank_by``, ...) and UnknownMarkets."""
        config = validate_config(config)
        point_configs = None if sweep is None else self._sweep_points(config, sweep)
        known = await self._markets.existing_tickers(config.tickers)
        unknown = [ticker for ticker in config.tickers if ticker not in known]
        if unknown:
            raise UnknownMarkets(unknown)
        now = _now()
        parent = BacktestRecord(
            backtest_id=_new_backtest_id(),
            strategy=config.strategy,
            config=config_document(config),
            sweep=None if sweep is None else sweep_document(sweep),
            code_version=self._code_version,
            create_time=now,
        )
        await self._backtests.create(parent)
        if point_configs is None:
            tracked = self._track(parent)
            self._spawn(self._run_single(tracked, config, on_change=None))
            return parent
        assert sweep is not None
        children = []
        for index, point_config in enumerate(point_configs):
            child = BacktestRecord(
                backtest_id=_new_backtest_id(),
                parent_backtest_id=parent.backtest_id,
                strategy=point_config.strategy,
                config=config_document(point_config),
                code_version=self._code_version,
                # Strictly after the parent, in grid order, so listings are stable.
                create_time=now + timedelta(microseconds=index + 1),
            )
            await self._backtests.create(child)
            children.append(self._track(child))
        tracked_parent = self._track(parent, children)
        self._spawn(self._run_sweep(tracked_parent, point_configs, sweep.rank_by))
        return parent

    def _sweep_points(self, config: EngineConfig, sweep: SweepSpec) -> list[EngineConfig]:
        if not sweep.grid:
            raise ConfigError("sweep.grid", "needs at least one parameter")
        rank([], sweep.rank_by)  # ConfigError on sweep.rank_by for an unknown metric
        points = math.prod(len(values) for values in sweep.grid.values())
        if points > self._config.max_sweep_points:
            raise ConfigError(
                "sweep.grid", f"{points} points; at most {self._config.max_sweep_points}"
            )
        return sweep_grid(config, sweep.grid)

    async def get(self, backtest_id: str) -> BacktestRecord | None:
        """The backtest (live progress while it runs), or None."""
        tracked = self._tracked.get(backtest_id)
        return tracked.record if tracked is not None else await self._backtests.get(backtest_id)

    async def equity_curve(self, backtest_id: str) -> list[EquityPointRecord]:
        """The stored equity curve (empty until SUCCEEDED)."""
        return await self._backtests.equity_curve(backtest_id)

    async def list(
        self,
        *,
        limit: int,
        after: tuple[datetime, str] | None = None,
        strategy: str | None = None,
        state: BacktestState | None = None,
        parent_backtest_id: str | None = None,
    ) -> Page[BacktestRecord]:
        """Backtests newest first (see ``BacktestRepository.list``), live progress for the ones
        running here."""
        page = await self._backtests.list(
            limit=limit,
            after=after,
            strategy=strategy,
            state=state,
            parent_backtest_id=parent_backtest_id,
        )
        items = [
            tracked.record if (tracked := self._tracked.get(r.backtest_id)) is not None else r
            for r in page.items
        ]
        return Page(items, page.next_cursor)

    async def list_executions(
        self, backtest_id: str, *, limit: int, after_sequence: int = -1
    ) -> Page[ExecutionRecord] | None:
        """A page of the backtest's executions, or None when the backtest does not exist."""
        if await self.get(backtest_id) is None:
            return None
        return await self._backtests.list_executions(
            backtest_id, limit=limit, after_sequence=after_sequence
        )

    async def watch(
        self, backtest_id: str, min_interval: float
    ) -> AsyncGenerator[BacktestRecord, None] | None:
        """The backtest now, then on each change at most every ``min_interval`` seconds (the
        latest state wins), ending with its terminal state; None when it does not exist."""
        record = await self.get(backtest_id)
        if record is None:
            return None
        return self._changes(backtest_id, record, min_interval)

    async def _changes(
        self, backtest_id: str, record: BacktestRecord, min_interval: float
    ) -> AsyncGenerator[BacktestRecord, None]:
        loop = asyncio.get_running_loop()
        yield record
        last_sent = loop.time()
        while not record.state.is_terminal:
            tracked = self._tracked.get(backtest_id)
            if tracked is None:
                # Finished between two looks, or run by another process: poll the database.
                await asyncio.sleep(min_interval)
                latest = await self._backtests.get(backtest_id)
                if latest is None:
                    return
            else:
                await tracked.wait_changed(record)
                if not tracked.record.state.is_terminal:
                    await asyncio.sleep(max(0.0, last_sent + min_interval - loop.time()))
                latest = tracked.record
            if latest is not record:
                record = latest
                yield record
                last_sent = loop.time()

    async def cancel(self, backtest_id: str, wait: float = 10.0) -> BacktestRecord | None:
        """Stops a pending or running backtest (a sweep: all its children) and returns it once
        CANCELLED (or as it is after ``wait`` seconds); a finished one is returned unchanged.
        None when it does not exist."""
        tracked = self._tracked.get(backtest_id)
        if tracked is None:
            return await self._backtests.get(backtest_id)
        tracked.request_stop(by_user=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while not tracked.record.state.is_terminal:
                    await tracked.wait_changed(tracked.record)
        return tracked.record

    # --- running -------------------------------------------------------------------------------

    def _track(self, record: BacktestRecord, children: Sequence[_Tracked] = ()) -> _Tracked:
        tracked = _Tracked(record, children)
        self._tracked[record.backtest_id] = tracked
        return tracked

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _update(
        self, tracked: _Tracked, on_change: Callable[[], None] | None, **values: Any
    ) -> None:
        """Stores ``values`` with the live progress and publishes the result."""
        current = tracked.record
        values = {name: getattr(current, name) for name in _PROGRESS_FIELDS} | values
        stored = await self._backtests.update(current.backtest_id, **values)
        tracked.publish(stored if stored is not None else _replaced(current, values))
        if on_change is not None:
            on_change()

    async def _finish(
        self, tracked: _Tracked, on_change: Callable[[], None] | None, **values: Any
    ) -> None:
        """Stores a terminal state and stops tracking the backtest."""
        try:
            await self._update(tracked, on_change, run_end_time=_now(), **values)
        finally:
            self._tracked.pop(tracked.record.backtest_id, None)

    async def _finish_stopped(
        self, tracked: _Tracked, on_change: Callable[[], None] | None
    ) -> None:
        if tracked.stop_reason is None:
            await self._finish(tracked, on_change, state=BacktestState.CANCELLED)
        else:
            await self._finish(
                tracked, on_change, state=BacktestState.FAILED, error_message=tracked.stop_reason
            )

    async def _acquire_slot(self, tracked: _Tracked) -> bool:
        """Waits for a free worker; False (and no slot held) when a stop came first."""
        acquire = asyncio.ensure_future(self._slots.acquire())
        stopped = asyncio.ensure_future(tracked.stop_requested.wait())
        await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not acquire.done():
            acquire.cancel()
        try:
            await acquire
        except asyncio.CancelledError:
            return False
        if tracked.stop_requested.is_set():
            self._slots.release()
            return False
        return True

    async def _run_single(
        self, tracked: _Tracked, config: EngineConfig, on_change: Callable[[], None] | None
    ) -> None:
        try:
            if not await self._acquire_slot(tracked):
                await self._finish_stopped(tracked, on_change)
                return
            try:
                await self._update(
                    tracked, on_change, state=BacktestState.RUNNING, run_start_time=_now()
                )
                result = await self._replay(tracked, config, on_change)
            finally:
                self._slots.release()
            await self._store_result(tracked, result, on_change)
        except BacktestCancelled:
            await self._finish_stopped(tracked, on_change)
        except Exception as error:
            if tracked.stop_requested.is_set():
                # Stopping may surface as a broken pipe or an early end of data in the worker.
                await self._finish_stopped(tracked, on_change)
                return
            if isinstance(error, BrokenProcessPool):
                self._shutdown_pool()  # the next run starts a fresh pool
            log.exception("backtest %s failed", tracked.record.backtest_id)
            await self._finish(
                tracked,
                on_change,
                state=BacktestState.FAILED,
                error_message=f"{type(error).__name__}: {error}",
            )

    async def _store_result(
        self, tracked: _Tracked, result: BacktestResult, on_change: Callable[[], None] | None
    ) -> None:
        # Executions and the curve first: whoever sees SUCCEEDED can read them at once.
        backtest_id = tracked.record.backtest_id
        await self._backtests.add_executions(backtest_id, result.executions)
        await self._backtests.add_equity_points(backtest_id, result.equity_curve)
        fingerprint = result.fingerprint
        await self._finish(
            tracked,
            on_change,
            state=BacktestState.SUCCEEDED,
            metrics=metrics_document(result.metrics),
            row_count=fingerprint.row_count,
            first_snapshot_id=fingerprint.first_snapshot_id,
            last_snapshot_id=fingerprint.last_snapshot_id,
            content_hash=fingerprint.content_hash,
            fraction_done=1.0,
            snapshots_processed=fingerprint.row_count,
        )

    async def _replay(
        self, tracked: _Tracked, config: EngineConfig, on_change: Callable[[], None] | None
    ) -> BacktestResult:
        """Runs ``config`` in a worker, feeding it the window's rows; raises what the run
        raised (BacktestCancelled when stopped)."""
        start = config.start_time or _OPEN_START
        end = config.end_time or _OPEN_END
        # Pins the data set: ingest may go on, the run reads exactly what it counted.
        pinned = await self._snapshots.max_snapshot_id()
        total = await self._snapshots.count_for_backtest(
            config.tickers, start, end, max_snapshot_id=pinned
        )
        markets = {}
        for ticker in config.tickers:
            market = await self._markets.get_market(ticker)
            if market is not None:
                markets[ticker] = market
        tracked.publish(_replaced(tracked.record, {"snapshots_total": total}))
        job = WorkerJob(config, markets, total, self._config.progress_every)
        data_reader, data_writer = multiprocessing.Pipe(duplex=False)
        control, worker_control = multiprocessing.Pipe()
        loop = asyncio.get_running_loop()
        future = asyncio.wrap_future(
            self._pool().submit(replay_in_worker, job, data_reader, worker_control)
        )

        def on_message() -> None:
            try:
                while control.poll():
                    message = control.recv()
                    if isinstance(message, WorkerStarted):
                        # The worker holds its ends now: without our copies, a dead worker
                        # shows as a broken pipe.
                        data_reader.close()
                        worker_control.close()
                    elif isinstance(message, Progress):
                        tracked.publish(_with_progress(tracked.record, message))
                        if on_change is not None:
                            on_change()
            except (EOFError, OSError):
                loop.remove_reader(control.fileno())

        tracked.control = control
        loop.add_reader(control.fileno(), on_message)
        if tracked.stop_requested.is_set():
            control.send("stop")
        feeder = asyncio.create_task(self._feed(data_writer, config, start, end, pinned))
        stop_requested = asyncio.ensure_future(tracked.stop_requested.wait())
        watched: set[asyncio.Future[Any]] = {future, feeder, stop_requested}
        try:
            saved = tracked.record
            while not future.done():
                await asyncio.wait(
                    watched,
                    timeout=self._config.persist_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
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
                    await self._backtests.update(
                        saved.backtest_id, **{n: getattr(saved, n) for n in _PROGRESS_FIELDS}
                    )
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

    async def _feed(
        self,
        writer: Connection,
        config: EngineConfig,
        start: datetime,
        end: datetime,
        pinned: int,
    ) -> None:
        """Sends the window's rows to the worker in encoded chunks of ``FINGERPRINT_CHUNK`` rows
        (the fingerprint's chunking), then None, and closes the pipe (also when cancelled: the
        worker then sees the end of the data at once). Sending waits in a thread while the pipe
        is full, which bounds memory to a few chunks; reads are one chunk each, so the event loop
        never converts more than 4,096 rows at a time."""
        pending: list[SnapshotRecord] = []
        try:
            async for rows in self._snapshots.list_for_backtest(
                config.tickers, start, end, chunk_size=FINGERPRINT_CHUNK, max_snapshot_id=pinned
            ):
                pending.extend(rows)
                while len(pending) >= FINGERPRINT_CHUNK:
                    chunk = encode_chunk(pending[:FINGERPRINT_CHUNK])
                    del pending[:FINGERPRINT_CHUNK]
                    await _send(writer, chunk)
            if pending:
                await _send(writer, encode_chunk(pending))
            await _send(writer, None)
        except (BrokenPipeError, ConnectionResetError, OSError) as error:
            # The worker stopped reading (cancelled or failed): its future says why.
            log.debug("backtest feed ended early: %r", error)
        finally:
            writer.close()

    async def _run_sweep(
        self, parent: _Tracked, configs: Sequence[EngineConfig], rank_by: str
    ) -> None:
        children = parent.children

        def refresh() -> None:
            parent.publish(_sweep_progress(parent.record, [c.record for c in children]))

        try:
            await asyncio.gather(
                *(
                    self._run_single(child, config, on_change=refresh)
                    for child, config in zip(children, configs, strict=True)
                )
            )
            records = [c.record for c in children]
            succeeded = [r for r in records if r.state is BacktestState.SUCCEEDED]
            failed = [r for r in records if r.state is BacktestState.FAILED]
            if parent.stop_requested.is_set():
                await self._finish_stopped(parent, None)
            elif failed:
                await self._finish(
                    parent,
                    None,
                    state=BacktestState.FAILED,
                    error_message=(
                        f"{len(failed)} of {len(records)} runs failed; first "
                        f"{failed[0].backtest_id}: {failed[0].error_message}"
                    ),
                )
            elif not succeeded:
                await self._finish(parent, None, state=BacktestState.CANCELLED)
            else:
                await self._finish(parent, None, **_sweep_outcome(succeeded, rank_by))
        except Exception as error:
            log.exception("sweep %s failed", parent.record.backtest_id)
            await self._finish(parent, None, state=BacktestState.FAILED, error_message=f"{error!r}")


async def _send(writer: Connection, message: EncodedChunk | None) -> None:
    """Sends in a thread (a full pipe blocks). When the caller is cancelled the send still
    completes or fails before this returns, so the pipe is never closed under a running send."""
    sending = asyncio.ensure_future(asyncio.to_thread(writer.send, message))
    try:
        await asyncio.shield(sending)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await sending
        raise


def _replaced(record: BacktestRecord, values: Mapping[str, Any]) -> BacktestRecord:
    return replace(record, **values)


def _with_progress(record: BacktestRecord, progress: Progress) -> BacktestRecord:
    return _replaced(
        record,
        {
            "fraction_done": progress.fraction_done,
            "snapshots_processed": progress.snapshots_processed,
            "snapshots_total": progress.snapshots_total or record.snapshots_total,
            "interim_pnl": progress.interim_pnl,
        },
    )


def _sweep_progress(parent: BacktestRecord, children: Sequence[BacktestRecord]) -> BacktestRecord:
    """A sweep's live progress: the mean fraction done, summed snapshot counts, the best interim
    PnL; RUNNING once any child left PENDING."""
    started = [c for c in children if c.state is not BacktestState.PENDING]
    values: dict[str, Any] = {
        "fraction_done": sum(c.fraction_done for c in children) / len(children),
        "snapshots_processed": sum(c.snapshots_processed for c in children),
        "snapshots_total": sum(c.snapshots_total for c in children),
        "interim_pnl": max(c.interim_pnl for c in children),
    }
    if started and parent.state is BacktestState.PENDING:
        values["state"] = BacktestState.RUNNING
        values["run_start_time"] = min(c.run_start_time or _now() for c in started)
    return _replaced(parent, values)


def _sweep_outcome(succeeded: Sequence[BacktestRecord], rank_by: str) -> dict[str, Any]:
    """The finished sweep's fields: children ranked best first, and the best child's metrics and
    fingerprint as the sweep's own."""
    assert all(r.metrics is not None for r in succeeded)
    order = rank([metrics_from_document(r.metrics or {}) for r in succeeded], rank_by)
    best = succeeded[order[0]]
    return {
        "state": BacktestState.SUCCEEDED,
        "ranked_child_ids": tuple(succeeded[i].backtest_id for i in order),
        "metrics": best.metrics,
        "row_count": best.row_count,
        "first_snapshot_id": best.first_snapshot_id,
        "last_snapshot_id": best.last_snapshot_id,
        "content_hash": best.content_hash,
        "fraction_done": 1.0,
    }
