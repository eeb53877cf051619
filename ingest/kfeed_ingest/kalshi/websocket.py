"""Kalshi WebSocket client: signed handshake, live channels, sequence gaps, reconnects.

:class:`KalshiWebSocketClient.stream` yields normalised items — ``MarketSnapshot``, ``Trade``,
``FeedGap``, :class:`LifecycleEvent` and ``KalshiMarket`` — and never ends by itself: a dropped or
silent socket (the library's keepalive pings go unanswered) is reconnected with backoff and every
channel resubscribed, which also brings fresh order-book snapshots.

The protocol itself (books, instants, sequence gaps and what they make stale) lives in
:class:`~kfeed_ingest.kalshi.session.LiveSession`, which does no I/O. This client moves frames
between it and the socket and makes the REST reads it asks for to repair gaps the socket cannot:
requests are collected for ``resync_delay`` seconds and read in one pass (``/markets?tickers=``,
``/markets/trades?min_ts=``) through the REST client and its rate limiter, concurrently with the
socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from kfeed.v1 import types_pb2
from kfeed_ingest.backoff import Backoff
from kfeed_ingest.kalshi.books import CheckpointPolicy
from kfeed_ingest.kalshi.models import KalshiMarket, KalshiTrade
from kfeed_ingest.kalshi.rest import KalshiError, KalshiRestClient
from kfeed_ingest.kalshi.session import (
    ALL_CHANNELS,
    FeedItem,
    LifecycleEvent,
    LiveSession,
    RestResync,
    WebSocketStats,
)
from kfeed_ingest.kalshi.signing import KalshiCredentials

__all__ = [
    "ALL_CHANNELS",
    "PRODUCTION_WS_URL",
    "FeedItem",
    "KalshiWebSocketClient",
    "LifecycleEvent",
    "WebSocketStats",
]

logger = logging.getLogger(__name__)

PRODUCTION_WS_URL = "wss://external-api-ws.kalshi.com/trade-api/ws/v2"
# What a refused handshake most likely means. Kept retrying all the same: a key may be
# re-enabled, a clock resynchronised, without restarting the ingest.
_REFUSED_HINTS = {
    401: ": the signature was not accepted (check --api-key-id, the private key and the clock)",
    403: ": the key may not open this connection",
}
_TICKERS_PER_REQUEST = 100  # keeps `?tickers=` well under URL length limits


@dataclass(frozen=True, slots=True)
class _RestRead:
    """What one REST pass returned."""

    markets: list[KalshiMarket]
    trades: list[KalshiTrade]


class KalshiWebSocketClient:
    """Streams one set of markets' live channels, reconnecting for as long as it is iterated."""

    def __init__(
        self,
        url: str = PRODUCTION_WS_URL,
        credentials: KalshiCredentials | None = None,
        tickers: Sequence[str] | None = None,
        *,
        rest: KalshiRestClient,
        channels: Sequence[str] = ALL_CHANNELS,
        known: Mapping[str, types_pb2.MarketSnapshot] | None = None,
        ping_interval: float = 10.0,
        ping_timeout: float = 30.0,
        open_timeout: float = 10.0,
        close_timeout: float = 1.0,
        coalesce_seconds: float = 0.05,
        resync_delay: float = 0.25,
        book_retry: float = 2.0,
        backoff: Backoff | None = None,
        checkpoints: CheckpointPolicy | None = None,
        open_book_gaps: Sequence[types_pb2.FeedGap] = (),
    ) -> None:
        self.url = url
        # None: every market (no order books); a list, even empty: these markets only.
        self.tickers = list(tickers) if tickers is not None else None
        self.channels = tuple(channels)
        self.stats = WebSocketStats()
        self._credentials = credentials
        self._rest = rest
        # Each market's newest state handed out: a new connection's live state starts from it.
        self._known = dict(known or {})
        # Each market's close time: live instants from then on show the market closed.
        self.close_times: dict[str, datetime] = {}
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._coalesce = coalesce_seconds
        self._resync_delay = resync_delay
        self._book_retry = book_retry
        self._backoff = backoff or Backoff(initial=0.5, maximum=30.0)
        # The open connection and its session, while there is one.
        self._socket: ClientConnection | None = None
        self._checkpoints = checkpoints or CheckpointPolicy()
        # The newest exchange time a connection showed: a new connection's first books are
        # never placed before what the old one recorded.
        self.clock: datetime | None = None
        self._session: LiveSession | None = None
        # A REST repair's items not yet handed out when the stream was closed (finish_repairs).
        self._unyielded: deque[FeedItem] = deque()
        # The session of the connection last lost, while no new one has taken over its repairs
        # (in the reconnect backoff, or the handshake after it).
        self._lost: LiveSession | None = None
        # Order-book gaps an earlier process left unrecovered: the first connection's fresh
        # books recover them.
        self._open_book_gaps = list(open_book_gaps)

    def _headers(self) -> dict[str, str]:
        if self._credentials is None:
            return {}
        return self._credentials.headers("GET", self.url)

    async def stream(self) -> AsyncGenerator[FeedItem, None]:
        """Yield live items forever; reconnects (with backoff) whenever the socket is lost."""
        failures = 0
        previous: LiveSession | None = None
        while True:
            received = 0
            try:
                async with connect(
                    self.url,
                    additional_headers=self._headers(),
                    ping_interval=self._ping_interval,
                    ping_timeout=self._ping_timeout,
                    open_timeout=self._open_timeout,
                    # Leaving must not hang on a peer that never answers our close frame.
                    close_timeout=self._close_timeout,
                    max_size=2**24,
                ) as socket:
                    self.stats.connections += 1
                    logger.info("connected to %s", self.url)
                    session = self._new_session()
                    if previous is not None:
                        session.resume(previous)
                    session.carry_book_gaps(self._open_book_gaps)
                    self._open_book_gaps = []
                    previous = self._session = session
                    self._lost = None
                    session.subscribe_all()
                    self._socket, self._session = socket, session
                    # Closed before the socket: an unfinished REST repair goes back to the
                    # session (finish_repairs or the next connection makes it).
                    async with contextlib.aclosing(self._serve(socket, session)) as serving:
                        async for item in serving:
                            received += 1
                            if isinstance(item, types_pb2.MarketSnapshot):
                                self._remember(item)
                            yield item
            except InvalidStatus as exc:
                status = exc.response.status_code
                hint = _REFUSED_HINTS.get(status, "")
                logger.warning("Kalshi refused the WebSocket (HTTP %d)%s; retrying", status, hint)
            except (ConnectionClosed, InvalidHandshake, OSError, TimeoutError) as exc:
                logger.warning(
                    "Kalshi WebSocket lost (%s: %s); reconnecting", type(exc).__name__, exc
                )
            except InvalidURI:
                raise
            finally:
                self._socket = None
            for marker in self.lost_books():  # what the socket may have sent since is lost
                yield marker
            self._lost = previous
            self._session = None
            failures = 1 if received else failures + 1
            await asyncio.sleep(self._backoff.delay(failures))

    def _new_session(self) -> LiveSession:
        return LiveSession(
            self.tickers,
            self.channels,
            self._known,
            self.stats,
            close_times=self.close_times,
            checkpoints=self._checkpoints,
            clock=self.clock,
        )

    async def follow(self, markets: Mapping[str, types_pb2.MarketSnapshot]) -> list[FeedItem]:
        """Follow exactly these markets from now on. New ones (whose live state starts from the
        given REST snapshot) are added to the open subscriptions and gone ones deleted from
        them with ``update_subscription``: the socket stays open, so nothing is lost. The LOST
        markers of the books no longer recorded."""
        if self.tickers is None:
            return []  # every market already
        current = set(self.tickers)
        added = {t: _copy(s) for t, s in markets.items() if t not in current}
        removed = current - set(markets)
        if not added and not removed:
            return []
        self.tickers = sorted(set(markets))
        for ticker in removed:
            self._known.pop(ticker, None)
        self._known.update(added)
        session, socket = self._session, self._socket
        if session is None or socket is None:
            return []  # the next connection subscribes to the new set
        stopped: list[FeedItem] = [*session.update_markets(added, removed)]
        commands, session.outbox[:] = list(session.outbox), []
        with contextlib.suppress(ConnectionClosed):  # the reconnect subscribes the new set
            for command in commands:
                await socket.send(json.dumps(command))
        logger.info("following %d markets (+%d, -%d)", len(markets), len(added), len(removed))
        return stopped

    def lost_books(self) -> list[FeedItem]:
        """The current connection's books stop being recorded (it was lost, or is being left):
        a LOST marker for each (see :meth:`LiveSession.lost_books`)."""
        session = self._session
        if session is None:
            return []
        self.clock = session.clock
        return [*session.lost_books(None, datetime.now(UTC))]

    async def finish_repairs(self, grace: float) -> list[FeedItem]:
        """On a graceful stop, once :meth:`stream` is closed: the REST repairs the connection
        still wanted (in flight or being collected), read and applied now, for at most
        ``grace`` seconds in all — in the reconnect backoff, those the next connection would
        have made (:meth:`LiveSession.resume`: every market, the trades since the last one
        received, the lost connection's unfinished reads). Their gaps come out recovered; what
        is unread by then stays unrecovered, the honest state (order-book gaps always do: their
        repair is a snapshot on the socket), for the next process to repair."""
        session = self._session
        if session is None and self._lost is not None:
            logger.info("stopping between two connections: making the lost one's repairs")
            session = self._new_session()
            session.resume(self._lost)
            self._lost = None
        if session is None:
            return []
        items: list[FeedItem] = [*self._unyielded]  # a repair the stream was closed amid
        self._unyielded.clear()
        resync = session.take_resync()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while resync is not None:
                    result = await self._read_rest(resync)
                    if result is None:
                        break
                    items += session.apply_resync(
                        resync, result.markets, result.trades, datetime.now(UTC)
                    )
                    resync = session.take_resync()  # markets the socket had moved past
        if resync is not None or session.unrecovered_books:
            logger.warning("stopping with gap repairs unfinished: those gaps stay unrecovered")
        return items

    def _remember(self, snapshot: types_pb2.MarketSnapshot) -> None:
        # A copy: the session updates its seeds' status, and the handed-out message is not ours.
        self._known[snapshot.ticker] = _copy(snapshot)

    async def _serve(
        self, socket: ClientConnection, session: LiveSession
    ) -> AsyncGenerator[FeedItem, None]:
        """Frames in, items out; REST passes run beside the socket, one at a time."""
        loop = asyncio.get_running_loop()
        receiving: asyncio.Task[str | bytes] | None = None
        reading: asyncio.Task[_RestRead | None] | None = None
        in_flight: RestResync | None = None
        resync_wanted_since: float | None = None
        books_awaited_since: float | None = None
        last_frame = loop.time()
        quiet = _QuietDeadline()
        try:
            while True:
                for command in session.outbox:
                    await socket.send(json.dumps(command))
                session.outbox.clear()
                if session.resync is not None and resync_wanted_since is None:
                    resync_wanted_since = loop.time()
                # Requests made within `resync_delay` of the first share one REST pass.
                resync_at = (
                    None
                    if resync_wanted_since is None
                    else resync_wanted_since + self._resync_delay
                )
                if reading is None and resync_at is not None and loop.time() >= resync_at:
                    in_flight, resync_wanted_since = session.take_resync(), None
                    if in_flight is not None:
                        reading = asyncio.create_task(self._read_rest(in_flight))
                # A pending instant is complete once the socket has been quiet for a moment.
                deadlines = [last_frame + self._coalesce] if session.pending else []
                if reading is None and resync_at is not None:
                    deadlines.append(resync_at)
                # A lost book snapshot shows no gap until the next frame on its sid, which a
                # quiet market may never send: books awaited too long are asked for again.
                if not session.awaiting_books:
                    books_awaited_since = None
                elif books_awaited_since is None:
                    books_awaited_since = loop.time()
                elif loop.time() >= books_awaited_since + self._book_retry:
                    session.ask_books_again()
                    books_awaited_since = loop.time()
                    continue
                if books_awaited_since is not None:
                    deadlines.append(books_awaited_since + self._book_retry)
                deadline = min(deadlines) if deadlines else None
                raw: str | bytes | None = None
                if reading is None and receiving is None:
                    # Only the socket to wait for (the usual case): no task and no timer per
                    # frame.
                    raw = await quiet.recv(socket, deadline)
                else:
                    timeout = None if deadline is None else max(0.0, deadline - loop.time())
                    if receiving is None:
                        receiving = asyncio.ensure_future(socket.recv())
                    waiting: set[asyncio.Task[str | bytes] | asyncio.Task[_RestRead | None]] = {
                        receiving
                    }
                    if reading is not None:
                        waiting.add(reading)
                    done, _ = await asyncio.wait(
                        waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                    if reading is not None and reading in done and in_flight is not None:
                        result, reading = reading.result(), None
                        if result is None:
                            session.retry_resync(in_flight)
                        else:
                            self._unyielded.extend(
                                session.apply_resync(
                                    in_flight, result.markets, result.trades, datetime.now(UTC)
                                )
                            )
                            while self._unyielded:
                                yield self._unyielded.popleft()
                    if receiving in done:
                        raw, receiving = receiving.result(), None
                if raw is not None:
                    last_frame = loop.time()
                    for item in self._handle_raw(raw, session):
                        yield item
                elif session.pending and loop.time() >= last_frame + self._coalesce:
                    for item in session.flush():
                        yield item
        finally:
            quiet.close()
            for task in (receiving, reading):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                        await task
            if reading is not None and in_flight is not None:
                session.retry_resync(in_flight)  # not applied: still to be made

    async def _read_rest(self, resync: RestResync) -> _RestRead | None:
        """One REST pass for ``resync``: the markets, then the trades since the gap (None when
        Kalshi could not be read; the request is then made again)."""
        tickers = sorted(resync.tickers)
        markets: list[KalshiMarket] = []
        trades: list[KalshiTrade] = []
        try:
            for start in range(0, len(tickers), _TICKERS_PER_REQUEST):
                chunk = tickers[start : start + _TICKERS_PER_REQUEST]
                markets += [market async for market in self._rest.iter_markets(tickers=chunk)]
            if resync.trades_since is not None:
                # One listing: per market only when the subscription has a single one.
                only = self.tickers[0] if self.tickers and len(self.tickers) == 1 else None
                listing = self._rest.iter_trades(
                    ticker=only, min_ts=int(resync.trades_since.timestamp())
                )
                trades = [trade async for trade in listing]
        except KalshiError as exc:
            self.stats.rest_resync_failures += 1
            logger.error("REST resync of %d market(s) failed: %s", len(tickers), exc)
            return None
        return _RestRead(markets, trades)

    def _handle_raw(self, raw: str | bytes, session: LiveSession) -> list[FeedItem]:
        self.stats.frames += 1
        return session.handle_text(raw, datetime.now(UTC))


class _QuietDeadline:
    """``socket.recv()`` until a deadline, without a timer per frame.

    ``asyncio.timeout`` around each ``recv()`` schedules and cancels a timer per frame, as much
    CPU as receiving the frame itself. Here one timer stays armed while frames keep coming:
    when it fires before the current deadline it is moved there; only when the deadline has
    passed while ``recv()`` still waits is the waiting task cancelled (a cancelled ``recv()``
    loses nothing), and ``recv`` returns None."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._waiting: asyncio.Task[object] | None = None  # the task inside recv(), if any
        self._expired = False

    async def recv(self, socket: ClientConnection, deadline: float | None) -> str | bytes | None:
        """The next message, or None once ``deadline`` (loop time; None: no deadline) passed."""
        self._deadline = deadline
        if deadline is not None and (self._timer is None or self._timer.when() > deadline):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._fire)
        task = self._waiting = asyncio.current_task()
        try:
            return await socket.recv()
        except asyncio.CancelledError:
            if self._expired and task is not None:
                self._expired = False
                if task.uncancel() == 0:
                    return None  # the deadline passed, not a cancellation from outside
            raise
        finally:
            self._waiting = None

    def _fire(self) -> None:
        self._timer = None
        deadline, task = self._deadline, self._waiting
        if task is None or deadline is None:
            return  # not waiting (re-armed by the next recv), or nothing to wait for
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._fire)
            return
        self._expired = True
        task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _copy(snapshot: types_pb2.MarketSnapshot) -> types_pb2.MarketSnapshot:
    seed = types_pb2.MarketSnapshot()
    seed.CopyFrom(snapshot)
    return seed
