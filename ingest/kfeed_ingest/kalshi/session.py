"""The protocol core of one Kalshi WebSocket connection, free of I/O.

:class:`LiveSession` takes decoded frames and hands back normalised items (``MarketSnapshot``,
``Trade``, ``FeedGap``, :class:`LifecycleEvent`, and ``KalshiMarket`` when a market was read again
over REST), commands for the socket (``outbox``) and requests for REST reads
(:meth:`LiveSession.take_resync`). The client (:mod:`kfeed_ingest.kalshi.websocket`) does the I/O.

Each market's live state starts from its REST snapshot (``known``). The ``orderbook_delta``
channel keeps its book, the ``ticker`` channel its quote, last price, volume and open interest,
lifecycle messages its status. Changes with the same exchange time are one instant, emitted as
one snapshot when the ``ticker`` frame of that instant arrives, when a frame of a later instant
arrives, or when the client finds the socket quiet (:meth:`LiveSession.flush`).

A snapshot is emitted only when it is known to be exact: an instant with its ``ticker`` frame
(the exchange's own summary of that instant), or a book-only instant whose trustworthy top still
equals the last quote (the ticker channel reports every move of the top, so a moved top without a
``ticker`` frame means that frame was lost). A market that a sequence gap may have changed is
held back until it is repaired:

- ``orderbook_delta``: the books are distrusted and fresh snapshots asked for on the socket.
- ``ticker``: the affected markets' activity is stale until their next ``ticker`` frame or a REST
  read of the market.
- ``market_lifecycle_v2``: the affected markets' status is stale until a REST read.
- ``trade``: the trades since the last one received are read again over REST.
- A market nothing was read for over REST is read before it is shown.

REST reads are requested, not made: the client collects them into one pass per short window and
hands the results to :meth:`LiveSession.apply_resync`, which updates the live state, emits the
REST snapshot (exchange time = the market's ``updated_time``) and marks the gaps recovered.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from pydantic import ValidationError

from kfeed.v1 import ingest_service_pb2, types_pb2
from kfeed_ingest.kalshi.books import (
    LOST,
    PERIODIC,
    RESYNC,
    START,
    BookChange,
    CheckpointPolicy,
    checkpoint,
    micros,
)
from kfeed_ingest.kalshi.frames import (
    BookDeltaFrame,
    BookDeltaMsg,
    TickerMsg,
    UsualFrame,
    decode_usual_frame,
)
from kfeed_ingest.kalshi.models import KalshiMarket, KalshiModel, KalshiTrade, from_epoch_ms
from kfeed_ingest.kalshi.normalise import (
    FixedPointError,
    TopOfBook,
    book_side,
    contracts,
    count_or_legacy,
    dollars,
    parse_count,
    parse_price,
    price_or_legacy,
    snapshot_from_market,
    timestamp,
    trade_message,
)

logger = logging.getLogger(__name__)

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

# What a sequence number can be (FeedGap and the stored changes hold int64).
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# Where a trade refetch starts when nothing at all is known about the exchange's clock.
_BEGINNING = from_epoch_ms(0)
_JUST_BEFORE = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """A ``market_lifecycle_v2`` message: the runner refreshes the market over REST."""

    ticker: str
    event_type: str
    receive_time: datetime
    msg: Mapping[str, Any]


FeedItem = (
    types_pb2.MarketSnapshot
    | types_pb2.Trade
    | types_pb2.FeedGap
    | LifecycleEvent
    | KalshiMarket
    | BookChange
    | ingest_service_pb2.OrderBookCheckpoint
)
"""What the live feed yields (``KalshiMarket``: a market read again over REST, for its metadata;
``BookChange`` and ``OrderBookCheckpoint``: the order book, see :mod:`.books`)."""


@dataclass(slots=True)
class WebSocketStats:
    """Counters since the client was created."""

    connections: int = 0
    frames: int = 0
    gaps_detected: int = 0
    gaps_recovered: int = 0
    bad_frames: int = 0
    rest_resyncs: int = 0
    rest_resync_failures: int = 0


@dataclass(slots=True)
class RestResync:
    """What the session needs read over REST to repair what the socket lost."""

    tickers: set[str] = field(default_factory=set)  # markets to read again
    trades_since: datetime | None = None  # lost trades happened at or after this; None: none lost
    gaps: list[types_pb2.FeedGap] = field(default_factory=list)  # recovered by this read
    # The session's stale-marking count when the request was taken: a market marked stale after
    # that may have changed after REST answered, so this read cannot clear it.
    generation: int = 0

    def merge(self, other: RestResync) -> None:
        """Add ``other``'s markets, trade window and gaps to this request."""
        self.tickers |= other.tickers
        if other.trades_since is not None:
            self.trades_since = (
                other.trades_since
                if self.trades_since is None
                else min(self.trades_since, other.trades_since)
            )
        self.gaps += other.gaps


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


class _BookDeltaMsg(KalshiModel):
    market_ticker: str
    price_dollars: str
    delta_fp: str
    side: str
    ts_ms: int | None = None


class _BookDelta(NamedTuple):
    market_ticker: str
    price_dollars: str
    delta_fp: str
    side: str
    ts_ms: int | None


_BOOK_DELTA_TEXTS = ("market_ticker", "price_dollars", "delta_fp", "side")


def _book_delta(msg: Mapping[str, Any]) -> _BookDelta:
    """An ``orderbook_delta`` msg. The usual shape (exact types) is read directly, several times
    faster than through the model (one of these per book change); any other goes through
    :class:`_BookDeltaMsg`, which coerces or refuses it."""
    ticker, price, delta, side = (msg.get(name) for name in _BOOK_DELTA_TEXTS)
    ts_ms = msg.get("ts_ms")
    if (
        type(ticker) is str
        and type(price) is str
        and type(delta) is str
        and type(side) is str
        and (ts_ms is None or type(ts_ms) is int)
    ):
        return _BookDelta(ticker, price, delta, side, ts_ms)
    model = _BookDeltaMsg.model_validate(msg)
    return _BookDelta(
        model.market_ticker, model.price_dollars, model.delta_fp, model.side, model.ts_ms
    )


def _exchange_time(ts_ms: int | None, ts: int | None = None) -> datetime | None:
    if ts_ms is not None:
        return from_epoch_ms(ts_ms)
    return None if ts is None else from_epoch_ms(ts * 1000)


def _time_of(snapshot: types_pb2.MarketSnapshot) -> datetime | None:
    if not snapshot.HasField("exchange_time"):
        return None
    return snapshot.exchange_time.ToDatetime(tzinfo=UTC)


@dataclass(slots=True)
class _Market:
    """What the socket (and REST) told us about one market so far."""

    yes: dict[int, int] | None = None  # YES bids {price: size}; None = no trustworthy book
    no: dict[int, int] | None = None
    quote: TopOfBook | None = None  # as of the newest ticker frame or REST read
    last_price: int | None = None
    volume: int | None = None
    open_interest: int | None = None
    activity_time: datetime | None = None  # exchange time of the quote and activity above
    status: types_pb2.MarketStatus.ValueType = types_pb2.MARKET_STATUS_UNSPECIFIED
    # Fields no channel carries (24 h volume, liquidity), as REST last showed them.
    volume_24h: int | None = None
    liquidity: int | None = None
    # What a sequence gap may have hidden (see the module docstring).
    activity_stale: bool = False
    status_stale: bool = False
    stale_mark: int = 0  # the session's stale-marking count when this market was last marked
    # The newest instant the socket showed; while it is pending (unemitted): its receive time,
    # sequence and whether its ticker frame has arrived.
    exchange_time: datetime | None = None
    receive_time: datetime | None = None
    sequence: int | None = None
    ticker_seen: bool = False
    emitted_time: datetime | None = None  # exchange time of the newest snapshot handed out
    # The recorded book: whether its changes are being recorded (from a full book received with
    # no frame lost just before it, until a gap), whether this connection published its first
    # full book, the exchange time of its newest change or checkpoint, and what makes the next
    # periodic checkpoint due.
    recording: bool = False
    book_started: bool = False
    book_time: datetime | None = None
    checkpoint_time: datetime | None = None
    changes_since_checkpoint: int = 0

    @classmethod
    def seeded(cls, snapshot: types_pb2.MarketSnapshot) -> _Market:
        """Live state starting from a snapshot that was already sent."""
        state = cls()
        state.take(snapshot)
        state.exchange_time = state.emitted_time = _time_of(snapshot)
        return state

    def take(self, snapshot: types_pb2.MarketSnapshot) -> None:
        """Quote, activity and status from a REST snapshot (the book stays the socket's own)."""

        def value(field: str, unit: str) -> int | None:
            return getattr(getattr(snapshot, field), unit) if snapshot.HasField(field) else None  # type: ignore[arg-type]

        self.quote = TopOfBook.from_quote(
            value("yes_bid", "ten_thousandths"),
            value("yes_bid_size", "hundredths"),
            value("yes_ask", "ten_thousandths"),
            value("yes_ask_size", "hundredths"),
        )
        self.last_price = value("last_price", "ten_thousandths")
        self.volume = value("volume", "hundredths")
        self.open_interest = value("open_interest", "hundredths")
        self.volume_24h = value("volume_24h", "hundredths")
        self.liquidity = value("liquidity", "ten_thousandths")
        self.status = snapshot.status
        self.activity_time = _time_of(snapshot)

    def book_top(self) -> TopOfBook | None:
        """The top of the socket's book, or None while it is not trustworthy."""
        if self.yes is None or self.no is None:
            return None
        return TopOfBook.from_levels(self.yes, self.no)

    def snapshot(
        self, ticker: str, top: TopOfBook, close_time: datetime | None = None
    ) -> types_pb2.MarketSnapshot:
        status = self.status
        if (
            status == types_pb2.MARKET_STATUS_OPEN
            and close_time is not None
            and self.exchange_time is not None
            and self.exchange_time >= close_time
        ):
            # No channel announces a close: an instant at or after the close time is closed.
            status = types_pb2.MARKET_STATUS_CLOSED
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
            status=status,
        )
        top.apply_to(snapshot)
        return snapshot


@dataclass(frozen=True, slots=True)
class _UnplacedBook:
    kind: ingest_service_pb2.OrderBookCheckpointKind.ValueType
    yes: dict[int, int]
    no: dict[int, int]
    sequence: int | None
    receive_time: datetime


@dataclass(slots=True)
class _Subscription:
    channel: str
    tickers: set[str] | None = None  # the markets it carries; None = all
    last_seq: int = 0
    last_trade_time: datetime | None = None  # of the newest trade frame on this sid
    last_book_time: datetime | None = None  # of the newest order-book change on this sid


@dataclass
class LiveSession:
    """The protocol state of one connection, free of I/O: frames in, items and commands out."""

    tickers: list[str] | None
    channels: Sequence[str]
    # The last REST snapshot of each market: live state starts from it, so a book or ticker
    # message never shows a market without the fields the other channels carry.
    known: dict[str, types_pb2.MarketSnapshot]
    stats: WebSocketStats
    # Each market's close time, where REST gave one (shared with the client, which updates it).
    close_times: dict[str, datetime] = field(default_factory=dict)
    outbox: list[dict[str, Any]] = field(default_factory=list)
    markets: dict[str, _Market] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)  # markets with an unemitted instant
    # At most the exchange time of every pending instant (a bound, not the minimum: emitting
    # leaves it as it was), so a frame of the same instant need not look through ``pending``.
    oldest_pending: datetime | None = None
    subscriptions: dict[int, _Subscription] = field(default_factory=dict)
    commands: dict[int, dict[str, Any]] = field(default_factory=dict)
    awaiting_books: set[str] = field(default_factory=set)
    unrecovered_books: list[types_pb2.FeedGap] = field(default_factory=list)
    resync: RestResync | None = None  # REST reads asked for and not yet taken
    stale_marks: int = 0
    next_id: int = 1
    subscribing: set[str] = field(default_factory=set)  # channels subscribed, not yet confirmed
    # Full books received and not yet placed in time (see _on_book_snapshot): ticker → book.
    unplaced_books: dict[str, _UnplacedBook] = field(default_factory=dict)
    checkpoints: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    # The newest exchange time this connection (or an earlier one of the client) showed.
    clock: datetime | None = None

    def __post_init__(self) -> None:
        self._last_time: tuple[int, datetime] | None = None  # see _time_of_ms
        self._covered = None if self.tickers is None else set(self.tickers)
        # Anything the socket sends happened after the REST reads that seeded it.
        self._opened_at = max(
            (t for s in self.known.values() if (t := _time_of(s)) is not None), default=None
        )
        self._advance_clock(self._opened_at)

    def _time_of_ms(self, ts_ms: int) -> datetime:
        """``from_epoch_ms``, remembering the last one: the frames of one exchange instant (a
        dozen or more on a busy feed) share their ``ts_ms``."""
        last = self._last_time
        if last is not None and last[0] == ts_ms:
            return last[1]
        moment = from_epoch_ms(ts_ms)
        self._last_time = (ts_ms, moment)
        return moment

    def _advance_clock(self, moment: datetime | None) -> None:
        if moment is not None and (self.clock is None or moment > self.clock):
            self.clock = moment

    # -- commands ------------------------------------------------------------------------------

    def send(self, cmd: str, params: dict[str, Any]) -> None:
        command = {"id": self.next_id, "cmd": cmd, "params": params}
        self.commands[self.next_id] = command
        self.next_id += 1
        self.outbox.append(command)

    def subscribe(self, channel: str) -> None:
        params: dict[str, Any] = {"channels": [channel]}
        # market_lifecycle_v2 takes no market filter: it always carries every market.
        if self.tickers is not None and channel != LIFECYCLE:
            params["market_tickers"] = list(self.tickers)
        if channel == ORDERBOOK:
            self.awaiting_books |= set(self.tickers or ())
        self.subscribing.add(channel)
        self.send("subscribe", params)

    def subscribe_all(self) -> None:
        for channel in self.channels:
            if channel == ORDERBOOK and self.tickers is None:
                logger.info("order books need market tickers; quotes come from the ticker channel")
                continue
            if self.tickers == [] and channel != LIFECYCLE:
                continue  # no market yet: subscribed when the first is added
            self.subscribe(channel)

    def update_markets(
        self, added: Mapping[str, types_pb2.MarketSnapshot], removed: Iterable[str]
    ) -> list[FeedItem]:
        """Follow the ``added`` markets too (their live state starts from these REST snapshots)
        and stop following ``removed``. The subscriptions are edited in place
        (``update_subscription``), so nothing is lost to a reconnect. The LOST markers of the
        removed markets' books, which stop being recorded, and the order-book gaps closed by
        their leaving (see :meth:`_books_recovered`)."""
        if self.tickers is None:
            return []  # subscribed to every market already
        gone = set(removed) & set(self.tickers)
        new = {ticker: seed for ticker, seed in added.items() if ticker not in self.tickers}
        self.tickers = sorted((set(self.tickers) - gone) | set(new))
        self._covered = set(self.tickers)
        for ticker, seed in new.items():
            self.known[ticker] = seed
            self.markets.pop(ticker, None)
        now = datetime.now(UTC)
        stopped: list[FeedItem] = [*self.lost_books(sorted(gone), now)]
        for ticker in gone:
            self.known.pop(ticker, None)
            self.markets.pop(ticker, None)
            self.pending.discard(ticker)
            self.awaiting_books.discard(ticker)
            if self.resync is not None:
                self.resync.tickers.discard(ticker)
        self._sync_subscriptions()
        if gone:
            # A dropped market's snapshot never comes: its resync must not hold the gaps open.
            stopped += self._books_recovered(now)
        return stopped

    def _sync_subscriptions(self) -> None:
        """Make every confirmed subscription carry exactly the followed markets; subscribe the
        channels that have none yet."""
        wanted = set(self.tickers or ())
        for sid, subscription in self.subscriptions.items():
            if subscription.tickers is None:
                continue
            for action, tickers in (
                ("add_markets", wanted - subscription.tickers),
                ("delete_markets", subscription.tickers - wanted),
            ):
                if not tickers:
                    continue
                params = {"sids": [sid], "market_tickers": sorted(tickers), "action": action}
                self.send("update_subscription", params)
                if action == "add_markets":
                    subscription.tickers |= tickers
                    if subscription.channel == ORDERBOOK:
                        self.awaiting_books |= tickers  # a snapshot comes for each added market
                else:
                    subscription.tickers -= tickers
        if not wanted:
            return
        carried = {s.channel for s in self.subscriptions.values()} | self.subscribing
        for channel in self.channels:
            if channel not in carried:
                self.subscribe(channel)

    # -- REST reads ----------------------------------------------------------------------------

    def resume(self, previous: LiveSession) -> None:
        """Carry on after ``previous`` lost its socket: everything sent while no socket was open
        is lost without a sequence gap to show it, so every market is read again over REST with
        the trades since the last one received, and ``previous``'s unfinished repairs go along:
        its REST reads, and its order-book gaps, recovered once this session's books are fresh
        (see :meth:`carry_book_gaps`)."""
        carried = previous.take_resync() or RestResync()
        self.carry_book_gaps(previous.unrecovered_books)
        newest_trade = max(
            (s.last_trade_time for s in previous.subscriptions.values() if s.last_trade_time),
            default=None,
        )
        carried.merge(RestResync(trades_since=newest_trade or previous._opened_at or _BEGINNING))
        self._resync().merge(carried)
        self._want_markets(previous.markets, status=True)
        self._advance_clock(previous.clock)

    def carry_book_gaps(self, gaps: Iterable[types_pb2.FeedGap]) -> None:
        """Order-book gaps an earlier connection (or an earlier process: docs/INGEST_RULES.md,
        "Feed gaps") left unrecovered: recovered, like this session's own, once every book it
        follows is fresh — each a full book recorded (START) after the gap."""
        self.unrecovered_books += gaps

    def take_resync(self) -> RestResync | None:
        """The REST reads asked for since the last call, for the client to make."""
        resync, self.resync = self.resync, None
        if resync is not None:
            resync.generation = self.stale_marks
        return resync

    def retry_resync(self, resync: RestResync) -> None:
        """A taken request could not be read: ask for it again."""
        self._resync().merge(resync)

    def apply_resync(
        self,
        resync: RestResync,
        markets: Iterable[KalshiMarket],
        trades: Iterable[KalshiTrade],
        now: datetime,
    ) -> list[FeedItem]:
        """Apply what REST returned for ``resync``: snapshots, the lost trades, markets (for
        their metadata) and, once every market is repaired, the recovered gaps."""
        items: list[FeedItem] = []
        behind: set[str] = set()
        for market in markets:
            if market.ticker not in resync.tickers:
                continue
            try:
                snapshot = snapshot_from_market(market, now)
            except FixedPointError as exc:
                logger.error("REST market %s unusable: %s", market.ticker, exc)
                continue
            items.append(market)
            items += self._take_rest(snapshot, resync.generation, behind)
        for trade in trades:
            if self._covered is not None and trade.market not in self._covered:
                continue
            try:
                items.append(trade_message(trade))
            except FixedPointError as exc:
                logger.error("skipping REST trade %s: %s", trade.trade_id, exc)
        self.stats.rest_resyncs += 1
        if behind:
            # The socket moved on while REST answered: read those markets again.
            self._resync().merge(RestResync(tickers=behind, gaps=resync.gaps))
            return items
        return items + self._recovered(resync.gaps, now)

    def _take_rest(
        self, snapshot: types_pb2.MarketSnapshot, generation: int, behind: set[str]
    ) -> list[FeedItem]:
        state = self.market(snapshot.ticker)
        rest_time = _time_of(snapshot)
        if rest_time is None:
            return []  # without the exchange's time it cannot be placed among the instants
        if state.exchange_time is not None and state.exchange_time > rest_time:
            # Older than what the socket has shown: it cannot repair this market.
            if state.activity_stale or state.status_stale:
                behind.add(snapshot.ticker)
            return []
        state.take(snapshot)
        state.exchange_time = rest_time
        self.pending.discard(snapshot.ticker)  # REST shows that instant (or a later one)
        if state.stale_mark <= generation:
            state.activity_stale = state.status_stale = False
        if state.emitted_time is not None and rest_time <= state.emitted_time:
            return []
        state.emitted_time = rest_time
        return [snapshot]

    def _resync(self) -> RestResync:
        if self.resync is None:
            self.resync = RestResync()
        return self.resync

    def _want_markets(
        self, tickers: Iterable[str], *, status: bool, gap: types_pb2.FeedGap | None = None
    ) -> None:
        """Hold these markets back until REST (or, for activity, a ticker frame) repairs them."""
        self.stale_marks += 1
        request = self._resync()
        for ticker in tickers:
            state = self.market(ticker)
            state.activity_stale = True
            state.status_stale = state.status_stale or status
            state.stale_mark = self.stale_marks
            request.tickers.add(ticker)
        if gap is not None:
            request.gaps.append(gap)

    # -- frames --------------------------------------------------------------------------------

    def market(self, ticker: str) -> _Market:
        state = self.markets.get(ticker)
        if state is None:
            seed = self.known.get(ticker)
            state = self.markets[ticker] = _Market() if seed is None else _Market.seeded(seed)
            if seed is None:
                # Never read over REST: its status and activity are unknown until it is.
                self._want_markets([ticker], status=True)
        return state

    def handle_text(self, raw: str | bytes, now: datetime) -> list[FeedItem]:
        """Apply one frame as the socket delivered it. A delta or ticker frame of the usual shape
        is decoded straight into typed structs (:mod:`.frames`); any other goes through
        ``json.loads`` and :meth:`handle`, which reads the usual ones the same way."""
        usual = decode_usual_frame(raw)
        if usual is not None:
            return self.handle_usual(usual, now)
        try:
            frame = json.loads(raw)
        except ValueError:
            self.stats.bad_frames += 1
            logger.error("skipping a WebSocket frame that is not JSON (%d bytes)", len(raw))
            return []
        if not isinstance(frame, dict):
            return []
        return self.handle(frame, now)

    def handle(self, frame: Mapping[str, Any], now: datetime) -> list[FeedItem]:
        """Apply one frame; the items it completes."""
        kind = frame.get("type")
        msg = frame.get("msg")
        if kind == "subscribed" and isinstance(msg, dict):
            self._on_subscribed(frame.get("id"), int(msg["sid"]), str(msg["channel"]))
            return []
        if kind == "error":
            self._on_error(frame)
            return []
        if kind == "unsubscribed" and isinstance(frame.get("sid"), int):
            self.subscriptions.pop(frame["sid"], None)
            return []
        if kind in ("ok", "unsubscribed") or not isinstance(msg, dict):
            return []
        items: list[FeedItem] = []
        sid, seq = frame.get("sid"), frame.get("seq")
        subscription: _Subscription | None = None
        # (true and false are not numbers, though Python's bool is an int)
        if type(sid) is int and type(seq) is int:
            if not _INT64_MIN <= seq <= _INT64_MAX or not _INT64_MIN <= sid <= _INT64_MAX:
                return self._out_of_range(str(kind), sid, seq, msg.get("market_ticker", ""), now)
            subscription = self._check_sequence(sid, seq, str(kind), now, items)
            if subscription is None:
                return items
        if kind != LIFECYCLE and not self._follows(msg.get("market_ticker")):
            return items  # in flight when the market was deleted from the subscription
        try:
            items += self._dispatch(
                str(kind), msg, seq if type(seq) is int else None, now, subscription
            )
        except (
            ValidationError, FixedPointError, KeyError, TypeError, ValueError, OverflowError
        ) as exc:  # fmt: skip
            items += self._refused(str(kind), sid, msg.get("market_ticker", ""), exc, now)
        return items

    def handle_usual(self, frame: UsualFrame, now: datetime) -> list[FeedItem]:
        """Apply a delta or ticker frame decoded by :func:`.frames.decode_usual_frame`: the same
        as :meth:`handle` of its JSON, without reading a dict (one of these per book change)."""
        items: list[FeedItem] = []
        msg = frame.msg
        kind = ORDERBOOK if type(frame) is BookDeltaFrame else TICKER
        sid, seq = frame.sid, frame.seq
        if not _INT64_MIN <= seq <= _INT64_MAX or not _INT64_MIN <= sid <= _INT64_MAX:
            return self._out_of_range(kind, sid, seq, msg.market_ticker, now)
        subscription = self._check_sequence(sid, seq, kind, now, items)
        if subscription is None:
            return items
        if not self._follows(msg.market_ticker):
            return items  # in flight when the market was deleted from the subscription
        try:
            if isinstance(msg, BookDeltaMsg):
                items += self._on_book_delta(msg, frame.seq, now, subscription)
            else:
                items += self._on_ticker(msg, frame.seq, now)
        except (FixedPointError, KeyError, TypeError, ValueError, OverflowError) as exc:
            # (OverflowError: a time outside what a datetime holds, e.g. ts_ms = 10**20)
            items += self._refused(kind, frame.sid, msg.market_ticker, exc, now)
        return items

    def _out_of_range(
        self, kind: str, sid: int, seq: int, ticker: object, now: datetime
    ) -> list[FeedItem]:
        """A ``sid`` or ``seq`` no sequence number (int64) can hold: refused like any frame
        of an unexpected shape (the book asked for again on its sid, when that one fits)."""
        error = ValueError(f"sid {sid} / seq {seq} out of range")
        return self._refused(
            kind, sid if _INT64_MIN <= sid <= _INT64_MAX else None, ticker, error, now
        )

    def _refused(
        self, kind: str, sid: object, ticker: object, exc: Exception, now: datetime
    ) -> list[FeedItem]:
        """A frame in a shape that cannot be used: counted and logged; a book it may have
        changed is asked for again."""
        self.stats.bad_frames += 1
        logger.error("skipping a %s frame Kalshi sent in an unexpected shape: %s", kind, exc)
        if kind in ("orderbook_snapshot", "orderbook_delta") and type(sid) is int:
            return self._resync_books(sid, [str(ticker)], now)
        return []

    def _follows(self, ticker: object) -> bool:
        return self._covered is None or (isinstance(ticker, str) and ticker in self._covered)

    def _on_subscribed(self, command_id: Any, sid: int, channel: str) -> None:
        command = self.commands.get(command_id) if isinstance(command_id, int) else None
        tickers = command["params"].get("market_tickers") if command is not None else None
        self.subscriptions[sid] = _Subscription(channel, None if tickers is None else set(tickers))
        self.subscribing.discard(channel)
        if tickers is not None and set(tickers) != set(self.tickers or ()):
            self._sync_subscriptions()  # the markets changed while the command was on its way

    def _check_sequence(
        self, sid: int, seq: int, kind: str, now: datetime, items: list[FeedItem]
    ) -> _Subscription | None:
        """Track ``seq`` on ``sid``; None for a frame already seen (dropped)."""
        channel = ORDERBOOK if kind.startswith("orderbook") else kind
        subscription = self.subscriptions.setdefault(sid, _Subscription(channel))
        expected = subscription.last_seq + 1
        if seq < expected:
            logger.debug("dropping repeated frame sid=%d seq=%d", sid, seq)
            return None
        subscription.last_seq = seq
        if seq > expected:
            items.append(self._on_gap(sid, subscription, expected, seq, now, items))
        return subscription

    def _on_gap(
        self,
        sid: int,
        subscription: _Subscription,
        expected: int,
        seq: int,
        now: datetime,
        items: list[FeedItem],
    ) -> types_pb2.FeedGap:
        """Record the gap and start its repair (``items`` gets the books it makes unknown)."""
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
        affected = [only_market] if only_market else (self.tickers or list(self.markets))
        if subscription.channel == ORDERBOOK:
            self.unrecovered_books.append(gap)
            # the lost frame came after the last one received on this sid
            items += self._resync_books(sid, affected, now, subscription.last_book_time)
        elif subscription.channel == TRADE:
            # Trades on one sid arrive in order: the lost ones are no older than the last received.
            since = subscription.last_trade_time or self._opened_at or _BEGINNING
            self._resync().merge(RestResync(trades_since=since, gaps=[gap]))
        else:
            self._want_markets(affected, status=subscription.channel == LIFECYCLE, gap=gap)
        return gap

    def _resync_books(
        self, sid: int, tickers: Sequence[str], now: datetime, seen_until: datetime | None = None
    ) -> list[FeedItem]:
        """Distrust these books and ask the exchange for fresh snapshots of them (Kalshi's
        ``get_snapshot`` takes one sid and the markets to refresh); the LOST markers of the
        books that were being recorded."""
        # (a book received before the lost frame is out of date: lost_books drops it too)
        lost: list[FeedItem] = [*self.lost_books(tickers, now, seen_until)]
        self.awaiting_books |= set(tickers)
        self.send(
            "update_subscription",
            {"sids": [sid], "market_tickers": sorted(tickers), "action": "get_snapshot"},
        )
        return lost

    def lost_books(
        self, tickers: Iterable[str] | None, now: datetime, seen_until: datetime | None = None
    ) -> list[ingest_service_pb2.OrderBookCheckpoint]:
        """Stop trusting these books (None: every book): a LOST marker for each that was being
        recorded, at ``seen_until`` (default: the newest exchange time the connection showed),
        after which a change may have been missed."""
        markers: list[ingest_service_pb2.OrderBookCheckpoint] = []
        for ticker in list(self.markets) if tickers is None else tickers:
            self.unplaced_books.pop(ticker, None)
            state = self.market(ticker)
            if state.recording and state.yes is not None and state.no is not None:
                at = seen_until or self.clock or now
                if state.book_time is not None and state.book_time > at:
                    at = state.book_time
                markers.append(checkpoint(ticker, LOST, at, now, None, state.yes, state.no))
                state.book_time = at
            state.yes = state.no = None
            state.recording = False
        return markers

    def ask_books_again(self) -> None:
        """The awaited book snapshots have not come: ask for them again."""
        logger.warning(
            "book snapshots of %d market(s) still awaited; asking again", len(self.awaiting_books)
        )
        for sid, subscription in self.subscriptions.items():
            if subscription.channel == ORDERBOOK and subscription.tickers is not None:
                self.send("update_subscription", {"sids": [sid], "action": "get_snapshot"})

    def _on_error(self, frame: Mapping[str, Any]) -> None:
        command = self.commands.get(frame.get("id", -1))
        logger.error("Kalshi refused %s: %s", command or "a command", frame.get("msg"))
        if command is None or command["params"].get("action") not in (
            "get_snapshot",
            "add_markets",
            "delete_markets",
        ):
            return
        # No snapshot on demand, or no editing of the market list: a new subscription of the
        # followed markets starts with fresh snapshots.
        sids = command["params"]["sids"]
        channels = {self.subscriptions[sid].channel for sid in sids if sid in self.subscriptions}
        for sid in sids:
            if sid in self.subscriptions:
                self.subscriptions[sid].tickers = None  # leaving: no more edits
        self.send("unsubscribe", {"sids": sids})
        for channel in channels or {ORDERBOOK}:
            self.subscribe(channel)

    def _dispatch(
        self,
        kind: str,
        msg: Mapping[str, Any],
        seq: int | None,
        now: datetime,
        subscription: _Subscription | None,
    ) -> list[FeedItem]:
        if kind == TRADE:
            trade = KalshiTrade.model_validate(msg)
            if subscription is not None:
                subscription.last_trade_time = trade.time
            self._advance_clock(trade.time)
            return [trade_message(trade)]
        if kind == LIFECYCLE:
            return self._on_lifecycle(msg, now)
        if kind == "orderbook_snapshot":
            return self._on_book_snapshot(_BookSnapshotMsg.model_validate(msg), seq, now)
        if kind == ORDERBOOK:
            return self._on_book_delta(_book_delta(msg), seq, now, subscription)
        if kind == TICKER:
            return self._on_ticker(_TickerMsg.model_validate(msg), seq, now)
        logger.debug("ignoring a %s frame", kind)
        return []

    def _on_book_snapshot(
        self, book: _BookSnapshotMsg, seq: int | None, now: datetime
    ) -> list[FeedItem]:
        """A full book. It carries no exchange time but holds every change the socket sent
        before it, so it is recorded at the connection's clock (the newest exchange time seen);
        the next instant shows it in a snapshot."""
        yes, no = book_side(book.yes_dollars_fp or []), book_side(book.no_dollars_fp or [])
        ticker = book.market_ticker
        state = self.market(ticker)
        state.yes, state.no = yes, no
        kind = RESYNC if state.book_started else START
        state.book_started = True
        # When the exchange took it is unknown: after every change the socket sent before it
        # (some of which a gap or a reconnection may have lost), before the next timed frame.
        # It is placed just before that frame's time (see _place_books); until then the book
        # is used for quotes but not recorded.
        state.recording = False
        self.unplaced_books[ticker] = _UnplacedBook(kind, dict(yes), dict(no), seq, now)
        return self._on_fresh_book(ticker, now)

    def _place_books(self, exchange_time: datetime) -> list[FeedItem]:
        """Record the unplaced full books 1 µs before ``exchange_time``, the time of the first
        frame after them (Kalshi's times are whole milliseconds, so no change is in between);
        the changes since (none, with a time) are applied to them already."""
        items: list[FeedItem] = []
        at = exchange_time - _JUST_BEFORE
        for ticker, book in self.unplaced_books.items():
            state = self.market(ticker)
            if state.yes is None or state.no is None:
                continue
            if state.book_time is not None and state.book_time > at:
                at_market = state.book_time
            else:
                at_market = at
            items.append(
                checkpoint(
                    ticker,
                    book.kind,
                    at_market,
                    book.receive_time,
                    book.sequence,
                    book.yes,
                    book.no,
                )
            )
            state.recording = True
            state.book_time = state.checkpoint_time = at_market
            state.changes_since_checkpoint = 0
        self.unplaced_books.clear()
        return items

    def _on_book_delta(
        self,
        delta: _BookDelta | BookDeltaMsg,
        seq: int | None,
        now: datetime,
        subscription: _Subscription | None,
    ) -> list[FeedItem]:
        """A level moved: the new size is recorded (a periodic checkpoint first when due)."""
        ts_ms = delta.ts_ms
        exchange_time = None if ts_ms is None else self._time_of_ms(ts_ms)
        if subscription is not None and exchange_time is not None:
            subscription.last_book_time = exchange_time
        ticker = delta.market_ticker
        items = self._touch(ticker, exchange_time, seq, now)
        state = self.market(ticker)
        yes, no = state.yes, state.no
        if yes is None or no is None:
            return items  # a stale book waits for its snapshot
        side = yes if delta.side == "yes" else no
        at = exchange_time or self.clock or now
        if state.book_time is not None and at < state.book_time:
            at = state.book_time  # never before the checkpoint it follows
        if state.recording:
            items += self._periodic_checkpoint(ticker, state, yes, no, at, now)
        price = parse_price(delta.price_dollars)
        size = max(0, side.get(price, 0) + parse_count(delta.delta_fp))
        if size:
            side[price] = size
        else:
            side.pop(price, None)
        if not state.recording:
            return items
        state.book_time = at
        state.changes_since_checkpoint += 1
        items.append(
            BookChange(
                ticker,
                # (Kalshi's times are whole milliseconds: the usual case needs no datetime sums)
                ts_ms * 1_000 if at is exchange_time and ts_ms is not None else micros(at),
                micros(now),
                seq or 0,
                types_pb2.SIDE_YES if delta.side == "yes" else types_pb2.SIDE_NO,
                price,
                size,
            )
        )
        return items

    def _periodic_checkpoint(
        self,
        ticker: str,
        state: _Market,
        yes: dict[int, int],
        no: dict[int, int],
        at: datetime,
        now: datetime,
    ) -> list[FeedItem]:
        """The book as the changes built it, when one is due and ``at`` starts a new instant
        (a checkpoint holds every change at or before its time, so never mid-instant)."""
        book_time, since = state.book_time, state.checkpoint_time
        if book_time is None or since is None or at <= book_time:
            return []
        policy = self.checkpoints
        if (
            state.changes_since_checkpoint < policy.every_changes
            and (book_time - since).total_seconds() < policy.every_seconds
        ):
            return []
        state.checkpoint_time = book_time
        state.changes_since_checkpoint = 0
        return [checkpoint(ticker, PERIODIC, book_time, now, None, yes, no)]

    def _on_ticker(
        self, tick: _TickerMsg | TickerMsg, seq: int | None, now: datetime
    ) -> list[FeedItem]:
        ticker, time = tick.market_ticker, _exchange_time(tick.ts_ms, tick.ts)
        state = self.market(ticker)
        if time is not None and state.activity_time is not None and time < state.activity_time:
            return []  # REST already showed a later state
        items = self._touch(ticker, time, seq, now)
        state.quote = TopOfBook.from_quote(
            price_or_legacy(tick.yes_bid_dollars, tick.yes_bid),
            count_or_legacy(tick.yes_bid_size_fp, None),
            price_or_legacy(tick.yes_ask_dollars, tick.yes_ask),
            count_or_legacy(tick.yes_ask_size_fp, None),
        )
        state.last_price = price_or_legacy(tick.price_dollars, tick.price)
        state.volume = count_or_legacy(tick.volume_fp, tick.volume)
        state.open_interest = count_or_legacy(tick.open_interest_fp, tick.open_interest)
        state.activity_time = time
        # Every field of a ticker frame is a full value and the frame is newer than any lost
        # on its sid, so the activity is exact again.
        state.activity_stale = False
        if ticker in self.pending and state.exchange_time == time:
            state.ticker_seen = True
            items += self.flush(ticker)
        return items

    def _on_lifecycle(self, msg: Mapping[str, Any], now: datetime) -> list[FeedItem]:
        ticker, event_type = str(msg["market_ticker"]), str(msg.get("event_type", ""))
        if self._covered is not None and ticker not in self._covered:
            return []  # the channel carries every market; this one is not followed
        status = _STATUS_AFTER_EVENT.get(event_type)
        if status is not None:
            self.market(ticker).status = status
            if ticker in self.known:
                self.known[ticker].status = status
        return [LifecycleEvent(ticker, event_type, now, dict(msg))]

    def _touch(
        self, ticker: str, exchange_time: datetime | None, seq: int | None, now: datetime
    ) -> list[FeedItem]:
        """Mark ``ticker`` changed at ``exchange_time``. Pending instants before it are complete
        and emitted first, so that one snapshot describes one exchange instant. Full books
        waiting for a time are placed before it."""
        placed = (
            self._place_books(exchange_time)
            if self.unplaced_books and exchange_time is not None
            else []
        )
        state = self.market(ticker)
        if (
            exchange_time is not None
            and state.emitted_time is not None
            and exchange_time <= state.emitted_time
        ):
            return placed  # an instant already shown (a REST read can overtake the socket)
        items: list[FeedItem] = placed
        oldest = self.oldest_pending
        if exchange_time is not None and oldest is not None and oldest < exchange_time:
            earlier = [
                name
                for name in self.pending
                if (pending_time := self.markets[name].exchange_time) is not None
                and pending_time < exchange_time
            ]
            for name in earlier:
                items += self.flush(name)
            self.oldest_pending = min(
                (t for name in self.pending if (t := self.markets[name].exchange_time) is not None),
                default=None,
            )
        if ticker in self.pending and exchange_time != state.exchange_time:
            items += self.flush(ticker)
        if ticker not in self.pending:
            self.pending.add(ticker)
            state.ticker_seen = False
        state.exchange_time = exchange_time
        if exchange_time is not None and (
            self.oldest_pending is None or exchange_time < self.oldest_pending
        ):
            self.oldest_pending = exchange_time
        state.receive_time = now
        state.sequence = seq
        self._advance_clock(exchange_time)
        return items

    def _on_fresh_book(self, ticker: str, now: datetime) -> list[FeedItem]:
        self.awaiting_books.discard(ticker)
        return self._books_recovered(now)

    def _books_recovered(self, now: datetime) -> list[FeedItem]:
        """The order-book gaps, recovered, once no book is awaited: every followed market's book
        is fresh again, and a dropped market's ends at its LOST marker (docs/INGEST_RULES.md,
        "Feed gaps")."""
        if self.awaiting_books or not self.unrecovered_books:
            return []
        logger.info("order books re-synchronised after %d gap(s)", len(self.unrecovered_books))
        recovered = self._recovered(self.unrecovered_books, now)
        self.unrecovered_books = []
        return recovered

    def _recovered(self, gaps: Sequence[types_pb2.FeedGap], now: datetime) -> list[FeedItem]:
        """The gaps again, marked recovered."""
        recovered: list[FeedItem] = []
        for gap in gaps:
            # A new message: the unrecovered one was already handed out and may be in flight.
            done = types_pb2.FeedGap()
            done.CopyFrom(gap)
            done.recovered = True
            done.recover_time.FromDatetime(now)
            recovered.append(done)
        self.stats.gaps_recovered += len(recovered)
        return recovered

    def _shown_top(self, ticker: str, state: _Market) -> TopOfBook | None:
        """The quote of ``ticker``'s pending instant, or None when it cannot be shown exactly."""
        if state.status_stale:
            return None
        if state.ticker_seen:
            return state.quote  # the exchange's own summary of this instant
        top = state.book_top()
        if top is None or state.activity_stale:
            return None
        if TICKER in self.channels and top != state.quote:
            # The top moved, so the ticker channel reported this instant: that frame was lost.
            self._want_markets([ticker], status=False)
            return None
        return top

    def flush(self, ticker: str | None = None) -> list[FeedItem]:
        """Emit the pending instant of ``ticker`` (or of every market) when it is exact."""
        names = [ticker] if ticker is not None else sorted(self.pending)
        items: list[FeedItem] = []
        for name in names:
            if name not in self.pending:
                continue
            self.pending.discard(name)
            state = self.markets[name]
            top = self._shown_top(name, state)
            if top is not None:
                items.append(state.snapshot(name, top, self.close_times.get(name)))
                state.emitted_time = state.exchange_time
        return items
