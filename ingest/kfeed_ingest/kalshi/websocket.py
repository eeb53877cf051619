"""Kalshi WebSocket client: signed handshake, live channels, sequence gaps, reconnects.

:class:`KalshiWebSocketClient.stream` yields normalised items — ``MarketSnapshot`` (source
WEBSOCKET), ``Trade``, ``FeedGap`` and :class:`LifecycleEvent` — and never ends by itself: a
dropped or silent socket (the library's keepalive pings go unanswered) is reconnected with backoff
and every channel resubscribed, which also brings fresh order-book snapshots.

Each market's top of book is kept from ``orderbook_snapshot`` + ``orderbook_delta`` frames; the
``ticker`` channel adds last price, volume and open interest (and the quote, until a book exists).
Changes that carry the same exchange timestamp are coalesced into one snapshot: it is emitted when
the ``ticker`` frame for that instant arrives, when a later instant starts, or when the socket has
been quiet for ``coalesce_seconds``.

Every data frame carries a per-subscription ``seq``. A skipped number is recorded as a
``FeedGap``; on the order-book channel the books are marked stale and a fresh snapshot is asked for
(``update_subscription`` / ``get_snapshot``, falling back to resubscribing when refused). When the
fresh snapshots have arrived the gap is sent again with ``recovered`` set. Gaps on the other
channels cannot be repaired from the socket and stay unrecovered.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from kfeed.v1 import types_pb2
from kfeed_ingest.backoff import Backoff
from kfeed_ingest.kalshi.models import KalshiModel, KalshiTrade, from_epoch_ms
from kfeed_ingest.kalshi.signing import KalshiCredentials
from kfeed_ingest.normalise import (
    FixedPointError,
    TopOfBook,
    book_side,
    complement,
    contracts,
    count_or_legacy,
    dollars,
    parse_count,
    parse_price,
    price_or_legacy,
    timestamp,
    trade_message,
)

logger = logging.getLogger(__name__)

PRODUCTION_WS_URL = "wss://external-api-ws.kalshi.com/trade-api/ws/v2"
TICKER, TRADE, ORDERBOOK, LIFECYCLE = "ticker", "trade", "orderbook_delta", "market_lifecycle_v2"
ALL_CHANNELS: tuple[str, ...] = (TICKER, TRADE, ORDERBOOK, LIFECYCLE)

# Lifecycle events that move a market to a known status (others leave it as it was).
_STATUS_AFTER_EVENT: Mapping[str, types_pb2.MarketStatus.ValueType] = {
    "activated": types_pb2.MARKET_STATUS_OPEN,
    "deactivated": types_pb2.MARKET_STATUS_PAUSED,
    "closed": types_pb2.MARKET_STATUS_CLOSED,
    "determined": types_pb2.MARKET_STATUS_DETERMINED,
    "settled": types_pb2.MARKET_STATUS_FINALIZED,
}


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """A ``market_lifecycle_v2`` message: the runner refreshes the market over REST."""

    ticker: str
    event_type: str
    receive_time: datetime
    msg: Mapping[str, Any]


FeedItem = types_pb2.MarketSnapshot | types_pb2.Trade | types_pb2.FeedGap | LifecycleEvent
"""What :meth:`KalshiWebSocketClient.stream` yields."""


@dataclass(slots=True)
class WebSocketStats:
    """Counters since the client was created."""

    connections: int = 0
    frames: int = 0
    gaps_detected: int = 0
    gaps_recovered: int = 0
    bad_frames: int = 0


class _TickerMsg(KalshiModel):
    market_ticker: str
    price_dollars: str | None = None
    yes_bid_dollars: str | None = None
    yes_ask_dollars: str | None = None
    yes_bid_size_fp: str | None = None
    yes_ask_size_fp: str | None = None
    volume_fp: str | None = None
    open_interest_fp: str | None = None
    ts_ms: int | None = None
    ts: int | None = None
    price: int | None = None
    yes_bid: int | None = None
    yes_ask: int | None = None
    volume: int | None = None
    open_interest: int | None = None


class _BookSnapshotMsg(KalshiModel):
    market_ticker: str
    yes_dollars_fp: list[tuple[str, str]] | None = None
    no_dollars_fp: list[tuple[str, str]] | None = None
    ts_ms: int | None = None


class _BookDeltaMsg(KalshiModel):
    market_ticker: str
    price_dollars: str
    delta_fp: str
    side: str
    ts_ms: int | None = None


def _exchange_time(ts_ms: int | None, ts: int | None = None) -> datetime | None:
    if ts_ms is not None:
        return from_epoch_ms(ts_ms)
    return None if ts is None else from_epoch_ms(ts * 1000)


@dataclass(slots=True)
class _Market:
    """What the socket has told us about one market so far."""

    yes: dict[int, int] | None = None  # YES bids {price: size}; None = no trustworthy book
    no: dict[int, int] | None = None
    quote: TopOfBook | None = None  # from the ticker channel
    last_price: int | None = None
    volume: int | None = None
    open_interest: int | None = None
    status: types_pb2.MarketStatus.ValueType = types_pb2.MARKET_STATUS_UNSPECIFIED
    # Fields no channel carries (24 h volume, liquidity), as REST last showed them.
    volume_24h: int | None = None
    liquidity: int | None = None
    # The pending (not yet emitted) change: its exchange time, receive time and sequence.
    dirty: bool = False
    dirty_since: float = 0.0  # loop time of the first unemitted change
    exchange_time: datetime | None = None
    receive_time: datetime | None = None
    sequence: int | None = None

    def snapshot(self, ticker: str) -> types_pb2.MarketSnapshot:
        snapshot = types_pb2.MarketSnapshot(
            ticker=ticker,
            exchange_time=timestamp(self.exchange_time or self.receive_time),
            receive_time=timestamp(self.receive_time),
            source=types_pb2.DATA_SOURCE_WEBSOCKET,
            exchange_sequence=self.sequence,
            last_price=dollars(self.last_price),
            volume=contracts(self.volume),
            open_interest=contracts(self.open_interest),
            volume_24h=contracts(self.volume_24h),
            liquidity=dollars(self.liquidity),
            status=self.status,
        )
        if self.yes is not None and self.no is not None:
            TopOfBook.from_levels(self.yes, self.no).apply_to(snapshot)
        elif self.quote is not None:
            self.quote.apply_to(snapshot)
        return snapshot


def _market_from(snapshot: types_pb2.MarketSnapshot | None) -> _Market:
    """Live state seeded from a REST snapshot (an empty one when there is none)."""
    if snapshot is None:
        return _Market()

    def value(field: str, unit: str) -> int | None:
        return getattr(getattr(snapshot, field), unit) if snapshot.HasField(field) else None  # type: ignore[arg-type]

    return _Market(
        last_price=value("last_price", "ten_thousandths"),
        volume=value("volume", "hundredths"),
        open_interest=value("open_interest", "hundredths"),
        volume_24h=value("volume_24h", "hundredths"),
        liquidity=value("liquidity", "ten_thousandths"),
        status=snapshot.status,
    )


@dataclass(slots=True)
class _Subscription:
    channel: str
    last_seq: int = 0


@dataclass
class _Session:
    """The protocol state of one connection, free of I/O: frames in, items and commands out."""

    tickers: list[str] | None
    channels: Sequence[str]
    # The last REST snapshot of each market: live state starts from it, so a book or ticker
    # message never shows a market without the fields the other channels carry.
    known: dict[str, types_pb2.MarketSnapshot]
    stats: WebSocketStats
    outbox: list[dict[str, Any]] = field(default_factory=list)
    markets: dict[str, _Market] = field(default_factory=dict)
    subscriptions: dict[int, _Subscription] = field(default_factory=dict)
    commands: dict[int, dict[str, Any]] = field(default_factory=dict)
    awaiting_books: set[str] = field(default_factory=set)
    unrecovered: list[types_pb2.FeedGap] = field(default_factory=list)
    next_id: int = 1

    # -- commands ------------------------------------------------------------------------------

    def send(self, cmd: str, params: dict[str, Any]) -> None:
        command = {"id": self.next_id, "cmd": cmd, "params": params}
        self.commands[self.next_id] = command
        self.next_id += 1
        self.outbox.append(command)

    def subscribe(self, channel: str) -> None:
        params: dict[str, Any] = {"channels": [channel]}
        if self.tickers:
            params["market_tickers"] = list(self.tickers)
        if channel == ORDERBOOK:
            self.awaiting_books |= set(self.tickers or ())
        self.send("subscribe", params)

    def subscribe_all(self) -> None:
        for channel in self.channels:
            if channel == ORDERBOOK and not self.tickers:
                logger.info("order books need market tickers; quotes come from the ticker channel")
                continue
            self.subscribe(channel)

    # -- frames --------------------------------------------------------------------------------

    def market(self, ticker: str) -> _Market:
        state = self.markets.get(ticker)
        if state is None:
            state = self.markets[ticker] = _market_from(self.known.get(ticker))
        return state

    def handle(self, frame: Mapping[str, Any], now: datetime) -> list[FeedItem]:
        """Apply one frame; the items it completes."""
        kind = frame.get("type")
        msg = frame.get("msg")
        if kind == "subscribed" and isinstance(msg, dict):
            self.subscriptions[int(msg["sid"])] = _Subscription(str(msg["channel"]))
            return []
        if kind == "error":
            self._on_error(frame)
            return []
        if kind in ("ok", "unsubscribed") or not isinstance(msg, dict):
            return []
        items: list[FeedItem] = []
        sid, seq = frame.get("sid"), frame.get("seq")
        if (
            isinstance(sid, int)
            and isinstance(seq, int)
            and not self._check_sequence(sid, seq, str(kind), msg, now, items)
        ):
            return items
        try:
            items += self._dispatch(str(kind), msg, seq if isinstance(seq, int) else None, now)
        except (ValidationError, FixedPointError, KeyError, TypeError, ValueError) as exc:
            self.stats.bad_frames += 1
            logger.error("skipping a %s frame Kalshi sent in an unexpected shape: %s", kind, exc)
            if kind in ("orderbook_snapshot", "orderbook_delta") and isinstance(sid, int):
                self._resync_books(sid, [str(msg.get("market_ticker", ""))])
        return items

    def _check_sequence(
        self,
        sid: int,
        seq: int,
        kind: str,
        msg: Mapping[str, Any],
        now: datetime,
        items: list[FeedItem],
    ) -> bool:
        """Track ``seq`` on ``sid``; False for a frame already seen (dropped)."""
        channel = ORDERBOOK if kind.startswith("orderbook") else kind
        subscription = self.subscriptions.setdefault(sid, _Subscription(channel))
        expected = subscription.last_seq + 1
        if seq < expected:
            logger.debug("dropping repeated frame sid=%d seq=%d", sid, seq)
            return False
        subscription.last_seq = seq
        if seq > expected:
            # The lost frame's market is known only when the subscription has a single one.
            only_market = self.tickers[0] if self.tickers and len(self.tickers) == 1 else ""
            gap = types_pb2.FeedGap(
                ticker=only_market,
                channel=subscription.channel,
                subscription_id=sid,
                expected_sequence=expected,
                received_sequence=seq,
                detect_time=timestamp(now),
            )
            self.stats.gaps_detected += 1
            logger.warning(
                "sequence gap on %s sid=%d: expected %d, got %d",
                subscription.channel,
                sid,
                expected,
                seq,
            )
            items.append(gap)
            if subscription.channel == ORDERBOOK:
                self.unrecovered.append(gap)
                self._resync_books(sid, self.tickers or list(self.markets))
        return True

    def _resync_books(self, sid: int, tickers: Sequence[str]) -> None:
        """Distrust these books and ask the exchange for fresh snapshots."""
        for ticker in tickers:
            self.market(ticker).yes = self.market(ticker).no = None
        self.awaiting_books |= set(tickers)
        self.send("update_subscription", {"sids": [sid], "action": "get_snapshot"})

    def _on_error(self, frame: Mapping[str, Any]) -> None:
        command = self.commands.get(frame.get("id", -1))
        logger.error("Kalshi refused %s: %s", command or "a command", frame.get("msg"))
        if command is None or command["params"].get("action") != "get_snapshot":
            return
        # No snapshot on demand: a new subscription starts with one.
        self.send("unsubscribe", {"sids": command["params"]["sids"]})
        self.subscribe(ORDERBOOK)

    def _dispatch(
        self, kind: str, msg: Mapping[str, Any], seq: int | None, now: datetime
    ) -> list[FeedItem]:
        if kind == TRADE:
            return [trade_message(KalshiTrade.model_validate(msg))]
        if kind == LIFECYCLE:
            return self._on_lifecycle(msg, now)
        if kind == "orderbook_snapshot":
            book = _BookSnapshotMsg.model_validate(msg)
            items = self._touch(book.market_ticker, _exchange_time(book.ts_ms), seq, now)
            state = self.market(book.market_ticker)
            state.yes = book_side(book.yes_dollars_fp or [])
            state.no = book_side(book.no_dollars_fp or [])
            return items + self._on_fresh_book(book.market_ticker, now)
        if kind == ORDERBOOK:
            delta = _BookDeltaMsg.model_validate(msg)
            items = self._touch(delta.market_ticker, _exchange_time(delta.ts_ms), seq, now)
            state = self.market(delta.market_ticker)
            side = state.yes if delta.side == "yes" else state.no
            if side is not None:  # a stale book waits for its snapshot
                price = parse_price(delta.price_dollars)
                side[price] = side.get(price, 0) + parse_count(delta.delta_fp)
                if side[price] <= 0:
                    del side[price]
            return items
        if kind == TICKER:
            tick = _TickerMsg.model_validate(msg)
            items = self._touch(tick.market_ticker, _exchange_time(tick.ts_ms, tick.ts), seq, now)
            self._apply_ticker(tick)
            return items + self.flush(tick.market_ticker)
        logger.debug("ignoring a %s frame", kind)
        return []

    def _apply_ticker(self, tick: _TickerMsg) -> None:
        state = self.market(tick.market_ticker)
        yes_bid = price_or_legacy(tick.yes_bid_dollars, tick.yes_bid)
        yes_ask = price_or_legacy(tick.yes_ask_dollars, tick.yes_ask)
        state.quote = TopOfBook(
            yes_bid=yes_bid,
            yes_bid_size=count_or_legacy(tick.yes_bid_size_fp, None),
            no_bid=complement(yes_ask),
            no_bid_size=count_or_legacy(tick.yes_ask_size_fp, None),
        )
        state.last_price = price_or_legacy(tick.price_dollars, tick.price)
        state.volume = count_or_legacy(tick.volume_fp, tick.volume)
        state.open_interest = count_or_legacy(tick.open_interest_fp, tick.open_interest)

    def _on_lifecycle(self, msg: Mapping[str, Any], now: datetime) -> list[FeedItem]:
        ticker, event_type = str(msg["market_ticker"]), str(msg.get("event_type", ""))
        status = _STATUS_AFTER_EVENT.get(event_type)
        if status is not None:
            self.market(ticker).status = status
            if ticker in self.known:
                self.known[ticker].status = status
        return [LifecycleEvent(ticker, event_type, now, dict(msg))]

    def _touch(
        self, ticker: str, exchange_time: datetime | None, seq: int | None, now: datetime
    ) -> list[FeedItem]:
        """Mark ``ticker`` changed at ``exchange_time``; emits the pending change of an earlier
        instant first, so that one snapshot describes one exchange instant."""
        state = self.market(ticker)
        items: list[FeedItem] = []
        if state.dirty and exchange_time != state.exchange_time:
            items = self.flush(ticker)
        if not state.dirty:
            state.dirty = True
            state.dirty_since = asyncio.get_running_loop().time()
        state.exchange_time = exchange_time
        state.receive_time = now
        state.sequence = seq
        return items

    def _on_fresh_book(self, ticker: str, now: datetime) -> list[FeedItem]:
        self.awaiting_books.discard(ticker)
        if self.awaiting_books or not self.unrecovered:
            return []
        recovered: list[FeedItem] = []
        for gap in self.unrecovered:
            # A new message: the unrecovered one was already handed out and may be in flight.
            done = types_pb2.FeedGap()
            done.CopyFrom(gap)
            done.recovered = True
            done.recover_time.FromDatetime(now)
            recovered.append(done)
        self.stats.gaps_recovered += len(self.unrecovered)
        logger.info("order books re-synchronised after %d gap(s)", len(self.unrecovered))
        self.unrecovered = []
        return recovered

    def flush(self, ticker: str | None = None) -> list[FeedItem]:
        """Emit the pending snapshot of ``ticker`` (or of every market)."""
        tickers = [ticker] if ticker is not None else list(self.markets)
        items: list[FeedItem] = []
        for name in tickers:
            state = self.markets.get(name)
            if state is None or not state.dirty:
                continue
            state.dirty = False
            if name in self.awaiting_books and state.quote is None:
                continue  # nothing trustworthy to show until the book arrives
            items.append(state.snapshot(name))
        return items

    def oldest_pending(self) -> float | None:
        """Loop time of the oldest unemitted change, if any."""
        return min((s.dirty_since for s in self.markets.values() if s.dirty), default=None)

    def flush_older_than(self, cutoff: float) -> list[FeedItem]:
        """Emit every pending change made before loop time ``cutoff``."""
        items: list[FeedItem] = []
        for ticker, state in self.markets.items():
            if state.dirty and state.dirty_since <= cutoff:
                items += self.flush(ticker)
        return items


class KalshiWebSocketClient:
    """Streams one set of markets' live channels, reconnecting for as long as it is iterated."""

    def __init__(
        self,
        url: str = PRODUCTION_WS_URL,
        credentials: KalshiCredentials | None = None,
        tickers: Sequence[str] | None = None,
        *,
        channels: Sequence[str] = ALL_CHANNELS,
        known: Mapping[str, types_pb2.MarketSnapshot] | None = None,
        ping_interval: float = 10.0,
        ping_timeout: float = 30.0,
        open_timeout: float = 10.0,
        close_timeout: float = 1.0,
        coalesce_seconds: float = 0.05,
        backoff: Backoff | None = None,
    ) -> None:
        self.url = url
        self.tickers = list(tickers) if tickers else None
        self.channels = tuple(channels)
        self.stats = WebSocketStats()
        self._credentials = credentials
        self._known = dict(known or {})
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._coalesce = coalesce_seconds
        self._backoff = backoff or Backoff(initial=0.5, maximum=30.0)

    def _headers(self) -> dict[str, str]:
        if self._credentials is None:
            return {}
        return self._credentials.headers("GET", self.url)

    async def stream(self) -> AsyncGenerator[FeedItem, None]:
        """Yield live items forever; reconnects (with backoff) whenever the socket is lost."""
        failures = 0
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
                    session = _Session(self.tickers, self.channels, self._known, self.stats)
                    session.subscribe_all()
                    async for item in self._serve(socket, session):
                        received += 1
                        yield item
            except (ConnectionClosed, InvalidHandshake, OSError, TimeoutError) as exc:
                logger.warning(
                    "Kalshi WebSocket lost (%s: %s); reconnecting", type(exc).__name__, exc
                )
            except InvalidURI:
                raise
            failures = 1 if received else failures + 1
            await asyncio.sleep(self._backoff.delay(failures))

    async def _serve(self, socket: ClientConnection, session: _Session) -> AsyncIterator[FeedItem]:
        loop = asyncio.get_running_loop()
        while True:
            for command in session.outbox:
                await socket.send(json.dumps(command))
            session.outbox.clear()
            # A change waits at most `coalesce_seconds` for the rest of its exchange instant,
            # however busy the socket is with other markets.
            oldest = session.oldest_pending()
            wait = None if oldest is None else max(0.0, oldest + self._coalesce - loop.time())
            raw: str | bytes | None = None
            try:
                async with asyncio.timeout(wait):
                    raw = await socket.recv()
            except TimeoutError:
                pass
            if raw is not None:
                for item in self._handle_raw(raw, session):
                    yield item
            for item in session.flush_older_than(loop.time() - self._coalesce):
                yield item

    def _handle_raw(self, raw: str | bytes, session: _Session) -> list[FeedItem]:
        self.stats.frames += 1
        try:
            frame = json.loads(raw)
        except ValueError:
            self.stats.bad_frames += 1
            logger.error("skipping a WebSocket frame that is not JSON (%d bytes)", len(raw))
            return []
        if not isinstance(frame, dict):
            return []
        return session.handle(frame, datetime.now(UTC))
