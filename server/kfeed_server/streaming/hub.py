"""The stream hub: fans committed rows out to live subscribers — snapshots and feed gaps to
snapshot streams, trades to trade streams, order-book rows and feed gaps to book streams (each
subscription is of one ``StreamKind``).

Committed batches are published in commit order, which is snapshot-id order (writes are
serialised), right after each commit (see ``streaming.follower``). Publishing never blocks and never
waits for a subscriber: each subscription has its own bounded queue, and a subscriber that lets
it fill up is marked overflowed instead of slowing anyone down.

Routing is by market: the hub indexes subscriptions by ticker, event and series (and keeps those
that follow every market apart), so a batch costs work in proportion to the deliveries it makes,
not to the number of subscriptions times the batch. Every subscription offered the same items
gets the same ``LiveChunk`` (one per batch for those following everything, one per market for
those following it by name), so transport can encode a chunk once for all of them.

Subscribers take their items in turns: at most ``CONCURRENT_TURNS`` hold one at a time (a turn
runs from the wake-up until the subscriber comes back to wait, its writes included), so the
event loop's queue never holds more than that many subscribers' work in front of an ingest
write, however many subscribers one batch wakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from kfeed_server.records import (
    BookStreamRow,
    FeedGapRecord,
    MarketRecord,
    SnapshotRecord,
    StreamedTrade,
)

LiveItem = SnapshotRecord | FeedGapRecord | StreamedTrade | BookStreamRow


class StreamKind(enum.Enum):
    """What a subscription receives: snapshots and feed gaps, trades, or order-book rows and
    feed gaps."""

    SNAPSHOTS = "snapshots"
    TRADES = "trades"
    BOOKS = "books"


DEFAULT_QUEUE_CAPACITY = 10_000
# Subscribers taking their items at once: an ingest write waits behind at most this many
# subscribers' work in the event loop's queue, yet enough that the round trips of their writes
# overlap (16 held 1,000 subscribers' 10,000 messages/s back; docs/PERFORMANCE.md).
CONCURRENT_TURNS = 64
# A turn older than this stops counting against the limit: a subscriber slow to take its writes
# (a full transport buffer) must not hold the others back.
TURN_SECONDS = 0.05
# While an ingest batch is being stored: fan-out goes on, at this many turns at once.
TURNS_WHILE_WRITING = 8
# A stream about to send waits this long at most for an ingest batch being stored to finish.
WRITE_PAUSE_SECONDS = 0.05


@dataclass(frozen=True, slots=True, eq=False)
class LiveChunk:
    """Items offered together, in commit order, all rows (snapshots or trades) or all feed gaps.
    One chunk is shared by every subscription it was offered to; ``serial`` names it for
    encodings kept across subscribers (None: made for one subscription only)."""

    items: Sequence[LiveItem]
    serial: int | None
    rows: bool = True


@dataclass(frozen=True, slots=True)
class MarketSelector:
    """Which markets a subscriber follows: explicit tickers, an event, a series, or all."""

    tickers: frozenset[str] = frozenset()
    event_ticker: str | None = None
    series_ticker: str | None = None

    @property
    def selects_all(self) -> bool:
        return not self.tickers and self.event_ticker is None and self.series_ticker is None


class Subscription:
    """One subscriber's bounded queue of live items. Only the hub appends; only its feed reads."""

    def __init__(
        self,
        selector: MarketSelector,
        capacity: int,
        request_wake: Callable[[Subscription], None] | None = None,
        kind: StreamKind = StreamKind.SNAPSHOTS,
        end_turn: Callable[[Subscription], None] | None = None,
    ) -> None:
        self.selector = selector
        self.kind = kind
        # Asks the hub for a turn when items are waiting (None: take them at once).
        self._request_wake = request_wake
        # Tells the hub this subscriber's turn is over.
        self._end_turn = end_turn
        self._capacity = capacity
        self._chunks: deque[LiveChunk] = deque()
        self._depth = 0
        self._ready = asyncio.Event()
        self.closed = False
        # Set when the queue overflowed; the items dropped since then.
        self.overflowed = False
        self.dropped = 0
        # The deepest the queue has been (counting what overflowed it) since the metrics last
        # read it: an overflow clears the queue, and the alert must still see it.
        self.peak_depth = 0

    def offer(self, chunk: LiveChunk) -> None:
        """Queue ``chunk`` (already routed to this subscriber); on overflow drop the backlog and
        flag it. The hub wakes the subscriber."""
        if not chunk.items or self.closed:
            return
        depth = self._depth + len(chunk.items)
        if depth > self.peak_depth:
            self.peak_depth = depth
        if self.overflowed or depth > self._capacity:
            self.dropped += depth
            self._chunks.clear()
            self._depth = 0
            self.overflowed = True
        else:
            self._chunks.append(chunk)
            self._depth = depth

    def wake(self) -> None:
        self._ready.set()

    @property
    def needs_waking(self) -> bool:
        return not self._ready.is_set() and (bool(self._chunks) or self.overflowed)

    def take_chunks(self) -> list[LiveChunk]:
        """Everything queued, oldest first, as offered (non-blocking)."""
        chunks = list(self._chunks)
        self._chunks.clear()
        self._depth = 0
        self._ready.clear()
        return chunks

    def take_all(self) -> list[LiveItem]:
        """Everything queued, oldest first, item by item (non-blocking)."""
        return [item for chunk in self.take_chunks() for item in chunk.items]

    def take_overflow(self) -> int:
        """How many items were dropped since the overflow; resets the flag."""
        dropped, self.dropped, self.overflowed = self.dropped, 0, False
        return dropped

    def take_peak_depth(self) -> int:
        """The high-water mark since the last call; starts again from the current depth."""
        peak, self.peak_depth = self.peak_depth, self._depth
        return peak

    async def wait(self, seconds: float) -> None:
        """Until something is queued, the subscription is closed, or ``seconds`` pass.

        Calling it ends this subscriber's turn. Items already waiting are taken on a new turn:
        the hub grants a few at a time, so a subscriber that keeps finding its queue full does
        not take the event loop from ingest and everyone else."""
        if self._end_turn is not None:
            self._end_turn(self)
        if self.closed:
            return
        if self._chunks or self.overflowed:
            if not self._ready.is_set() and self._request_wake is not None:
                self._request_wake(self)
                await self._ready.wait()
            return
        # asyncio.timeout rather than wait_for: no extra task per wait (one per delivery).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._ready.wait()

    @property
    def depth(self) -> int:
        return self._depth

    def close(self) -> None:
        self.closed = True
        self._ready.set()


@dataclass(slots=True)
class _Routes:
    """One stream kind's routing: subscriptions to every market, and by ticker, event and
    series followed."""

    to_all: set[Subscription] = field(default_factory=set)
    by_ticker: dict[str, set[Subscription]] = field(default_factory=dict)
    by_event: dict[str, set[Subscription]] = field(default_factory=dict)
    by_series: dict[str, set[Subscription]] = field(default_factory=dict)

    @property
    def by_market(self) -> bool:
        return bool(self.by_ticker or self.by_event or self.by_series)


class SnapshotHub:
    """Fans committed data out to subscriptions; knows each market's event and series."""

    def __init__(self, queue_capacity: int = DEFAULT_QUEUE_CAPACITY) -> None:
        self.queue_capacity = queue_capacity
        self._subscriptions: set[Subscription] = set()
        self._routes_of = {kind: _Routes() for kind in StreamKind}
        # ticker -> (event ticker, series ticker), for event/series selectors.
        self._directory: dict[str, tuple[str, str]] = {}
        # Subscriptions with news waiting for a turn, in order; those holding one (since when).
        self._to_wake: dict[Subscription, None] = {}
        self._turns: dict[Subscription, float] = {}
        self._retry: asyncio.TimerHandle | None = None
        self._chunk_serials = itertools.count()
        self._writers = 0
        self._no_writers = asyncio.Event()
        self._no_writers.set()
        self.closed = False

    def remember_markets(self, markets: Iterable[MarketRecord]) -> None:
        for market in markets:
            self._directory[market.ticker] = (market.event_ticker, market.series_ticker)

    def unknown_tickers(self, tickers: Iterable[str]) -> set[str]:
        """Those of ``tickers`` whose market this hub has not been told of."""
        return {ticker for ticker in tickers if ticker not in self._directory}

    def _routes(self, selector: MarketSelector, kind: StreamKind) -> list[set[Subscription]]:
        """The routing sets a subscription with ``selector`` belongs to (created as needed)."""
        of_kind = self._routes_of[kind]
        if selector.selects_all:
            return [of_kind.to_all]
        routes = [of_kind.by_ticker.setdefault(ticker, set()) for ticker in selector.tickers]
        if selector.event_ticker is not None:
            routes.append(of_kind.by_event.setdefault(selector.event_ticker, set()))
        if selector.series_ticker is not None:
            routes.append(of_kind.by_series.setdefault(selector.series_ticker, set()))
        return routes

    def subscribe(
        self,
        selector: MarketSelector,
        capacity: int | None = None,
        kind: StreamKind = StreamKind.SNAPSHOTS,
    ) -> Subscription:
        subscription = Subscription(
            selector, capacity or self.queue_capacity, self._request_wake, kind, self._end_turn
        )
        if self.closed:
            subscription.close()
            return subscription
        self._subscriptions.add(subscription)
        for route in self._routes(selector, kind):
            route.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.discard(subscription)
            self._forget_routes(subscription.selector, subscription)
        self._to_wake.pop(subscription, None)
        self._end_turn(subscription)
        subscription.close()

    def _forget_routes(self, selector: MarketSelector, subscription: Subscription) -> None:
        of_kind = self._routes_of[subscription.kind]
        of_kind.to_all.discard(subscription)
        for key, index in (
            *((ticker, of_kind.by_ticker) for ticker in selector.tickers),
            (selector.event_ticker, of_kind.by_event),
            (selector.series_ticker, of_kind.by_series),
        ):
            route = index.get(key) if key is not None else None
            if route is not None:
                route.discard(subscription)
                if not route:
                    del index[key]  # type: ignore[arg-type]

    def _followers(self, routes: _Routes, ticker: str) -> set[Subscription]:
        """Subscriptions that follow ``ticker`` by name, event or series (not the 'all' ones)."""
        followers: set[Subscription] = set()
        named = routes.by_ticker.get(ticker)
        if named:
            followers |= named
        if routes.by_event or routes.by_series:
            event, series = self._directory.get(ticker, ("", ""))
            for index, key in ((routes.by_event, event), (routes.by_series, series)):
                routed = index.get(key) if key else None
                if routed:
                    followers |= routed
        return followers

    def publish(
        self,
        snapshots: list[SnapshotRecord],
        gaps: list[FeedGapRecord],
        trades: Sequence[StreamedTrade] = (),
        books: Sequence[BookStreamRow] = (),
    ) -> None:
        """Called after commit, in commit order. Never blocks."""
        if self.closed:
            return
        offered: list[Subscription] = []
        # A batch's gaps follow its rows, as chunks of their own (streams frame them apart).
        by_kind: tuple[tuple[StreamKind, Sequence[LiveItem], bool], ...] = (
            (StreamKind.SNAPSHOTS, snapshots, True),
            (StreamKind.SNAPSHOTS, gaps, False),
            (StreamKind.TRADES, trades, True),
            (StreamKind.BOOKS, books, True),
            (StreamKind.BOOKS, gaps, False),
        )
        for kind, items, rows in by_kind:
            if items:
                offered += self._offer(self._routes_of[kind], items, rows)
        self._schedule_wake_ups(offered)

    def _chunk(self, items: Sequence[LiveItem], rows: bool) -> LiveChunk:
        """A chunk that may be offered to several subscriptions."""
        return LiveChunk(items, next(self._chunk_serials), rows)

    def _offer(self, routes: _Routes, items: Sequence[LiveItem], rows: bool) -> list[Subscription]:
        """Offer ``items`` to the subscriptions of ``routes`` that follow them; those offered."""
        offered: list[Subscription] = list(routes.to_all)
        if offered:
            everything = self._chunk(items, rows)
            for subscription in offered:
                subscription.offer(everything)
        if routes.by_market:
            offered += self._route_by_market(routes, items, rows)
        return offered

    def _route_by_market(
        self, routes: _Routes, items: Sequence[LiveItem], rows: bool
    ) -> list[Subscription]:
        """Offer each market-following subscription the items of its markets, in order."""
        by_ticker: dict[str, list[LiveItem]] = {}
        for item in items:
            group = by_ticker.get(item.ticker)
            if group is None:
                by_ticker[item.ticker] = [item]
            else:
                group.append(item)
        # Each subscription and the tickers of this batch it follows.
        wanted: dict[Subscription, list[str]] = {}
        for ticker in by_ticker:
            for subscription in self._followers(routes, ticker):
                tickers = wanted.get(subscription)
                if tickers is None:
                    wanted[subscription] = [ticker]
                else:
                    tickers.append(ticker)
        chunks: dict[str, LiveChunk] = {}
        for subscription, tickers in wanted.items():
            if len(tickers) == 1:
                ticker = tickers[0]
                chunk = chunks.get(ticker)
                if chunk is None:
                    chunk = chunks[ticker] = self._chunk(by_ticker[ticker], rows)
                subscription.offer(chunk)
            else:  # several markets: keep the batch's order across them
                followed = set(tickers)
                mine = [item for item in items if item.ticker in followed]
                subscription.offer(LiveChunk(mine, None, rows))
        return list(wanted)

    def _request_wake(self, subscription: Subscription) -> None:
        """Give ``subscription`` a turn when one is free (it has items waiting)."""
        if subscription in self._subscriptions:
            self._to_wake[subscription] = None
            self._grant_turns()
        else:
            subscription.wake()

    def _end_turn(self, subscription: Subscription) -> None:
        if self._turns.pop(subscription, None) is not None and self._to_wake:
            self._grant_turns()

    def _schedule_wake_ups(self, subscriptions: list[Subscription]) -> None:
        to_wake, turns = self._to_wake, self._turns
        for subscription in subscriptions:
            # One holding a turn takes what came meanwhile when it next waits.
            if subscription.needs_waking and subscription not in turns:
                to_wake[subscription] = None
        if to_wake:
            self._grant_turns()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Held while ingest stores a batch: fewer subscribers take turns meanwhile, so the
        write's steps wait behind less fan-out work in the event loop."""
        self._writers += 1
        self._no_writers.clear()
        try:
            yield
        finally:
            self._writers -= 1
            if not self._writers:
                self._no_writers.set()
                if self._to_wake:
                    self._grant_turns()

    @property
    def storing(self) -> bool:
        """Whether an ingest batch is being stored now."""
        return self._writers > 0

    async def after_writes(self) -> None:
        """Returns once no ingest batch is being stored, or after ``WRITE_PAUSE_SECONDS``: a
        stream sending message after message holds the event loop's turns the write needs (its
        read, its commit's round trip), so it lets the write through first."""
        if self._writers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WRITE_PAUSE_SECONDS):
                    await self._no_writers.wait()

    def _grant_turns(self) -> None:
        """Wake waiting subscribers while fewer than the limit hold a turn."""
        to_wake, turns = self._to_wake, self._turns
        limit = TURNS_WHILE_WRITING if self._writers else CONCURRENT_TURNS
        now = time.monotonic()
        if len(turns) >= limit:  # turns running too long stop counting
            expired = [s for s, since in turns.items() if now - since > TURN_SECONDS]
            for subscription in expired:
                del turns[subscription]
        while to_wake and len(turns) < limit:
            subscription = next(iter(to_wake))
            del to_wake[subscription]
            turns[subscription] = now
            subscription.wake()
        if to_wake and self._retry is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a synchronous caller): wake everyone now
                for subscription in to_wake:
                    subscription.wake()
                to_wake.clear()
                return
            self._retry = loop.call_later(TURN_SECONDS, self._retry_grants)

    def _retry_grants(self) -> None:
        self._retry = None
        if self._to_wake:
            self._grant_turns()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    @property
    def queue_depths(self) -> list[int]:
        """Items queued per live subscription (read by the metrics at scrape time)."""
        return [subscription.depth for subscription in self._subscriptions]

    def take_peak_depths(self) -> list[int]:
        """Each live subscription's deepest queue since the last call (an overflow counts with
        the depth it reached), for the high-water-mark metric."""
        return [subscription.take_peak_depth() for subscription in self._subscriptions]

    def close(self) -> None:
        """Shutdown: every subscription ends; new ones end at once."""
        self.closed = True
        for subscription in list(self._subscriptions):
            subscription.close()
        self._subscriptions.clear()
        self._routes_of = {kind: _Routes() for kind in StreamKind}
        self._to_wake.clear()
        self._turns.clear()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
