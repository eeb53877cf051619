"""The ingest modes: ``poll``, ``ws`` and ``backfill``, over a selection of markets.

Every mode reads Kalshi through :class:`~kfeed_ingest.kalshi.rest.KalshiRestClient` (and the
WebSocket client in ``ws`` mode), normalises to ``kfeed.v1`` messages and hands batches to the
:class:`~kfeed_ingest.publisher.Publisher`. A failed read (after the REST client's retries) is
logged and skipped; the pass goes on. ``once`` runs a single pass and reports whether everything
read was acknowledged by the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import grpc

from kfeed.v1 import ingest_service_pb2, types_pb2
from kfeed_ingest.columns import snapshot_columns
from kfeed_ingest.kalshi.books import (
    START,
    BookChange,
    CheckpointPolicy,
    change_columns,
    checkpoint,
    recorded_change_columns,
)
from kfeed_ingest.kalshi.models import KalshiEvent, KalshiMarket, KalshiTrade
from kfeed_ingest.kalshi.normalise import (
    FixedPointError,
    SnapshotDeduper,
    event_message,
    market_message,
    market_status,
    now_utc,
    orderbook_sides,
    series_message,
    snapshot_from_candlestick,
    snapshot_from_market,
    trade_message,
)
from kfeed_ingest.kalshi.rest import KalshiError, KalshiRestClient
from kfeed_ingest.kalshi.signing import KalshiCredentials
from kfeed_ingest.kalshi.websocket import FeedItem, KalshiWebSocketClient, LifecycleEvent
from kfeed_ingest.publisher import Publisher
from kfeed_ingest.server_state import ServerState, StoredMarket

logger = logging.getLogger(__name__)

Mode = Literal["poll", "ws", "backfill"]
_TICKERS_PER_REQUEST = 100  # keeps `?tickers=` well under URL length limits
# A market is read again this long after its close time (the exchange has closed it by then).
CLOSE_READ_DELAY = timedelta(seconds=1)
_MAX_CANDLES_PER_REQUEST = 5000
# A market finalized while its last trades still had the WebSocket's whole seconds (the earlier
# process stopped before its next REST listing) gets those trades read again by a process that
# starts within this long of them.
_FINAL_TRADES_REREAD = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class MarketSelection:
    """Which markets to ingest. Empty everywhere = every open market.

    ``statuses`` use Kalshi's filter vocabulary (``unopened, open, paused, closed, settled``).
    """

    series: tuple[str, ...] = ()
    events: tuple[str, ...] = ()
    tickers: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()

    @property
    def is_everything(self) -> bool:
        """True when no series, event or ticker narrows the selection."""
        return not (self.series or self.events or self.tickers)

    def covers(self, market: StoredMarket) -> bool:
        """Whether a stored market belongs to the selection (statuses aside)."""
        return (
            self.is_everything
            or market.ticker in self.tickers
            or market.event_ticker in self.events
            or market.series_ticker in self.series
        )


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How a mode runs (the CLI fills these from flags)."""

    poll_interval: float = 5.0
    batch_rows: int = 500
    linger: float = 0.2
    discovery_interval: float = 60.0
    flush_timeout: float = 60.0
    once_ws_timeout: float = 30.0
    candle_period_minutes: int = 60
    book_checkpoints: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    poll_books: bool = True
    # ws mode, on a graceful stop: seconds the pending gap-repair reads may take.
    repair_grace: float = 2.0


@dataclass(slots=True)
class RunReport:
    """What a pass read and whether it all got through."""

    read_errors: int = 0
    rows: int = 0
    rejected: int = 0
    unacked: int = 0

    @property
    def ok(self) -> bool:
        """True when everything read was acknowledged and nothing failed to read."""
        return self.read_errors == 0 and self.rejected == 0 and self.unacked == 0


Row = (
    types_pb2.Series
    | types_pb2.Event
    | types_pb2.Market
    | types_pb2.MarketSnapshot
    | types_pb2.Trade
    | types_pb2.FeedGap
    | BookChange
    | ingest_service_pb2.OrderBookCheckpoint
)


def _add_row(
    request: ingest_service_pb2.PublishRequest,
    message: types_pb2.Series
    | types_pb2.Event
    | types_pb2.Market
    | types_pb2.MarketSnapshot
    | types_pb2.Trade
    | types_pb2.FeedGap
    | ingest_service_pb2.OrderBookCheckpoint,
) -> None:
    if isinstance(message, types_pb2.Series):
        request.series.append(message)
    elif isinstance(message, types_pb2.Event):
        request.events.append(message)
    elif isinstance(message, types_pb2.Market):
        request.markets.append(message)
    elif isinstance(message, types_pb2.MarketSnapshot):
        request.snapshots.append(message)
    elif isinstance(message, types_pb2.Trade):
        request.trades.append(message)
    elif isinstance(message, ingest_service_pb2.OrderBookCheckpoint):
        request.book_checkpoints.append(message)
    else:
        request.feed_gaps.append(message)


def _recorded_rows(rows: Sequence[Row]) -> ingest_service_pb2.PublishRequest:
    """``rows`` as one request to record in the spool: book changes as columns without a
    dictionary (merged records stay valid), everything else as messages."""
    request = ingest_service_pb2.PublishRequest()
    changes = [row for row in rows if isinstance(row, BookChange)]
    if changes:
        request.book_changes.CopyFrom(recorded_change_columns(changes))
    if len(changes) < len(rows):
        for row in rows:
            if not isinstance(row, BookChange):
                _add_row(request, row)
    return request


@dataclass(slots=True)
class _Batch:
    batch_id: int
    request: ingest_service_pb2.PublishRequest = field(
        default_factory=ingest_service_pb2.PublishRequest
    )
    # Sent as the request's snapshot_columns, which the server reads several times faster.
    snapshots: list[types_pb2.MarketSnapshot] = field(default_factory=list)
    # Sent as the request's book_changes columns.
    book_changes: list[BookChange] = field(default_factory=list)
    trade_ids: set[str] = field(default_factory=set)
    rows: int = 0
    # Rows added but not in the spool yet (recorded together, see BatchSink), and whether an
    # earlier record of this batch exists (the first one carries the producer).
    unrecorded: list[Row] = field(default_factory=list)
    recorded: bool = False


class BatchSink:
    """Collects messages into ``PublishRequest`` batches of at most ``batch_rows`` rows.

    Rows reach the spool as they are read (see :meth:`Spool.record_rows`): the rows added while
    the event loop is busy are recorded together, in one write, as soon as the ingest next waits
    (for its socket, the server, Kalshi's REST API), and before the batch is published. So a
    process killed while a batch is being collected loses none of the rows it made before it
    last waited: at most those made from one read of the socket. Batches are published one at a
    time, in the order they were collected.
    """

    def __init__(self, publisher: Publisher, batch_rows: int) -> None:
        self._publisher = publisher
        self._spool = publisher.spool
        self._batch_rows = batch_rows
        self._batch: _Batch | None = None
        self._publishing = asyncio.Lock()
        self.rows = 0

    async def add(self, message: Row) -> None:
        """Add one message (recorded in the spool when the loop next turns); publishes the
        batch when full."""
        if (
            isinstance(message, types_pb2.Trade)
            and self._batch is not None
            and message.trade_id in self._batch.trade_ids
        ):
            # The same trade read twice (WebSocket, then REST with its exact time): the server
            # refuses one id twice in a batch, so the second copy starts the next batch.
            await self.flush()
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch(self._spool.reserve_batch_id())
            batch.request.producer = self._publisher.producer
        if not batch.unrecorded:
            asyncio.get_running_loop().call_soon(self._record, batch)
        batch.unrecorded.append(message)
        if isinstance(message, types_pb2.MarketSnapshot):
            batch.snapshots.append(message)
        elif isinstance(message, BookChange):
            batch.book_changes.append(message)
        else:
            if isinstance(message, types_pb2.Trade):
                batch.trade_ids.add(message.trade_id)
            _add_row(batch.request, message)
        batch.rows += 1
        self.rows += 1
        if batch.rows >= self._batch_rows:
            await self.flush()

    def _record(self, batch: _Batch) -> None:
        """Write ``batch``'s unrecorded rows to the spool (one record)."""
        rows, batch.unrecorded = batch.unrecorded, []
        if not rows:
            return
        request = _recorded_rows(rows)
        if not batch.recorded:
            request.producer = self._publisher.producer
            batch.recorded = True
        self._spool.record_rows(batch.batch_id, request)

    async def flush(self) -> None:
        """Publish what has been collected (nothing if empty)."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        self._record(batch)  # safe in the spool while an earlier batch is being published
        if batch.snapshots:
            batch.request.snapshot_columns.CopyFrom(snapshot_columns(batch.snapshots))
        if batch.book_changes:
            batch.request.book_changes.CopyFrom(change_columns(batch.book_changes))
        batch.request.batch_id = batch.batch_id
        # One at a time: a later batch must not reach the spool (and the server) first.
        async with self._publishing:
            await self._publisher.publish(batch.request)


class _Changed:
    """Remembers the last version of each metadata record sent, to send only changes."""

    def __init__(self) -> None:
        self._sent: dict[tuple[str, str], bytes] = {}

    def __call__(
        self, kind: str, key: str, message: types_pb2.Series | types_pb2.Event | types_pb2.Market
    ) -> bool:
        content = message.SerializeToString(deterministic=True)
        if self._sent.get((kind, key)) == content:
            return False
        self._sent[(kind, key)] = content
        return True


def _micros(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _unix(moment: datetime) -> int:
    return int(moment.timestamp())


def _chunks(items: Sequence[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class Ingestor:
    """Runs the modes over one REST client and one publisher."""

    def __init__(
        self,
        rest: KalshiRestClient,
        publisher: Publisher,
        selection: MarketSelection,
        options: RunOptions | None = None,
        server_state: ServerState | None = None,
    ) -> None:
        self.rest = rest
        self.publisher = publisher
        self.selection = selection
        self.options = options or RunOptions()
        self.report = RunReport()
        self.sink = BatchSink(publisher, self.options.batch_rows)
        self._snapshots = SnapshotDeduper()
        self._changed = _Changed()
        self._events: dict[str, KalshiEvent] = {}
        self._series_seen: set[str] = set()
        # Every market seen and not finalized yet, as last read: each pass reads it again, listed
        # or not, until it is finalized (with its result, settlement value and time).
        self.followed: dict[str, KalshiMarket] = {}
        # Resuming after an earlier process: what the server holds (read once it answers).
        self._server_state = server_state
        self._resumed = server_state is None
        self._to_read: set[str] = set()  # markets to read in the next pass, listed or not
        # Per market, where its trades are read back from (the newest stored one's time).
        self._read_back: dict[str, datetime | None] = {}
        # Per REST trade listing (a ticker, or None for all markets): the newest create time
        # read so far; each pass reads on from there.
        self._trades_read_until: dict[str | None, datetime] = {}
        # Where trade listings start in a fresh process: the exchange's clock at the first pass
        # (the newest `updated_time` it showed), so a skewed local clock loses nothing.
        self._trades_start: datetime | None = None
        self._server_had_markets = False  # an earlier process stored data (not a first run)
        # Finalized since the last trade listing: listed once more, for their last trades.
        self._just_final: set[str] = set()
        # Feed gaps an earlier process left unrecovered (on the server or in the spool), to
        # repair: order-book ones by this process's first fresh books, the others by the first
        # pass that reads their markets and trades again without an error (and the trades from
        # before each gap: ``_gap_read_back``). Only gaps detected before this process started
        # are an earlier process's.
        self._started = now_utc()
        self._open_book_gaps: list[types_pb2.FeedGap] = []
        self._open_gaps: list[types_pb2.FeedGap] = []
        self._gap_read_back: dict[str, datetime | None] = {}

    # -- reading, with failures logged and skipped --------------------------------------------

    async def _collect(self, source: AsyncIterator[KalshiMarket]) -> list[KalshiMarket]:
        markets: list[KalshiMarket] = []
        try:
            async for market in source:
                markets.append(market)
        except KalshiError as exc:
            self.report.read_errors += 1
            logger.error("skipping a market listing: %s", exc)
        return markets

    async def discover(
        self,
        *,
        historical: bool = False,
        min_close: datetime | None = None,
        max_close: datetime | None = None,
        default_status: str | None = "open",
    ) -> dict[str, KalshiMarket]:
        """The selected markets, by ticker (one listing per status, event and series)."""
        selection = self.selection
        statuses: Sequence[str | None] = selection.statuses or (
            (default_status,) if selection.is_everything else (None,)
        )
        min_ts = _unix(min_close) if min_close else None
        max_ts = _unix(max_close) if max_close else None

        def listing(
            status: str | None, *, event: str | None = None, series: str | None = None
        ) -> AsyncIterator[KalshiMarket]:
            return self.rest.iter_markets(
                status=status,
                event_ticker=event,
                series_ticker=series,
                min_close_ts=min_ts,
                max_close_ts=max_ts,
                historical=historical,
            )

        found: dict[str, KalshiMarket] = {}
        for status in statuses:
            # Named tickers are wanted whenever they closed, so no close-time bounds for them.
            listings = [
                self.rest.iter_markets(status=status, tickers=chunk, historical=historical)
                for chunk in _chunks(selection.tickers, _TICKERS_PER_REQUEST)
            ]
            listings += [listing(status, event=event) for event in selection.events]
            listings += [listing(status, series=series) for series in selection.series]
            if selection.is_everything:
                listings.append(listing(status))
            for source in listings:
                found.update((m.ticker, m) for m in await self._collect(source))
        return found

    async def _series_of(self, market: KalshiMarket) -> str:
        """The market's series ticker, from its event (fetched once); sends new metadata."""
        if market.series_ticker:
            return market.series_ticker
        event = self._events.get(market.event_ticker)
        if event is None and market.event_ticker:
            try:
                event = await self.rest.get_event(market.event_ticker)
            except KalshiError as exc:
                self.report.read_errors += 1
                logger.error("event %s unavailable: %s", market.event_ticker, exc)
                return ""
            self._events[market.event_ticker] = event
            await self._send_series(event.series_ticker)
            message = event_message(event)
            if self._changed("event", event.event_ticker, message):
                await self.sink.add(message)
        return event.series_ticker if event is not None else ""

    async def _send_series(self, series_ticker: str) -> None:
        if not series_ticker or series_ticker in self._series_seen:
            return
        self._series_seen.add(series_ticker)
        try:
            series = await self.rest.get_series(series_ticker)
        except KalshiError as exc:
            self.report.read_errors += 1
            logger.error("series %s unavailable: %s", series_ticker, exc)
            return
        await self.sink.add(series_message(series))

    async def send_market(self, market: KalshiMarket) -> str:
        """Send the market's metadata (and its event's and series') when changed; its series.

        The market is followed until it is finalized."""
        if market_status(market.status) == types_pb2.MARKET_STATUS_FINALIZED:
            if self.followed.pop(market.ticker, None) is not None:
                self._just_final.add(market.ticker)
        else:
            self.followed[market.ticker] = market
        series_ticker = await self._series_of(market)
        try:
            message = market_message(market, series_ticker)
        except FixedPointError as exc:
            self.report.read_errors += 1
            logger.error("skipping market %s: %s", market.ticker, exc)
            return series_ticker
        if self._changed("market", market.ticker, message):
            await self.sink.add(message)
        return series_ticker

    async def send_snapshot(self, snapshot: types_pb2.MarketSnapshot) -> None:
        """Send ``snapshot`` unless it repeats the last one of its market."""
        if self._snapshots.admit(snapshot):
            await self.sink.add(snapshot)

    async def _send_trades(self, trades: AsyncIterator[KalshiTrade], seen: set[str]) -> None:
        try:
            async for trade in trades:
                if trade.trade_id in seen:
                    continue
                seen.add(trade.trade_id)
                try:
                    await self.sink.add(trade_message(trade))
                except FixedPointError as exc:
                    self.report.read_errors += 1
                    logger.error("skipping trade %s: %s", trade.trade_id, exc)
        except KalshiError as exc:
            self.report.read_errors += 1
            logger.error("skipping a trade listing: %s", exc)

    # -- poll ----------------------------------------------------------------------------------

    async def _read_followed(self, listed: Iterable[str]) -> dict[str, KalshiMarket]:
        """The followed markets a listing no longer shows (closed, determined: not final yet),
        read by ticker on the live tier, then the historical one for those it lacks."""
        missing = sorted((set(self.followed) | self._to_read) - set(listed))
        self._to_read.clear()
        found: dict[str, KalshiMarket] = {}
        for historical in (False, True):
            for chunk in _chunks([t for t in missing if t not in found], _TICKERS_PER_REQUEST):
                source = self.rest.iter_markets(tickers=chunk, historical=historical)
                found.update((m.ticker, m) for m in await self._collect(source))
        for ticker in set(missing) - set(found):
            logger.warning("followed market %s is no longer served; stop following it", ticker)
            self.followed.pop(ticker, None)
        return found

    async def _resume(self) -> None:
        """Learn from the server which markets an earlier process followed and that are not
        final yet: they are followed again, and each one's trades are read back from where the
        stored ones end — as are those of markets finalized lately. Tried at every pass until
        the server answers."""
        if self._resumed or self._server_state is None:
            return
        # The earlier process's newest trades may still carry the WebSocket's whole seconds
        # (those after its last REST listing, at most about one discovery interval): read them
        # again too, so their exact times replace those — also for a market finalized just
        # before the earlier process stopped.
        reread = max(timedelta(minutes=1), 2 * timedelta(seconds=self.options.discovery_interval))
        try:
            stored = await self._server_state.markets_to_resume(
                final_since=now_utc() - _FINAL_TRADES_REREAD, deadline=10.0
            )
        except grpc.aio.AioRpcError as exc:
            logger.warning(
                "stored markets unavailable (%s: %s); asking again next pass",
                exc.code().name,
                exc.details(),
            )
            return
        self._resumed = True
        self._server_had_markets = any(not market.final for market in stored)
        covered = [market for market in stored if self.selection.covers(market)]
        resumed = [market for market in covered if not market.final]
        for market in covered:
            if not market.final:
                self._to_read.add(market.ticker)
            latest = market.latest_trade_time
            self._read_back[market.ticker] = latest - reread if latest else market.open_time
            if market.latest_snapshot_time is not None:
                # One snapshot per instant across processes too.
                self._snapshots.shown(market.ticker, _micros(market.latest_snapshot_time))
        # Markets an earlier run read but the server has not acknowledged yet (spooled).
        spooled = {
            market.ticker
            for request in self.publisher.spool.pending()
            for market in request.markets
            if market.status != types_pb2.MARKET_STATUS_FINALIZED
        }
        for ticker in spooled - set(self._read_back):
            self._to_read.add(ticker)
            self._read_back[ticker] = None
        await self._learn_open_gaps({market.ticker: market for market in stored}, reread)
        if resumed or spooled:
            logger.info(
                "resuming %d markets not final on the server (%d more in the spool)",
                len(resumed),
                len(spooled - {market.ticker for market in resumed}),
            )

    async def _learn_open_gaps(self, stored: dict[str, StoredMarket], reread: timedelta) -> None:
        """The feed gaps an earlier process left unrecovered, of the selection: on the server
        (``ListFeedGaps``) and in the spool's pending batches. The trades of a market a gap
        concerns are read back from ``reread`` before the gap was detected (the lost frames came
        just before it) too."""
        assert self._server_state is not None
        try:
            served = await self._server_state.open_feed_gaps(deadline=10.0)
        except grpc.aio.AioRpcError as exc:
            logger.warning(
                "open feed gaps unavailable (%s: %s); those an earlier process left stay open",
                exc.code().name,
                exc.details(),
            )
            served = []
        gaps = {
            _gap_key(gap): gap
            for gap in [*served, *_spooled_open_gaps(self.publisher.spool.pending())]
            if gap.detect_time.ToDatetime(UTC) < self._started and self._covers_gap(gap, stored)
        }
        for gap in gaps.values():
            if gap.channel == "orderbook_delta":
                self._open_book_gaps.append(gap)
                continue
            self._open_gaps.append(gap)
            since = gap.detect_time.ToDatetime(UTC) - reread
            markets = (
                [gap.ticker]
                if gap.ticker
                else [t for t, m in stored.items() if not m.final and self.selection.covers(m)]
            )
            read_back = self._gap_read_back
            for ticker in markets:
                read_back[ticker] = _earliest(read_back.get(ticker, since), since)
        if gaps:
            logger.info(
                "repairing %d feed gap(s) an earlier process left unrecovered (%d order-book)",
                len(gaps),
                len(self._open_book_gaps),
            )

    def _covers_gap(self, gap: types_pb2.FeedGap, stored: dict[str, StoredMarket]) -> bool:
        """Whether ``gap`` concerns the selection (one of no market concerns every market)."""
        if not gap.ticker or self.selection.is_everything:
            return True
        market = stored.get(gap.ticker)
        return gap.ticker in self.selection.tickers or (
            market is not None and self.selection.covers(market)
        )

    async def _recover_gaps(self, gaps: list[types_pb2.FeedGap]) -> None:
        """Publish ``gaps`` again, recovered now (the server upserts them on their key)."""
        now = now_utc()
        for gap in gaps:
            done = types_pb2.FeedGap()
            done.CopyFrom(gap)
            done.gap_id = 0
            done.recovered = True
            done.recover_time.FromDatetime(now)
            await self.sink.add(done)
        if gaps:
            logger.info("%d feed gap(s) an earlier process left are repaired", len(gaps))
        gaps.clear()

    async def _read_trades(self) -> None:
        """Trades over REST. First what each resumed market missed, from where the server's
        stored trades end; then, every pass, the followed markets' trades since the newest read
        so far — one listing for every market, or one per followed market of a narrower
        selection. Their exact times refine the WebSocket's whole seconds (the server keeps the
        more precise time of a trade id), and a trade the socket lost is read here at the
        latest."""
        listed = set(self.followed) | self._just_final
        read_back, self._read_back = self._read_back, {}
        for ticker, since in self._gap_read_back.items():
            read_back[ticker] = _earliest(read_back.get(ticker, since), since)
        for ticker, since in sorted(read_back.items()):
            await self._trades_since(ticker, since, listed)
        listings: Sequence[str | None] = [None] if self.selection.is_everything else sorted(listed)
        for key in listings:
            since = self._trades_read_until.get(key, self._trades_start)
            self._trades_read_until[key] = await self._trades_since(key, since, listed)
        self._just_final.clear()
        for key in set(self._trades_read_until) - {None} - set(self.followed):
            del self._trades_read_until[key]

    async def _trades_since(
        self, ticker: str | None, since: datetime | None, listed: set[str]
    ) -> datetime:
        """Send the trades of ``ticker`` (None: of every market in ``listed``) from the whole
        second of ``since`` on; the newest create time read (``since`` when none)."""
        newest = since or now_utc()

        async def listing() -> AsyncIterator[KalshiTrade]:
            nonlocal newest
            trades = self.rest.iter_trades(
                ticker=ticker, min_ts=_unix(since) if since is not None else None
            )
            async for trade in trades:
                if ticker is None and trade.market not in listed:
                    continue
                if (created := trade.time) is not None and created > newest:
                    newest = created
                yield trade

        await self._send_trades(listing(), set())
        return newest

    async def poll_once(self, books: bool = False) -> dict[str, KalshiMarket]:
        """One pass: every selected market's and every followed market's metadata and a POLL
        snapshot of each; with ``books``, each open market's REST order book too."""
        await self._resume()
        errors_before = self.report.read_errors
        markets = await self.discover()
        markets.update(await self._read_followed(markets))
        received = now_utc()
        first_pass = self._trades_start is None
        if first_pass:
            shown = [m.updated_time for m in markets.values() if m.updated_time is not None]
            self._trades_start = max(shown, default=received)
        for market in markets.values():
            if market.ticker not in self.followed and (not first_pass or self._server_had_markets):
                # New to kfeed while kfeed was running (or down, between two processes): it
                # opened or joined the selection recently, so its trades so far are read too.
                # (A first run on an empty database starts from now: history is backfill's.)
                self._read_back.setdefault(market.ticker, market.open_time)
            await self.send_market(market)
            try:
                await self.send_snapshot(snapshot_from_market(market, received))
            except FixedPointError as exc:
                self.report.read_errors += 1
                logger.error("skipping a snapshot of %s: %s", market.ticker, exc)
            if books and market_status(market.status) == types_pb2.MARKET_STATUS_OPEN:
                await self._send_rest_book(market.ticker)
        await self._read_trades()
        if self.report.read_errors == errors_before:
            # Every market and its trades read again: what an earlier process's open gaps hid
            # (statuses, activity, trades) is known again; with books, every open one's too.
            self._gap_read_back.clear()
            await self._recover_gaps(self._open_gaps)
            if books:
                await self._recover_gaps(self._open_book_gaps)
        await self.sink.flush()
        logger.info("poll pass: %d markets", len(markets))
        return markets

    async def _send_rest_book(self, ticker: str) -> None:
        """The market's REST order book as a START checkpoint: REST gives no time, so it is
        placed at the time it was read, and the book between two polls is unknown (flagged)."""
        try:
            response = await self.rest.get_orderbook(ticker)
            yes, no = orderbook_sides(response.levels)
        except (KalshiError, FixedPointError) as exc:
            self.report.read_errors += 1
            logger.error("order book of %s unavailable: %s", ticker, exc)
            return
        read = now_utc()
        await self.sink.add(checkpoint(ticker, START, read, read, None, yes, no))

    async def run_poll(self, once: bool) -> None:
        """Poll every ``poll_interval`` seconds (a pass that overruns starts the next at once),
        each open market's order book too (``poll_books``)."""
        while True:
            started = time.monotonic()
            await self.poll_once(books=self.options.poll_books)
            if once:
                return
            await asyncio.sleep(max(0.0, self.options.poll_interval - (time.monotonic() - started)))

    # -- ws ------------------------------------------------------------------------------------

    async def run_ws(self, ws_url: str, credentials: KalshiCredentials | None, once: bool) -> None:
        """REST discovery and lifecycle, live channels over one WebSocket.

        Discovery (a poll pass: metadata and a starting snapshot of every selected or followed
        market) repeats every ``discovery_interval``; the socket's subscriptions follow the
        followed markets in place (no reconnect), until each is finalized.
        """
        await self.poll_once()
        if once:
            if self.followed:
                await self._live_once(ws_url, credentials, self.followed)
            else:
                logger.warning("no markets selected")
            return
        client = self._live(ws_url, credentials, self.followed)
        consumer = asyncio.create_task(self._consume(client, None))
        try:
            await self._follow(client)
        finally:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            await self._leave(client)

    async def _follow(self, client: KalshiWebSocketClient) -> None:
        """Discovery passes every ``discovery_interval``, each telling the socket which markets
        to follow. In between, each market is read again over REST just after its close time,
        so its status changes on time even though no lifecycle frame says so."""
        loop = asyncio.get_running_loop()
        next_discovery = loop.time() + self.options.discovery_interval
        closing = _closing_schedule(self.followed)
        while True:
            if not self.followed:
                logger.warning("no markets selected; looking again later")
            until_close = (closing[0][0] - now_utc()).total_seconds() if closing else math.inf
            until_discovery = next_discovery - loop.time()
            if until_close < until_discovery:
                await asyncio.sleep(max(until_close, 0))
                _, ticker = closing.pop(0)
                await self._refresh_market(ticker, "its close time")
                await self.sink.flush()
                continue
            await asyncio.sleep(max(until_discovery, 0))
            next_discovery = loop.time() + self.options.discovery_interval
            await self.poll_once()
            client.close_times.update(_close_times(self.followed))
            for marker in await client.follow(self._seeds(self.followed)):
                await self._route(marker)
            closing = _closing_schedule(self.followed)

    async def _refresh_market(self, ticker: str, reason: str) -> None:
        """Read ``ticker`` again over REST and send it (status, result, times)."""
        try:
            market = await self.rest.get_market(ticker)
        except KalshiError as exc:
            self.report.read_errors += 1
            logger.error("market %s after %s: %s", ticker, reason, exc)
            return
        await self.send_market(market)
        # Its new state as a snapshot too (determined and finalized change no live channel).
        try:
            await self.send_snapshot(snapshot_from_market(market, now_utc()))
        except FixedPointError as exc:
            self.report.read_errors += 1
            logger.error("skipping a snapshot of %s: %s", ticker, exc)

    @staticmethod
    def _seeds(markets: dict[str, KalshiMarket]) -> dict[str, types_pb2.MarketSnapshot]:
        """The starting point of each market's live state: what REST showed just now."""
        received = now_utc()
        known: dict[str, types_pb2.MarketSnapshot] = {}
        for ticker, market in markets.items():
            with contextlib.suppress(FixedPointError):
                known[ticker] = snapshot_from_market(market, received)
        return known

    def _live(
        self, ws_url: str, credentials: KalshiCredentials | None, markets: dict[str, KalshiMarket]
    ) -> KalshiWebSocketClient:
        client = KalshiWebSocketClient(
            ws_url,
            credentials,
            sorted(markets),
            rest=self.rest,
            known=self._seeds(markets),
            checkpoints=self.options.book_checkpoints,
            open_book_gaps=self._open_book_gaps,
        )
        self._open_book_gaps = []  # the client's first fresh books recover them
        client.close_times.update(_close_times(markets))
        return client

    async def _live_once(
        self, ws_url: str, credentials: KalshiCredentials | None, markets: dict[str, KalshiMarket]
    ) -> None:
        """Stream until every market has sent live data once (or ``once_ws_timeout``)."""
        waiting = set(markets)
        client = self._live(ws_url, credentials, markets)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.once_ws_timeout):
                await self._consume(client, waiting)
        await self._leave(client)
        if waiting:
            logger.warning("no live data within the time limit for %s", sorted(waiting))
            self.report.read_errors += 1

    async def _leave(self, client: KalshiWebSocketClient) -> None:
        """After the stream: the pending gap repairs (``repair_grace``), the LOST markers of the
        books, which stop being recorded here, all spooled."""
        for item in await client.finish_repairs(self.options.repair_grace):
            await self._route(item)
        for marker in client.lost_books():
            await self._route(marker)
        await self.sink.flush()

    async def _consume(self, client: KalshiWebSocketClient, waiting: set[str] | None) -> None:
        """Route live items into batches; with ``waiting``, stop once each market has spoken."""
        items = client.stream()
        flusher = asyncio.create_task(self._linger_flush())
        try:
            async for item in items:
                if type(item) is BookChange:  # most items of a busy feed: straight to the batch
                    await self.sink.add(item)
                    continue
                await self._route(item)
                if waiting is not None and isinstance(item, types_pb2.MarketSnapshot):
                    waiting.discard(item.ticker)
                    if not waiting:
                        return
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            await items.aclose()

    async def _linger_flush(self) -> None:
        while True:
            await asyncio.sleep(self.options.linger)
            await self.sink.flush()

    async def _route(self, item: FeedItem) -> None:
        if isinstance(item, types_pb2.MarketSnapshot):
            await self.send_snapshot(item)
        elif isinstance(item, KalshiMarket):  # read again over REST after a gap
            await self.send_market(item)
        elif isinstance(item, LifecycleEvent):
            if item.ticker in self.followed:
                await self._refresh_market(item.ticker, item.event_type)
        else:
            await self.sink.add(item)

    # -- backfill ------------------------------------------------------------------------------

    async def backfill(self, start: datetime, end: datetime) -> None:
        """Settled markets, trades and candlesticks over ``[start, end]``, on both sides of the
        historical cutoff; the REST order book of those still open (``poll_books``)."""
        cutoff: datetime | None = None
        try:
            cutoff = (await self.rest.get_historical_cutoff()).trades_created_ts
        except KalshiError as exc:
            logger.warning("historical cutoff unknown (%s); reading both tiers in full", exc)
        markets: dict[str, tuple[KalshiMarket, bool]] = {}
        for historical in (True, False):
            found = await self.discover(
                historical=historical, min_close=start, max_close=end, default_status=None
            )
            markets.update((t, (m, historical)) for t, m in found.items())
        seen_trades: set[str] = set()
        for ticker, (market, historical) in sorted(markets.items()):
            series_ticker = await self.send_market(market)
            await self._backfill_trades(ticker, start, end, cutoff, seen_trades)
            await self._backfill_candles(ticker, series_ticker, start, end, historical)
            # A market still open has a book now (a settled one has none): as poll reads it.
            if (
                self.options.poll_books
                and market_status(market.status) == types_pb2.MARKET_STATUS_OPEN
            ):
                await self._send_rest_book(ticker)
        await self.sink.flush()
        logger.info("backfill: %d markets, %d trades", len(markets), len(seen_trades))

    async def _backfill_trades(
        self, ticker: str, start: datetime, end: datetime, cutoff: datetime | None, seen: set[str]
    ) -> None:
        old_end = min(end, cutoff) if cutoff else end
        new_start = max(start, cutoff) if cutoff else start
        if start < old_end:
            await self._send_trades(
                self.rest.iter_trades(
                    ticker=ticker, min_ts=_unix(start), max_ts=_unix(old_end), historical=True
                ),
                seen,
            )
        if new_start < end:
            await self._send_trades(
                self.rest.iter_trades(ticker=ticker, min_ts=_unix(new_start), max_ts=_unix(end)),
                seen,
            )

    async def _backfill_candles(
        self, ticker: str, series_ticker: str, start: datetime, end: datetime, historical: bool
    ) -> None:
        period = self.options.candle_period_minutes
        window = timedelta(minutes=period * _MAX_CANDLES_PER_REQUEST)
        window_start = start
        while window_start < end:
            window_end = min(end, window_start + window)
            try:
                candles = await self.rest.get_candlesticks(
                    series_ticker,
                    ticker,
                    _unix(window_start),
                    _unix(window_end),
                    period,
                    historical=historical,
                )
            except KalshiError as exc:
                self.report.read_errors += 1
                logger.error("candlesticks of %s unavailable: %s", ticker, exc)
                return
            received = now_utc()
            for candle in candles.candlesticks:
                try:
                    await self.send_snapshot(snapshot_from_candlestick(ticker, candle, received))
                except FixedPointError as exc:
                    self.report.read_errors += 1
                    logger.error("skipping a candlestick of %s: %s", ticker, exc)
            window_start = window_end

    # -- finishing -----------------------------------------------------------------------------

    async def finish(self) -> RunReport:
        """Publish what is left and wait (up to ``flush_timeout``) for every ack."""
        await self.sink.flush()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.flush_timeout):
                await self.publisher.flush()
        self.report.rows = self.sink.rows
        self.report.rejected = self.publisher.stats.rejected
        self.report.unacked = self.publisher.pending
        return self.report


def _earliest(one: datetime | None, other: datetime | None) -> datetime | None:
    """The earlier start of two trade read-backs (None: from the market's first trade)."""
    return None if one is None or other is None else min(one, other)


def _gap_key(gap: types_pb2.FeedGap) -> tuple[str, int, int, int]:
    """What identifies a stored gap (the server's unique key)."""
    return (
        gap.channel,
        gap.subscription_id,
        gap.expected_sequence,
        gap.detect_time.ToMicroseconds(),
    )


def _spooled_open_gaps(
    requests: Iterable[ingest_service_pb2.PublishRequest],
) -> list[types_pb2.FeedGap]:
    """The gaps of pending batches that no later pending row reports recovered."""
    gaps: dict[tuple[str, int, int, int], types_pb2.FeedGap] = {}
    for request in requests:
        for gap in request.feed_gaps:
            gaps[_gap_key(gap)] = gap
    return [gap for gap in gaps.values() if not gap.recovered]


def _close_times(markets: dict[str, KalshiMarket]) -> dict[str, datetime]:
    return {t: m.close_time for t, m in markets.items() if m.close_time is not None}


def _closing_schedule(markets: dict[str, KalshiMarket]) -> list[tuple[datetime, str]]:
    """When to read each market again for its close: just after its close time, soonest first
    (markets whose close time has passed are not scheduled)."""
    now = now_utc()
    return sorted(
        (market.close_time + CLOSE_READ_DELAY, ticker)
        for ticker, market in markets.items()
        if market.close_time is not None and market.close_time + CLOSE_READ_DELAY > now
    )


def default_backfill_range(
    start: datetime | None, end: datetime | None, now: datetime | None = None
) -> tuple[datetime, datetime]:
    """``[start, end]`` in UTC: ``end`` defaults to now, ``start`` to a day before ``end``."""
    until = (end or now or datetime.now(UTC)).astimezone(UTC)
    since = (start or until - timedelta(days=1)).astimezone(UTC)
    if since >= until:
        raise ValueError(
            f"backfill start {since.isoformat()} is not before end {until.isoformat()}"
        )
    return since, until
