"""A backtest this server is running: its live record, a broadcast of changes, how to stop it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from kfeed_server.backtest.engine import Progress
from kfeed_server.records.backtest import BacktestRecord

SHUTDOWN_MESSAGE = "the server shut down before the backtest finished"
PROGRESS_FIELDS = ("fraction_done", "snapshots_processed", "snapshots_total", "interim_pnl")
"""The record fields a running backtest changes between state changes."""


class TrackedRun:
    """A backtest this server is running: its latest record (fresher than the database's, which
    gets progress every ``persist_interval``), a broadcast of changes, and how to stop it."""

    def __init__(self, record: BacktestRecord, children: Sequence[TrackedRun] = ()) -> None:
        self.record = record
        self.children = tuple(children)
        self.stop_reason: str | None = None  # None, or the message a FAILED stop carries
        self.stop_requested = asyncio.Event()
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

    def request_stop(self, *, by_user: bool, reason: str = SHUTDOWN_MESSAGE) -> None:
        """Asks the run (and a sweep's children) to stop: CANCELLED when a user asked, else
        FAILED with ``reason``."""
        if not self.stop_requested.is_set():
            self.stop_reason = None if by_user else reason
            self.stop_requested.set()
            if self.control is not None:
                with contextlib.suppress(OSError):
                    self.control.send("stop")
        for child in self.children:
            child.request_stop(by_user=by_user, reason=reason)


def replaced(record: BacktestRecord, values: Mapping[str, Any]) -> BacktestRecord:
    """``record`` with ``values`` (field names) changed."""
    return replace(record, **values)


def progress_values(record: BacktestRecord) -> dict[str, Any]:
    """``record``'s progress fields."""
    return {name: getattr(record, name) for name in PROGRESS_FIELDS}


def with_progress(record: BacktestRecord, progress: Progress) -> BacktestRecord:
    """``record`` with a worker's progress report."""
    return replaced(
        record,
        {
            "fraction_done": progress.fraction_done,
            "snapshots_processed": progress.snapshots_processed,
            "snapshots_total": progress.snapshots_total or record.snapshots_total,
            "interim_pnl": progress.interim_pnl,
        },
    )
