"""One subscriber's feed: stored history, one caught-up marker, then live — no gap, no duplicate.

The same feed serves every stream of stored rows that carry an id increasing in commit order:
snapshots (StreamSnapshots), trades (StreamTrades, rows ``StreamedTrade``) and order-book rows
(StreamOrderBooks, whose streams begin with each market's full book: ``StartingPointSource``).

The switch works because the subscription to the hub starts *before* history is read: whatever
commits while history is being read is either read from the database or waiting in the
subscription's queue (or both, and then the copy with an id already replayed is skipped). Writes
are serialised in the server, so row ids are committed in increasing order and "id greater
than the last one delivered" is exactly "not delivered yet".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, cast, runtime_checkable

from kfeed_server.records import FeedGapRecord, SnapshotRecord
from kfeed_server.streaming.hub import (
    LiveChunk,
    MarketSelector,
    SnapshotHub,
    StreamKind,
    Subscription,
)

if TYPE_CHECKING:
    import pyarrow as pa

# History is read in ordered chunks of this many rows; each becomes one run of snapshots.
REPLAY_PAGE_SIZE = 10_000
# A snapshot replay longer than a first page of this many rows reads the rest as columns (an
# extra connection and query: worth it from about a thousand rows on), this many rows a query.
ROWS_BEFORE_COLUMNS = 1_000
COLUMN_REPLAY_ROWS = 1_000_000


class StreamRow(Protocol):
    """A streamed row: its market, its id (increasing in commit order), and its time
    (exchange time; a trade's create time) — what a stream's ``start_time`` selects by."""

    @property
    def ticker(self) -> str: ...

    @property
    def stream_id(self) -> int: ...

    @property
    def stream_time(self) -> datetime: ...


R = TypeVar("R", bound=StreamRow)


class RowSource(Protocol[R]):
    """The reads a feed needs from storage."""

    async def list_after_id(
        self,
        after_id: int,
        *,
        tickers: Sequence[str] | None,
        limit: int,
        min_exchange_time: datetime | None = None,
    ) -> list[R]: ...

    async def max_stream_id(self) -> int: ...


@runtime_checkable
class SnapshotSource(RowSource[SnapshotRecord], Protocol):
    """Snapshot reads, with the latest snapshot per market (``include_latest``)."""

    async def latest_per_market(self, tickers: Sequence[str] | None) -> list[SnapshotRecord]: ...


@runtime_checkable
class StartingPointSource(RowSource[R], Protocol):
    """A source whose streams (unless resumed) begin with rows that stand for everything up to a
    position — order books: each market's full book — then go on after that position."""

    async def starting_point(
        self, tickers: Sequence[str] | None, start_time: datetime | None
    ) -> tuple[list[R], int]:
        """The rows to send first (at ``start_time``, or now) and the position they stand at."""
        ...


class ColumnHistory(Protocol):
    """Stored snapshots read as columns, for replays longer than a page: Arrow record batches
    of the replay schema (db.repositories.export.SNAPSHOT_REPLAY: ``snapshot_id`` first)."""

    def snapshots_after_id(
        self,
        after_id: int,
        *,
        tickers: Sequence[str] | None,
        min_exchange_time: datetime | None,
        limit: int,
    ) -> AsyncIterator[pa.RecordBatch]: ...


class OverflowPolicy:
    GAP_MARKER = "gap_marker"
    RESOURCE_EXHAUSTED = "resource_exhausted"


@dataclass(frozen=True, slots=True)
class FeedRequest:
    selector: MarketSelector
    kind: StreamKind = StreamKind.SNAPSHOTS
    # Deliver only rows with exchange (trades: create) time at or after this, stored and live
    # alike; order books instead start from the books in force at this time.
    start_time: datetime | None = None
    # Continue after this row id: where the stream starts, start_time still selecting the rows
    # (order books: start_time is then unused — the token's position stands for it).
    resume_after_id: int | None = None
    include_latest: bool = False
    heartbeat_interval: float = 5.0
    conflation_interval: float | None = None
    overflow_policy: str = OverflowPolicy.GAP_MARKER
    # Tickers the selector resolves to right now (None: all markets), for the history query.
    history_tickers: Sequence[str] | None = None


@dataclass(frozen=True, slots=True)
class CaughtUpEvent:
    replayed_count: int


@dataclass(frozen=True, slots=True)
class HeartbeatEvent:
    server_time: datetime


@dataclass(frozen=True, slots=True)
class SubscriberGapEvent:
    dropped_count: int


@dataclass(frozen=True, slots=True)
class FeedGapEvent:
    gap: FeedGapRecord


FeedEvent = CaughtUpEvent | HeartbeatEvent | SubscriberGapEvent | FeedGapEvent


@dataclass(frozen=True, slots=True)
class Delivery:
    """An event and the row id to resume after, were the stream to stop right after it."""

    event: FeedEvent
    resume_after_id: int


@dataclass(frozen=True)  # no slots: they break calls through RowRun[...] aliases
class RowRun(Generic[R]):
    """Consecutive rows that are ready together — a chunk of history, or what one live wake-up
    found — so that transport can send several in one message."""

    rows: Sequence[R]
    # With conflation: how many snapshots each one replaced (None: none was conflated).
    coalesced_counts: Sequence[int] | None = None
    # The position after each of them when it is not the snapshot's own id: the latest-snapshot
    # preamble, sent out of id order, resumes after the id the stream went live at.
    fixed_resume_after_id: int | None = None
    # The hub's chunks these rows are, whole and in order, when they are (live, unconflated):
    # transport encodes a shared chunk once for every subscriber it reaches.
    chunks: Sequence[LiveChunk] | None = None
    # One conflation interval's rows: together they stand for every row up to the last one's
    # position, so a stream that must resume exactly sends them in one message.
    conflated: bool = False

    def resume_after_id(self, index: int) -> int:
        """Where to resume after the row at ``index`` of this run."""
        if self.fixed_resume_after_id is not None:
            return self.fixed_resume_after_id
        return self.rows[index].stream_id

    def coalesced_count(self, index: int) -> int:
        return 0 if self.coalesced_counts is None else self.coalesced_counts[index]

    def batches(self, max_batch_size: int) -> Iterator[tuple[Sequence[R], int]]:
        """The rows, up to ``max_batch_size`` (at least one) at a time, each batch with where
        to resume after its last row."""
        size = max(max_batch_size, 1)
        for start in range(0, len(self.rows), size):
            batch = self.rows[start : start + size]
            yield batch, self.resume_after_id(start + len(batch) - 1)


SnapshotRun = RowRun[SnapshotRecord]


@dataclass(frozen=True)
class ColumnRun:
    """Consecutive stored snapshots read as columns (a chunk of a long replay), in id order;
    transport encodes them a column at a time."""

    columns: pa.RecordBatch
    last_id: int


# What a feed yields: runs of rows (or of snapshot columns), and the other events one by one.
FeedItem = RowRun[R] | ColumnRun | Delivery


class SubscriberOverflowError(Exception):
    """The subscriber fell behind and chose to be disconnected rather than skip."""

    def __init__(self, dropped: int, resume_after_id: int) -> None:
        super().__init__(f"subscriber fell behind: {dropped} messages not delivered")
        self.dropped = dropped
        self.resume_after_id = resume_after_id


class Conflator(Protocol[R]):
    """What a conflated live feed sends per market per interval, from the rows it took."""

    @property
    def pending(self) -> bool:
        """Whether rows were added since the last flush."""
        ...

    def observe(self, row: R) -> None:
        """A row the stream sent as it is (history, starting rows): the state rows fold into."""

    def add(self, row: R) -> None:
        """A live row, to be sent conflated at the next flush."""

    def flush(self) -> list[tuple[R, int]]:
        """The rows to send for what was added since the last flush, each with how many rows
        it stands for, in position order (each row's ``stream_id``: the last it holds)."""
        ...

    def forget(self) -> None:
        """Rows were dropped (the subscriber overflowed): nothing pending is sent, and state
        built from rows before the drop is not trusted."""


@dataclass
class LatestPerMarket(Generic[R]):
    """Snapshot conflation: the latest row per market within a window, with how many rows it
    replaced."""

    rows: dict[str, tuple[R, int]] = field(default_factory=dict)

    @property
    def pending(self) -> bool:
        return bool(self.rows)

    def observe(self, row: R) -> None:
        pass  # each row is whole: nothing is built from earlier ones

    def add(self, row: R) -> None:
        previous = self.rows.get(row.ticker)
        self.rows[row.ticker] = (row, 0 if previous is None else previous[1] + 1)

    def flush(self) -> list[tuple[R, int]]:
        rows = sorted(self.rows.values(), key=lambda pending: pending[0].stream_id)
        self.rows.clear()
        return rows

    def forget(self) -> None:
        self.rows.clear()


async def _replay(
    source: RowSource[R],
    request: FeedRequest,
    after_id: int,
    min_time: datetime | None,
    columns: ColumnHistory | None,
) -> AsyncIterator[RowRun[R] | ColumnRun]:
    """Stored history after ``after_id`` in id order, a chunk at a time: a page of rows first,
    and when there is more and ``columns`` reads it, the rest as columns (a page of rows costs
    microseconds a row in Python, a column chunk a fraction of one; ADR 0014)."""
    tickers = request.history_tickers
    page_size = REPLAY_PAGE_SIZE if columns is None else ROWS_BEFORE_COLUMNS
    while True:
        page = await source.list_after_id(
            after_id, tickers=tickers, limit=page_size, min_exchange_time=min_time
        )
        if page:
            yield RowRun(page)
        if len(page) < page_size:
            return
        after_id = page[-1].stream_id
        if columns is not None:
            break
    assert columns is not None
    while True:
        read = 0
        chunks = columns.snapshots_after_id(
            after_id, tickers=tickers, min_exchange_time=min_time, limit=COLUMN_REPLAY_ROWS
        )
        async for chunk in chunks:
            if chunk.num_rows:
                read += chunk.num_rows
                after_id = chunk.column(0)[-1].as_py()
                yield ColumnRun(chunk, after_id)
        if read < COLUMN_REPLAY_ROWS:
            return


async def feed_items(
    request: FeedRequest,
    hub: SnapshotHub,
    source: RowSource[R],
    columns: ColumnHistory | None = None,
    conflator: Conflator[R] | None = None,
) -> AsyncGenerator[FeedItem[R], None]:
    """The events of one subscription, rows in runs, until the hub closes (shutdown), the hub
    ends the subscription, or the caller stops. ``columns``: long snapshot replays read as
    columns. With ``request.conflation_interval``, live rows go through ``conflator`` (default:
    the latest row per market), which sees every row sent before too."""
    if request.conflation_interval and conflator is None:
        conflator = LatestPerMarket()
    elif not request.conflation_interval:
        conflator = None
    subscription = hub.subscribe(request.selector, kind=request.kind)
    try:
        async for item in _history_then_live(request, subscription, source, columns, conflator):
            yield item
    finally:
        hub.unsubscribe(subscription)


async def _history_then_live(
    request: FeedRequest,
    subscription: Subscription,
    source: RowSource[R],
    columns: ColumnHistory | None,
    conflator: Conflator[R] | None,
) -> AsyncIterator[FeedItem[R]]:
    last_id = 0
    replayed = 0
    # Replay stored rows after last_id (from min_time, when set)?
    replay, min_time = True, None
    if request.resume_after_id is not None:
        last_id = request.resume_after_id
        if not isinstance(source, StartingPointSource):
            min_time = request.start_time
        elif conflator is not None:
            # The subscriber holds what it had at last_id: the conflator starts from the rows
            # standing for now instead, not sent. Folding the replayed rows after last_id on
            # top of them again leaves each one as the newest row that touched it: as now.
            latest, _ = await source.starting_point(request.history_tickers, None)
            for row in cast(list[R], latest):
                conflator.observe(row)
    elif isinstance(source, StartingPointSource):
        start = await source.starting_point(request.history_tickers, request.start_time)
        starting_rows, last_id = cast(tuple[list[R], int], start)
        if starting_rows:
            replayed += len(starting_rows)
            _observe(conflator, starting_rows)
            yield RowRun(starting_rows, fixed_resume_after_id=last_id)
        replay = request.start_time is not None  # else: live from the starting point
    elif request.start_time is not None:
        min_time = request.start_time
    else:
        replay = False
    if replay:
        # Rows up to here are all read by the replay, delivered or left out by min_time: the
        # stream stands after them even when the last of them was left out.
        floor = await source.max_stream_id() if min_time is not None else 0
        async for run in _replay(source, request, last_id, min_time, columns):
            if isinstance(run, ColumnRun):
                last_id = run.last_id
                replayed += run.columns.num_rows
            else:
                last_id = run.rows[-1].stream_id
                replayed += len(run.rows)
                _observe(conflator, run.rows)
            yield run
        last_id = max(last_id, floor)
    elif not isinstance(source, StartingPointSource):
        last_id = await source.max_stream_id()
        if request.include_latest and isinstance(source, SnapshotSource):
            latest = await source.latest_per_market(request.history_tickers)
            # Newer ones than last_id committed meanwhile: they are in the live queue.
            preamble = sorted(
                (s for s in latest if s.snapshot_id <= last_id), key=lambda s: s.snapshot_id
            )
            if preamble:
                replayed += len(preamble)
                yield cast(RowRun[R], RowRun(preamble, fixed_resume_after_id=last_id))
    yield Delivery(CaughtUpEvent(replayed), last_id)
    live: AsyncIterator[FeedItem[R]] = _live(request, subscription, last_id, min_time, conflator)
    async for item in live:
        yield item


def _observe(conflator: Conflator[R] | None, rows: Sequence[R]) -> None:
    if conflator is not None:
        for row in rows:
            conflator.observe(row)


class _ReadyItems(Generic[R]):
    """What one live wake-up sends, in order: consecutive rows grouped into runs."""

    def __init__(self) -> None:
        self.items: list[FeedItem[R]] = []
        self._rows: list[R] = []
        self._coalesced: list[int] = []
        # The whole chunks the current run is made of (None once a row came on its own).
        self._chunks: list[LiveChunk] | None = []

    def row(self, row: R, coalesced_count: int = 0) -> None:
        self._rows.append(row)
        self._coalesced.append(coalesced_count)
        self._chunks = None

    def chunk(self, chunk: LiveChunk) -> None:
        """All the rows of ``chunk``, unconflated."""
        self._rows.extend(cast(Sequence[R], chunk.items))
        self._coalesced.extend([0] * len(chunk.items))
        if self._chunks is not None:
            self._chunks.append(chunk)

    def event(self, delivery: Delivery) -> None:
        self._close_run()
        self.items.append(delivery)

    def conflated(self, rows: list[tuple[R, int]]) -> None:
        """One flush of the conflator, a run of its own."""
        self._close_run()
        self.items.append(
            RowRun([row for row, _ in rows], [count for _, count in rows], conflated=True)
        )

    def _close_run(self) -> None:
        if self._rows:
            coalesced = self._coalesced if any(self._coalesced) else None
            self.items.append(RowRun(self._rows, coalesced, chunks=self._chunks))
            self._rows, self._coalesced = [], []
        self._chunks = []

    def take(self) -> list[FeedItem[R]]:
        self._close_run()
        items, self.items = self.items, []
        return items


def _all_from(rows: Sequence[R], min_time: datetime | None) -> bool:
    """Whether every one of ``rows`` is at or after ``min_time`` (None: no filter)."""
    return min_time is None or all(row.stream_time >= min_time for row in rows)


async def _live(
    request: FeedRequest,
    subscription: Subscription,
    last_id: int,
    min_time: datetime | None,
    conflator: Conflator[R] | None,
) -> AsyncIterator[FeedItem[R]]:
    """Live rows after ``last_id``; those older than ``min_time`` are left out as the replay
    leaves them out, so which rows a stream delivers does not depend on whether they committed
    before or after it went live (a row left out does not move the resume position: a stream
    resumed with the same ``start_time`` leaves it out again)."""
    loop = asyncio.get_running_loop()
    conflation = request.conflation_interval
    next_flush = loop.time()
    last_sent = loop.time()
    while not subscription.closed:
        deadline = last_sent + request.heartbeat_interval
        if conflator is not None and conflator.pending:
            deadline = min(deadline, next_flush)
        await subscription.wait(max(deadline - loop.time(), 0))
        ready: _ReadyItems[R] = _ReadyItems()
        if subscription.overflowed:
            dropped = subscription.take_overflow()
            if request.overflow_policy == OverflowPolicy.RESOURCE_EXHAUSTED:
                raise SubscriberOverflowError(dropped, last_id)
            if conflator is not None:
                conflator.forget()
            ready.event(Delivery(SubscriberGapEvent(dropped), last_id))
        for chunk in subscription.take_chunks():
            if not chunk.rows:
                for gap in chunk.items:
                    ready.event(Delivery(FeedGapEvent(cast(FeedGapRecord, gap)), last_id))
                continue
            # The hub routes to a subscription rows of its kind only, in id order.
            rows = cast(Sequence[R], chunk.items)
            if conflator is None and rows[0].stream_id > last_id and _all_from(rows, min_time):
                last_id = rows[-1].stream_id
                ready.chunk(chunk)
                continue
            for row in rows:
                if row.stream_id <= last_id:
                    continue  # already delivered from history
                if min_time is not None and row.stream_time < min_time:
                    continue
                if conflator is None:
                    last_id = row.stream_id
                    ready.row(row)
                else:
                    conflator.add(row)
        if conflator is not None and conflator.pending and loop.time() >= next_flush:
            flushed = conflator.flush()
            if flushed:
                last_id = flushed[-1][0].stream_id
                ready.conflated(flushed)
            next_flush = loop.time() + (conflation or 0)
        to_send = ready.take()
        if not to_send and loop.time() >= last_sent + request.heartbeat_interval:
            to_send.append(Delivery(HeartbeatEvent(datetime.now(UTC)), last_id))
        for feed_item in to_send:
            yield feed_item
        if to_send:
            last_sent = loop.time()
