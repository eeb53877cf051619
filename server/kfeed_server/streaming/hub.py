"""The stream hub: fans committed snapshots and feed gaps out to live subscribers.

Committed batches are published in commit order, which is snapshot-id order (writes are
serialised), right after each commit (see ``streaming.follower``). Publishing never blocks and never
waits for a subscriber: each subscription has its own bounded queue, and a subscriber that lets
it fill up is marked overflowed instead of slowing anyone down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kfeed_server.records import FeedGapRecord, MarketRecord, SnapshotRecord

LiveItem = SnapshotRecord | FeedGapRecord

DEFAULT_QUEUE_CAPACITY = 10_000


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

    def __init__(self, accepts: Callable[[str], bool] | None, capacity: int) -> None:
        self._accepts = accepts
        self._capacity = capacity
        self._items: deque[LiveItem] = deque()
        self._ready = asyncio.Event()
        self.closed = False
        # Set when the queue overflowed; the items dropped since then.
        self.overflowed = False
        self.dropped = 0

    def offer(self, items: list[LiveItem]) -> None:
        """Queue the items this subscriber follows; on overflow drop the backlog and flag it."""
        accepts = self._accepts
        accepted = items if accepts is None else [i for i in items if accepts(i.ticker)]
        if not accepted or self.closed:
            return
        if self.overflowed or len(self._items) + len(accepted) > self._capacity:
            self.dropped += len(self._items) + len(accepted)
            self._items.clear()
            self.overflowed = True
        else:
            self._items.extend(accepted)
        self._ready.set()

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

    async def wait(self, seconds: float) -> None:
        """Until something is queued, the subscription is closed, or ``seconds`` pass."""
        if self._items or self.closed or self.overflowed:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), seconds)

    @property
    def depth(self) -> int:
        return len(self._items)

    def close(self) -> None:
        self.closed = True
        self._ready.set()


class SnapshotHub:
    """Fans committed data out to subscriptions; knows each market's event and series."""

    def __init__(self, queue_capacity: int = DEFAULT_QUEUE_CAPACITY) -> None:
        self.queue_capacity = queue_capacity
        self._subscriptions: set[Subscription] = set()
        # ticker -> (event ticker, series ticker), for event/series selectors.
        self._directory: dict[str, tuple[str, str]] = {}
        self.closed = False

    def remember_markets(self, markets: Iterable[MarketRecord]) -> None:
        for market in markets:
            self._directory[market.ticker] = (market.event_ticker, market.series_ticker)

    def unknown_tickers(self, tickers: Iterable[str]) -> set[str]:
        """Those of ``tickers`` whose market this hub has not been told of."""
        return {ticker for ticker in tickers if ticker not in self._directory}

    def _acceptor(self, selector: MarketSelector) -> Callable[[str], bool] | None:
        if selector.selects_all:
            return None
        directory = self._directory

        def accepts(ticker: str) -> bool:
            if ticker in selector.tickers:
                return True
            event, series = directory.get(ticker, ("", ""))
            return (selector.event_ticker is not None and event == selector.event_ticker) or (
                selector.series_ticker is not None and series == selector.series_ticker
            )

        return accepts

    def subscribe(self, selector: MarketSelector, capacity: int | None = None) -> Subscription:
        subscription = Subscription(self._acceptor(selector), capacity or self.queue_capacity)
        if self.closed:
            subscription.close()
        else:
            self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
        subscription.close()

    def publish(self, snapshots: list[SnapshotRecord], gaps: list[FeedGapRecord]) -> None:
        """Called after commit, in commit order. Never blocks."""
        items: list[LiveItem] = [*snapshots, *gaps]
        if not items:
            return
        for subscription in self._subscriptions:
            subscription.offer(items)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    @property
    def queue_depths(self) -> list[int]:
        """Items queued per live subscription (read by the metrics at scrape time)."""
        return [subscription.depth for subscription in self._subscriptions]

    def close(self) -> None:
        """Shutdown: every subscription ends; new ones end at once."""
        self.closed = True
        for subscription in list(self._subscriptions):
            subscription.close()
        self._subscriptions.clear()
