"""Commit notices on PostgreSQL: how every server sharing a database learns of committed batches.

The writer sends ``NOTIFY kfeed_commits`` inside each write transaction that stored snapshots or
gaps; PostgreSQL delivers a notification only when its transaction commits, and delivers the
notifications of different transactions in commit order — which is snapshot-id order, because
writers take one advisory lock while inserting snapshots. Every server LISTENs on a connection
of its own and tails the rows by id (``streaming.follower``), so replicas behind a load balancer
stream what any of them ingested.

A notice names the batch (the writing process and its batch number), the snapshot id range it
stored, and the ids of the gaps it stored or changed. A payload must stay under PostgreSQL's
8,000 bytes, so a batch with many gaps sends several notices with the same name.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

CHANNEL = "kfeed_commits"
# Gap ids per notice: ≈20 bytes each in JSON keeps a payload far below 8,000 bytes.
GAP_IDS_PER_NOTICE = 300


@dataclass(frozen=True, slots=True)
class CommitNotice:
    """One committed batch (or one part of its gaps). ``first_snapshot_id`` is 0 when the notice
    carries no snapshots; the range may include ids of rows skipped (unchanged or rolled back)."""

    origin: str
    batch: int
    first_snapshot_id: int = 0
    last_snapshot_id: int = 0
    gap_ids: tuple[int, ...] = ()
    # The trade stream id range it stored (0, 0: none).
    first_trade_id: int = 0
    last_trade_id: int = 0
    # The order-book stream id range it stored (0, 0: none).
    first_book_id: int = 0
    last_book_id: int = 0

    def payload(self) -> str:
        return json.dumps(
            [self.origin, self.batch, self.first_snapshot_id, self.last_snapshot_id,
             list(self.gap_ids), self.first_trade_id, self.last_trade_id,
             self.first_book_id, self.last_book_id],
            separators=(",", ":"),
        )  # fmt: skip

    @classmethod
    def parse(cls, payload: str) -> CommitNotice | None:
        """The notice ``payload`` describes; None when it is not one."""
        try:
            origin, batch, first, last, gap_ids, *stream_ids = json.loads(payload)
            notice = cls(
                str(origin), int(batch), int(first), int(last), tuple(map(int, gap_ids)),
                *map(int, stream_ids[:4]),
            )  # fmt: skip
        except (ValueError, TypeError):
            return None
        return notice


def batch_notices(
    origin: str,
    batch: int,
    snapshot_ids: Sequence[int],
    gap_ids: Sequence[int],
    trade_ids: Sequence[int] = (),
    book_ids: Sequence[int] = (),
) -> list[CommitNotice]:
    """The notices of one committed batch: none when it stored no snapshots, gaps, trades or
    streamed order-book rows."""
    if not snapshot_ids and not gap_ids and not trade_ids and not book_ids:
        return []
    first, last = (min(snapshot_ids), max(snapshot_ids)) if snapshot_ids else (0, 0)
    trades = (min(trade_ids), max(trade_ids)) if trade_ids else (0, 0)
    books = (min(book_ids), max(book_ids)) if book_ids else (0, 0)
    parts = [
        tuple(gap_ids[start : start + GAP_IDS_PER_NOTICE])
        for start in range(0, len(gap_ids), GAP_IDS_PER_NOTICE)
    ] or [()]
    notices = [CommitNotice(origin, batch, first, last, parts[0], *trades, *books)]
    notices += [CommitNotice(origin, batch, gap_ids=part) for part in parts[1:]]
    return notices


@dataclass(frozen=True, slots=True)
class Resync:
    """Notices may have been missed (the listening connection was just opened or reopened):
    whoever follows should read what was committed since it last looked."""


def asyncpg_dsn(database_url: str) -> str:
    """The asyncpg DSN of a ``postgresql+asyncpg://`` SQLAlchemy URL."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(False)


class _Inbox:
    """One listening connection's notices; None once the connection is gone."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[CommitNotice | None] = asyncio.Queue()

    def notification(self, _connection: Any, _pid: int, _channel: str, payload: object) -> None:
        notice = CommitNotice.parse(payload) if isinstance(payload, str) else None
        if notice is None:
            log.warning("commit notices: ignoring a malformed payload %r", str(payload)[:200])
        else:
            self.queue.put_nowait(notice)

    def terminated(self, _connection: Any) -> None:
        self.queue.put_nowait(None)


class CommitListener:
    """Listens for commit notices on a connection of its own, reconnecting when it drops."""

    def __init__(self, database_url: str, *, retry_delay: float = 1.0) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._retry_delay = retry_delay

    async def notices(self) -> AsyncIterator[CommitNotice | Resync]:
        """Notices in commit order, with a ``Resync`` each time listening (re)starts. Runs until
        cancelled."""
        while True:
            connection, inbox = await self._listening()
            try:
                yield Resync()
                while (notice := await inbox.queue.get()) is not None:
                    yield notice
                log.warning("commit notices: connection lost; reconnecting")
            finally:
                connection.terminate()

    async def _listening(self) -> tuple[asyncpg.Connection, _Inbox]:
        """A connection listening on CHANNEL, retried until there is one."""
        while True:
            inbox = _Inbox()
            try:
                connection = await asyncpg.connect(self._dsn)
            except (OSError, asyncpg.PostgresError) as error:
                log.warning("commit notices: cannot connect (%r); retrying", error)
                await asyncio.sleep(self._retry_delay)
                continue
            connection.add_termination_listener(inbox.terminated)
            try:
                await connection.add_listener(CHANNEL, inbox.notification)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("commit notices: cannot listen (%r); retrying", error)
                connection.terminate()
                await asyncio.sleep(self._retry_delay)
                continue
            log.info("commit notices: listening")
            return connection, inbox
