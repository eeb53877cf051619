"""The stream hub: fans committed rows out to live subscribers — snapshots and feed gaps to
snapshot streams, trades to trade streams, order-book rows and feed gaps to book streams (each
subscription is of one ``StreamKind``).

Committed batches are published in commit order, which is snapshot-id order (writes are
serialised), right after each commit (see ``streaming.follower``). Publishing never blocks and never
waits for a subscriber: each subscription has its own bounded queue, and a subscriber that lets
it fill up is marked overflowed instead of slowing anyone down.

Routing is by market: the hub indexes subscriptions by ticker, event and series (and keeps those
that follow every market apart), so a batch costs work in proportion to the deliveries it makes,
not to the number of subscriptions times the batch. Subscribers are woken in slices of
``WAKE_SLICE``, yielding to the event loop between slices, so that a thousand subscribers woken
by one batch do not hold the loop (and the ingest that shares it) in one go.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import Callable, Iterable, Sequence
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
# Subscribers woken per turn of the event loop after a publish.
WAKE_SLICE = 16


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
    ) -> None:
        self.selector = selector
        self.kind = kind
        # Asks the hub for a turn when items are waiting (None: take them at once).
        self._request_wake = request_wake
        self._capacity = capacity
        self._items: deque[LiveItem] = deque()
        self._ready = asyncio.Event()
        self.closed = False
        # Set when the queue overflowed; the items dropped since then.
        self.overflowed = False
        self.dropped = 0
        # The deepest the queue has been (counting what overflowed it) since the metrics last
        # read it: an overflow clears the queue, and the alert must still see it.
        self.peak_depth = 0

    def offer(self, items: list[LiveItem]) -> None:
        """Queue ``items`` (already routed to this subscriber); on overflow drop the backlog and
        flag it. The hub wakes the subscriber."""
        if not items or self.closed:
            return
        queue = self._items
        depth = len(queue) + len(items)
        if depth > self.peak_depth:
            self.peak_depth = depth
        if self.overflowed or depth > self._capacity:
            self.dropped += depth
            queue.clear()
            self.overflowed = True
        else:
            queue.extend(items)

    def wake(self) -> None:
        self._ready.set()

    @property
    def needs_waking(self) -> bool:
        return not self._ready.is_set() and (bool(self._items) or self.overflowed)

    def take_all(self) -> list[LiveItem]:
        """Everything queued, oldest first (non-blocking)."""
        items = list(self._items)
        self._items.clear()
        self._ready.clear()
        return items

    def take_overflow(self) -> int:
        """How many items were dropped since the overflow; resets the flag."""
        dropped, self.dropped, self.overflowed = self.dropped, 0, False
        return dropped

    def take_peak_depth(self) -> int:
        """The high-water mark since the last call; starts again from the current depth."""
        peak, self.peak_depth = self.peak_depth, len(self._items)
        return peak

    async def wait(self, seconds: float) -> None:
        """Until something is queued, the subscription is closed, or ``seconds`` pass.

        Items already waiting are taken on this subscriber's turn: the hub grants turns a slice
        at a time, so a subscriber that keeps finding its queue full does not take the event
        loop from ingest and everyone else."""
        if self.closed:
            return
        if self._items or self.overflowed:
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
        return len(self._items)

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
        # Subscriptions with news, waiting for their slice of wake-ups.
        self._to_wake: dict[Subscription, None] = {}
        self._waking: asyncio.Task[None] | None = None
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
            selector, capacity or self.queue_capacity, self._request_wake, kind
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
        by_kind: tuple[tuple[StreamKind, list[LiveItem]], ...] = (
            (StreamKind.SNAPSHOTS, [*snapshots, *gaps]),
            (StreamKind.TRADES, list(trades)),
            (StreamKind.BOOKS, [*books, *gaps]),
        )
        for kind, items in by_kind:
            if items:
                offered += self._offer(self._routes_of[kind], items)
        self._schedule_wake_ups(offered)

    def _offer(self, routes: _Routes, items: list[LiveItem]) -> list[Subscription]:
        """Offer ``items`` to the subscriptions of ``routes`` that follow them; those offered."""
        offered: list[Subscription] = list(routes.to_all)
        for subscription in offered:
            subscription.offer(items)
        if routes.by_market:
            offered += self._route_by_market(routes, items)
        return offered

    def _route_by_market(self, routes: _Routes, items: list[LiveItem]) -> list[Subscription]:
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
        for subscription, tickers in wanted.items():
            if len(tickers) == 1:
                subscription.offer(by_ticker[tickers[0]])
            else:  # several markets: keep the batch's order across them
                followed = set(tickers)
                subscription.offer([item for item in items if item.ticker in followed])
        return list(wanted)

    def _request_wake(self, subscription: Subscription) -> None:
        """Give ``subscription`` a turn in the next slice (it has items waiting)."""
        if subscription in self._subscriptions:
            self._to_wake[subscription] = None
            if self._waking is None:
                self._waking = asyncio.get_running_loop().create_task(self._wake_in_slices())
        else:
            subscription.wake()

    def _schedule_wake_ups(self, subscriptions: list[Subscription]) -> None:
        to_wake = self._to_wake
        for subscription in subscriptions:
            if subscription.needs_waking:
                to_wake[subscription] = None
        if not to_wake or self._waking is not None:
            return
        try:
            self._waking = asyncio.get_running_loop().create_task(self._wake_in_slices())
        except RuntimeError:  # no event loop (a synchronous caller): wake everyone now
            for subscription in to_wake:
                subscription.wake()
            to_wake.clear()

    async def _wake_in_slices(self) -> None:
        to_wake = self._to_wake
        try:
            while to_wake:
                for _ in range(min(WAKE_SLICE, len(to_wake))):
                    subscription = next(iter(to_wake))
                    del to_wake[subscription]
                    subscription.wake()
                await asyncio.sleep(0)
        finally:
            self._waking = None

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
