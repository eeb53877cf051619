"""The backtest service's domain layer: the run lifecycle.

``BacktestRunner`` owns the worker pool and the state machine (PENDING → RUNNING → SUCCEEDED |
FAILED | CANCELLED): it creates runs and sweeps, tracks them (``tracking``), hands each run to the
``ReplayFeeder`` (``feeding``: the worker and its rows), stores results, fans progress out to
watchers and stops runs. Sweep outcomes are in ``sweep_runs``. It speaks records and engine types
(no gRPC) and stores through the repositories (no SQL). See docs/BACKTESTING.md ("The service").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from kfeed_server import build
from kfeed_server.backtest.config import fast_path_applies, validate_config
from kfeed_server.backtest.engine import DEFAULT_PROGRESS_EVERY, BacktestCancelled, BacktestResult
from kfeed_server.backtest.feeding import (
    FeedSettings,
    FeedSources,
    ReplayFeeder,
    run_data_quality,
)
from kfeed_server.backtest.loading import entry_point_modules, load_strategy_modules
from kfeed_server.backtest.quality import UnrecoveredGaps
from kfeed_server.backtest.stitching import RunSegment, stitched_metrics
from kfeed_server.backtest.sweep_runs import (
    best_run,
    sweep_outcome,
    sweep_points,
    sweep_progress,
    walk_forward_points,
)
from kfeed_server.backtest.tracking import TrackedRun, progress_values, replaced
from kfeed_server.backtest.worker import NotCompiled, WorkerKilled, WorkerLimits
from kfeed_server.db.repositories import Repositories
from kfeed_server.records import BacktestState, EquityPointRecord, ExecutionRecord, Page
from kfeed_server.records.backtest import (
    BacktestRecord,
    DataQuality,
    EngineConfig,
    SweepSpec,
    WalkForwardFold,
    WalkForwardOutcome,
)

log = logging.getLogger(__name__)

RESTART_MESSAGE = "the server stopped before the backtest finished"
EXECUTION_PAGE = 10_000
"""Executions per read when a walk-forward sweep stitches its out-of-sample runs."""


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
    # Modules of user strategies to load (``--strategy-module``), besides the entry points.
    strategy_modules: tuple[str, ...] = ()
    # Wall-clock seconds one run may take in its worker before it fails (a runaway strategy).
    time_limit: float = 3_600.0


class UnknownMarkets(Exception):
    """Some of a backtest's tickers are not known markets."""

    def __init__(self, tickers: Sequence[str]) -> None:
        super().__init__(", ".join(tickers))
        self.tickers = tuple(tickers)


def _now() -> datetime:
    return datetime.now(UTC)


def _new_backtest_id() -> str:
    return uuid.uuid4().hex


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
        code_version: str | None = None,
    ) -> None:
        self._backtests = repositories.backtests
        self._markets = repositories.markets
        self._config = config or RunnerConfig()
        self._feeder = ReplayFeeder(
            FeedSources(
                repositories.snapshots,
                repositories.markets,
                repositories.feed_gaps,
                repositories.books,
                repositories.trades,
                repositories.exports,
            ),
            FeedSettings(self._config.progress_every, self._config.persist_interval),
        )
        # The exact commit when known (looked up once per process).
        self._code_version = code_version if code_version is not None else build.code_version()
        # One single-process pool per worker slot: a worker killed for running away (or dying)
        # breaks only its own pool, never the runs in the other slots.
        self._executors: list[ProcessPoolExecutor | None] = [None] * self._config.workers
        # User strategies: registered here for validation and ListStrategies, imported again by
        # each worker before it runs one.
        self._strategy_modules = (*self._config.strategy_modules, *entry_point_modules())
        load_strategy_modules(self._strategy_modules)
        self._free_slots: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(self._config.workers):
            self._free_slots.put_nowait(slot)
        self._tracked: dict[str, TrackedRun] = {}
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
        for slot in range(len(self._executors)):
            self._retire_pool(slot)

    def _retire_pool(self, slot: int) -> None:
        """Shuts the slot's pool down (the next run in the slot starts a fresh one)."""
        executor, self._executors[slot] = self._executors[slot], None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _pool(self, slot: int) -> ProcessPoolExecutor:
        executor = self._executors[slot]
        if executor is None:
            context = multiprocessing.get_context(self._config.start_method)
            if self._config.start_method == "forkserver":
                context.set_forkserver_preload(
                    ["kfeed_server.backtest.worker", "kfeed_server.backtest.warm_up"]
                )
            executor = self._executors[slot] = ProcessPoolExecutor(1, mp_context=context)
        return executor

    # --- requests ------------------------------------------------------------------------------

    async def create(
        self, config: EngineConfig, sweep: SweepSpec | None = None, *, created_by: str = ""
    ) -> BacktestRecord:
        """Validates and stores a backtest (a sweep: its parent and one child per grid point)
        PENDING, starts it, and returns the stored record at once.

        Raises ConfigError (fields as in the proto: ``strategy``, ``parameters.<name>``,
        ``sweep.grid.<name>``, ``sweep.rank_by``, ...) and UnknownMarkets."""
        config = validate_config(config)
        folds: list[tuple[WalkForwardFold, list[EngineConfig]]] = []
        if sweep is not None and sweep.walk_forward is not None:
            folds = walk_forward_points(config, sweep, self._config.max_sweep_points)
            point_configs: list[EngineConfig] | None = [c for _, fold in folds for c in fold]
        elif sweep is not None:
            point_configs = sweep_points(config, sweep, self._config.max_sweep_points)
        else:
            point_configs = None
        known = await self._markets.existing_tickers(config.tickers)
        unknown = [ticker for ticker in config.tickers if ticker not in known]
        if unknown:
            raise UnknownMarkets(unknown)
        parent = BacktestRecord(
            backtest_id=_new_backtest_id(),
            config=config,
            sweep=sweep,
            code_version=self._code_version,
            create_time=_now(),
            created_by=created_by,
        )
        await self._backtests.create(parent)
        if point_configs is None:
            tracked = self._track(parent)
            self._spawn(self._run_single(tracked, config, on_change=None))
            return parent
        assert sweep is not None
        children = [
            await self._create_child(parent, point_config, index)
            for index, point_config in enumerate(point_configs)
        ]
        tracked_parent = self._track(parent, children)
        if folds:
            per_fold = len(folds[0][1])
            plan = [
                (fold, children[i * per_fold : (i + 1) * per_fold])
                for i, (fold, _) in enumerate(folds)
            ]
            self._spawn(self._run_walk_forward(tracked_parent, plan, sweep.rank_by))
        else:
            self._spawn(self._run_sweep(tracked_parent, point_configs, sweep.rank_by))
        return parent

    async def _create_child(
        self, parent: BacktestRecord, config: EngineConfig, index: int
    ) -> TrackedRun:
        """Stores and tracks a sweep's ``index``-th child, PENDING."""
        child = BacktestRecord(
            backtest_id=_new_backtest_id(),
            parent_backtest_id=parent.backtest_id,
            config=config,
            code_version=self._code_version,
            # Strictly after the parent, in grid order, so listings are stable.
            create_time=parent.create_time + timedelta(microseconds=index + 1),
            created_by=parent.created_by,
        )
        await self._backtests.create(child)
        return self._track(child)

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

    def _track(self, record: BacktestRecord, children: Sequence[TrackedRun] = ()) -> TrackedRun:
        tracked = TrackedRun(record, children)
        self._tracked[record.backtest_id] = tracked
        return tracked

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _update(
        self, tracked: TrackedRun, on_change: Callable[[], None] | None, **values: Any
    ) -> None:
        """Stores ``values`` with the live progress and publishes the result."""
        current = tracked.record
        values = progress_values(current) | values
        stored = await self._backtests.update(current.backtest_id, **values)
        tracked.publish(stored if stored is not None else replaced(current, values))
        if on_change is not None:
            on_change()

    async def _finish(
        self, tracked: TrackedRun, on_change: Callable[[], None] | None, **values: Any
    ) -> None:
        """Stores a terminal state and stops tracking the backtest."""
        try:
            await self._update(tracked, on_change, run_end_time=_now(), **values)
        finally:
            self._tracked.pop(tracked.record.backtest_id, None)

    async def _finish_stopped(
        self, tracked: TrackedRun, on_change: Callable[[], None] | None
    ) -> None:
        if tracked.stop_reason is None:
            await self._finish(tracked, on_change, state=BacktestState.CANCELLED)
        else:
            await self._finish(
                tracked, on_change, state=BacktestState.FAILED, error_message=tracked.stop_reason
            )

    async def _acquire_slot(self, tracked: TrackedRun) -> int | None:
        """Waits for a free worker slot; None (and no slot held) when a stop came first."""
        acquire = asyncio.ensure_future(self._free_slots.get())
        stopped = asyncio.ensure_future(tracked.stop_requested.wait())
        await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not acquire.done():
            acquire.cancel()
        try:
            slot = await acquire
        except asyncio.CancelledError:
            return None
        if tracked.stop_requested.is_set():
            self._free_slots.put_nowait(slot)
            return None
        return slot

    @contextlib.contextmanager
    def _holding(self, slot: int) -> Iterator[ProcessPoolExecutor]:
        """The slot's pool while a run uses it; a pool whose worker died or was killed is
        retired (only this slot's), and the slot is free again afterwards."""
        try:
            yield self._pool(slot)
        except (BrokenProcessPool, WorkerKilled):
            self._retire_pool(slot)
            raise
        finally:
            self._free_slots.put_nowait(slot)

    async def _run_single(
        self, tracked: TrackedRun, config: EngineConfig, on_change: Callable[[], None] | None
    ) -> None:
        try:
            gaps = await self._feeder.check_gaps(config)
            slot = await self._acquire_slot(tracked)
            if slot is None:
                await self._finish_stopped(tracked, on_change)
                return
            with self._holding(slot) as pool:
                await self._update(
                    tracked, on_change, state=BacktestState.RUNNING, run_start_time=_now()
                )
                result = await self._feeder.replay(
                    pool,
                    tracked,
                    config,
                    self._persist_progress,
                    on_change,
                    WorkerLimits(self._strategy_modules, self._config.time_limit),
                )
            quality = run_data_quality(config, gaps, result)
            await self._store_result(tracked, result, quality, on_change)
        except UnrecoveredGaps as error:
            await self._finish(
                tracked, on_change, state=BacktestState.FAILED, error_message=str(error)
            )
        except BacktestCancelled:
            await self._finish_stopped(tracked, on_change)
        except Exception as error:
            if tracked.stop_requested.is_set():
                # Stopping may surface as a broken pipe or an early end of data in the worker.
                await self._finish_stopped(tracked, on_change)
                return
            log.exception("backtest %s failed", tracked.record.backtest_id)
            await self._finish(
                tracked,
                on_change,
                state=BacktestState.FAILED,
                error_message=f"{type(error).__name__}: {error}",
            )

    async def _store_result(
        self,
        tracked: TrackedRun,
        result: BacktestResult,
        quality: DataQuality,
        on_change: Callable[[], None] | None,
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
            metrics=result.metrics,
            data_quality=quality,
            row_count=fingerprint.row_count,
            first_snapshot_id=fingerprint.first_snapshot_id,
            last_snapshot_id=fingerprint.last_snapshot_id,
            content_hash=fingerprint.content_hash,
            event_count=fingerprint.event_count,
            fingerprint_version=fingerprint.version,
            fraction_done=1.0,
            snapshots_processed=fingerprint.row_count,
        )

    async def _persist_progress(self, record: BacktestRecord) -> None:
        await self._backtests.update(record.backtest_id, **progress_values(record))

    async def _run_compiled(
        self, parent: TrackedRun, children: Sequence[TrackedRun], configs: Sequence[EngineConfig]
    ) -> bool:
        """Runs a sweep's points (``children``, of one window) in one worker over the rows read
        once (the compiled path); False, with nothing run, when a point cannot take it."""
        try:
            gaps = await self._feeder.check_gaps(configs[0])
        except UnrecoveredGaps as error:
            for child in children:
                await self._finish(
                    child, None, state=BacktestState.FAILED, error_message=str(error)
                )
            return True
        slot = await self._acquire_slot(parent)
        if slot is None:
            for child in children:
                await self._finish_stopped(child, None)
            return True
        try:
            with self._holding(slot) as pool:
                for child in children:
                    await self._update(
                        child, None, state=BacktestState.RUNNING, run_start_time=_now()
                    )
                results = await self._feeder.replay_sweep(
                    pool,
                    parent,
                    configs,
                    self._persist_progress,
                    WorkerLimits(self._strategy_modules, self._config.time_limit),
                )
        except NotCompiled:
            return False
        except BacktestCancelled:
            for child in children:
                await self._finish_stopped(child, None)
            return True
        except Exception as error:
            log.exception("sweep %s failed", parent.record.backtest_id)
            message = f"{type(error).__name__}: {error}"
            for child in children:
                await self._finish(child, None, state=BacktestState.FAILED, error_message=message)
            return True
        for child, config, result in zip(children, configs, results, strict=True):
            await self._store_result(child, result, run_data_quality(config, gaps, result), None)
        return True

    async def _run_points(
        self,
        parent: TrackedRun,
        children: Sequence[TrackedRun],
        on_change: Callable[[], None],
    ) -> None:
        """Runs sweep points of one window: compiled in one worker when they all can, else one
        run per point."""
        configs = [child.record.config for child in children]
        compiled = all(fast_path_applies(c) for c in configs) and await self._run_compiled(
            parent, children, configs
        )
        if not compiled:
            await asyncio.gather(
                *(
                    self._run_single(child, config, on_change=on_change)
                    for child, config in zip(children, configs, strict=True)
                )
            )

    async def _run_sweep(
        self, parent: TrackedRun, configs: Sequence[EngineConfig], rank_by: str
    ) -> None:
        children = parent.children

        def refresh() -> None:
            parent.publish(sweep_progress(parent.record, [c.record for c in children]))

        try:
            await self._run_points(parent, children, refresh)
            if parent.stop_requested.is_set():
                await self._finish_stopped(parent, None)
            else:
                outcome = sweep_outcome([c.record for c in children], rank_by)
                await self._finish(parent, None, **outcome)
        except Exception as error:
            log.exception("sweep %s failed", parent.record.backtest_id)
            await self._finish(parent, None, state=BacktestState.FAILED, error_message=f"{error!r}")

    async def _segment(self, record: BacktestRecord) -> RunSegment:
        """A finished run's metrics, stored equity curve and executions, to stitch."""
        assert record.metrics is not None  # a SUCCEEDED run stores its metrics
        executions: list[ExecutionRecord] = []
        after = -1
        while True:
            page = await self._backtests.list_executions(
                record.backtest_id, limit=EXECUTION_PAGE, after_sequence=after
            )
            executions += page.items
            if page.next_cursor is None:
                break
            after = page.items[-1].sequence
        curve = await self._backtests.equity_curve(record.backtest_id)
        return RunSegment(record.metrics, curve, executions)

    async def _run_walk_forward(
        self,
        parent: TrackedRun,
        plan: Sequence[tuple[WalkForwardFold, Sequence[TrackedRun]]],
        rank_by: str,
    ) -> None:
        """Per fold in time order: the grid in-sample, then the best point (by ``rank_by``)
        out-of-sample, a child created once the in-sample runs are done."""

        def refresh() -> None:
            parent.publish(sweep_progress(parent.record, [c.record for c in parent.children]))

        try:
            outcomes: list[WalkForwardOutcome] = []
            tested_runs: list[TrackedRun] = []
            for index, (fold, in_sample) in enumerate(plan):
                await self._run_points(parent, in_sample, refresh)
                best = best_run([c.record for c in in_sample], rank_by)
                if parent.stop_requested.is_set() or best is None:
                    break
                tested_config = replace(
                    best.config, start_time=fold.out_of_sample_start, end_time=fold.end
                )
                tested = await self._create_child(
                    parent.record, tested_config, len(parent.children)
                )
                parent.children = (*parent.children, tested)
                await self._run_single(tested, tested_config, on_change=refresh)
                tested_runs.append(tested)
                outcomes.append(
                    WalkForwardOutcome(index, fold, best.backtest_id, tested.record.backtest_id)
                )
            if parent.stop_requested.is_set():
                await self._finish_stopped(parent, None)
                return
            outcome = sweep_outcome([c.record for c in parent.children], rank_by)
            if outcome["state"] is BacktestState.SUCCEEDED:
                # The folds are the result, and their out-of-sample runs stitched in time order:
                # no single child's metrics stand for the sweep.
                outcome = {
                    "state": BacktestState.SUCCEEDED,
                    "fraction_done": 1.0,
                    "walk_forward_folds": tuple(outcomes),
                }
                if tested_runs and all(run.record.metrics for run in tested_runs):
                    segments = [await self._segment(run.record) for run in tested_runs]
                    initial_cash = parent.record.config.initial_cash
                    outcome["metrics"] = stitched_metrics(initial_cash, segments)
            await self._finish(parent, None, **outcome)
        except Exception as error:
            log.exception("walk-forward sweep %s failed", parent.record.backtest_id)
            await self._finish(parent, None, state=BacktestState.FAILED, error_message=f"{error!r}")
