"""Plain, typed records that cross the layers: persistence returns them, the domain and the
transport consume them. No SQLAlchemy and no protobuf here.

Money is fixed point everywhere: prices and amounts in 1/10,000 USD (``int``), contract counts in
1/100 contract (``int``). Timestamps are timezone-aware UTC ``datetime`` with microseconds.
Enum values equal the numbers of the matching ``kfeed.v1`` proto enums, so the transport converts
with ``int(...)``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")


class DataSource(enum.IntEnum):
    UNSPECIFIED = 0
    POLL = 1
    WEBSOCKET = 2
    BACKFILL = 3


class MarketStatus(enum.IntEnum):
    UNSPECIFIED = 0
    UNOPENED = 1
    OPEN = 2
    PAUSED = 3
    CLOSED = 4
    DETERMINED = 5
    DISPUTED = 6
    AMENDED = 7
    FINALIZED = 8


class MarketResult(enum.IntEnum):
    UNSPECIFIED = 0
    YES = 1
    NO = 2
    SCALAR = 3


class Side(enum.IntEnum):
    UNSPECIFIED = 0
    YES = 1
    NO = 2


@dataclass(frozen=True, slots=True)
class SeriesRecord:
    ticker: str
    title: str = ""
    category: str = ""
    frequency: str = ""
    tags: tuple[str, ...] = ()
    fee_type: str = ""
    # 1/10,000: 10_000 is a multiplier of 1.0.
    fee_multiplier_ten_thousandths: int = 10_000


@dataclass(frozen=True, slots=True)
class EventRecord:
    event_ticker: str
    series_ticker: str = ""
    title: str = ""
    sub_title: str = ""
    category: str = ""
    mutually_exclusive: bool = False
    strike_time: datetime | None = None
    # Kalshi's event-level fee overrides ("" / None: the series' terms apply).
    fee_type_override: str = ""
    fee_multiplier_override_ten_thousandths: int | None = None


@dataclass(frozen=True, slots=True)
class MarketRecord:
    ticker: str
    event_ticker: str = ""
    series_ticker: str = ""
    title: str = ""
    subtitle: str = ""
    yes_sub_title: str = ""
    no_sub_title: str = ""
    market_type: str = "binary"
    status: MarketStatus = MarketStatus.UNSPECIFIED
    result: MarketResult = MarketResult.UNSPECIFIED
    open_time: datetime | None = None
    close_time: datetime | None = None
    expiration_time: datetime | None = None
    settlement_time: datetime | None = None
    settlement_value: int | None = None
    price_level_structure: str = ""
    fractional_trading_enabled: bool = False
    rules_primary: str = ""
    # Set by the repository on every write; None on records not yet stored.
    update_time: datetime | None = None


class SnapshotRecord(NamedTuple):
    """Top of book and activity of one market at one moment. ``None`` = no level / not given.

    A named tuple rather than a frozen dataclass: ingest builds thousands a batch and builds
    one from a tuple in ≈0.2 µs instead of ≈2 µs, and a stored record (id last) is itself the
    row that COPY writes (ADR 0009)."""

    ticker: str
    exchange_time: datetime
    receive_time: datetime
    source: DataSource
    exchange_sequence: int | None = None
    yes_bid: int | None = None
    yes_ask: int | None = None
    no_bid: int | None = None
    no_ask: int | None = None
    yes_bid_size: int | None = None
    yes_ask_size: int | None = None
    last_price: int | None = None
    volume: int | None = None
    volume_24h: int | None = None
    open_interest: int | None = None
    liquidity: int | None = None
    status: MarketStatus = MarketStatus.UNSPECIFIED
    # Server-assigned, monotonically increasing; 0 until stored.
    snapshot_id: int = 0

    def same_market_state(self, other: SnapshotRecord) -> bool:
        """True when ``other`` shows the same book and activity (times, source and ids aside):
        such a snapshot is not stored again."""
        return self.market_state() == other.market_state()

    def market_state(self) -> tuple[object, ...]:
        """The book and activity this snapshot shows: equal for snapshots of the same state."""
        return (self.ticker, *self.book_and_activity())

    def book_and_activity(self) -> tuple[object, ...]:
        """``market_state`` without the ticker, for comparing snapshots of one market."""
        fields: tuple[object, ...] = self
        return fields[_BOOK_AND_ACTIVITY]

    def with_id(self, snapshot_id: int) -> SnapshotRecord:
        """This snapshot as stored under ``snapshot_id``."""
        return SnapshotRecord._make((*self[:-1], snapshot_id))

    @property
    def stream_id(self) -> int:
        """The id streams resume by."""
        return self.snapshot_id

    @property
    def stream_time(self) -> datetime:
        """The time a stream's ``start_time`` selects by."""
        return self.exchange_time


# SnapshotRecord's optional integer fields, in field order (the columnar wire format's
# presence bits and the backtest chunk encoding both follow it).
OPTIONAL_SNAPSHOT_FIELDS = (
    "exchange_sequence",
    "yes_bid",
    "yes_ask",
    "no_bid",
    "no_ask",
    "yes_bid_size",
    "yes_ask_size",
    "last_price",
    "volume",
    "volume_24h",
    "open_interest",
    "liquidity",
)
# The fields that make a market's state: yes_bid … status, adjacent in field order, so a
# state is one slice (the dedup takes it for every snapshot ingested).
_BOOK_AND_ACTIVITY = slice(
    SnapshotRecord._fields.index("yes_bid"), SnapshotRecord._fields.index("status") + 1
)


@dataclass(frozen=True, slots=True)
class TradeRecord:
    trade_id: str
    ticker: str
    yes_price: int
    no_price: int
    count: int
    taker_side: Side
    create_time: datetime


@dataclass(frozen=True, slots=True)
class StreamedTrade:
    """A stored trade and its stream id (increasing in commit order; StreamTrades resumes by it)."""

    stream_id: int
    trade: TradeRecord

    @property
    def ticker(self) -> str:
        return self.trade.ticker

    @property
    def stream_time(self) -> datetime:
        return self.trade.create_time


@dataclass(frozen=True, slots=True)
class FeedGapRecord:
    channel: str
    subscription_id: int
    expected_sequence: int
    received_sequence: int
    detect_time: datetime
    ticker: str = ""
    recovered: bool = False
    recover_time: datetime | None = None
    # Server-assigned; 0 until stored.
    gap_id: int = 0


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a keyset-paginated read. ``next_cursor`` is None on the last page."""

    items: list[T]
    next_cursor: tuple[object, ...] | None = None


@dataclass(frozen=True, slots=True)
class WriteCounts:
    """What an idempotent bulk write newly stored (the rest were already there)."""

    series: int = 0
    events: int = 0
    markets: int = 0
    snapshots: int = 0
    trades: int = 0
    feed_gaps: int = 0
    # Snapshots skipped because they repeated the market's previous state.
    snapshots_unchanged: int = 0
    book_changes: int = 0
    book_checkpoints: int = 0


class BacktestState(enum.IntEnum):
    UNSPECIFIED = 0
    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def is_terminal(self) -> bool:
        return self in (BacktestState.SUCCEEDED, BacktestState.FAILED, BacktestState.CANCELLED)


class OrderAction(enum.IntEnum):
    UNSPECIFIED = 0
    BUY = 1
    SELL = 2
    # A position paid out at the market's result.
    SETTLE = 3
    # A position valued at the bid when the window ended unsettled (no cash moves).
    MARK = 4


@dataclass(frozen=True, slots=True)
class ExecutionRecord:
    """One fill or settlement of a backtest: the trade-level audit."""

    sequence: int
    ticker: str
    time: datetime
    snapshot_id: int
    side: Side
    action: OrderAction
    count: int
    price: int
    fee: int
    cash_after: int
    position_after: int
    realized_pnl: int


@dataclass(frozen=True, slots=True)
class EquityPointRecord:
    time: datetime
    equity: int


class BookPoint(NamedTuple):
    """What candles read of a stored snapshot: its place in (exchange_time, id) order, the YES
    bid and ask, and the open interest (``None`` = no level / not given)."""

    exchange_time: datetime
    snapshot_id: int
    yes_bid: int | None
    yes_ask: int | None
    open_interest: int | None


class TradePoint(NamedTuple):
    """What candles read of a stored trade: its place in (create_time, trade_id) order, its YES
    price (1/10,000 USD) and size (its ``count``, 1/100 contract; named apart from
    ``tuple.count``)."""

    create_time: datetime
    trade_id: str
    yes_price: int
    size: int


class PriceOhlc(NamedTuple):
    """Open, high, low and close of a price over one candle, in 1/10,000 USD."""

    open: int
    high: int
    low: int
    close: int


@dataclass(frozen=True, slots=True)
class CandleRecord:
    """One interval [start_time, end_time) of a market's history (docs/CANDLES.md)."""

    start_time: datetime
    end_time: datetime
    # None: no bid (ask) in force at any time in the interval.
    yes_bid: PriceOhlc | None
    yes_ask: PriceOhlc | None
    # None: no trade in the interval (no price is invented).
    price: PriceOhlc | None
    mean_price: int | None
    volume: int
    trade_count: int
    # Of the state in force at the interval's end; None when unknown.
    open_interest: int | None


class CheckpointKind(enum.IntEnum):
    """kfeed.v1.OrderBookCheckpointKind: why a full book was recorded."""

    UNSPECIFIED = 0
    START = 1  # the recording (re)starts: not seen between the previous record and this
    RESYNC = 2  # a fresh book after a feed gap
    PERIODIC = 3  # the book as its changes built it, to bound a rebuild
    LOST = 4  # not a new book: changes after this instant were not seen


class BookChangeRecord(NamedTuple):
    """One level of one market's book took a new size (1/100 contract; 0 = the level is gone)
    at ``exchange_time``. ``side`` is YES or NO bids; ``sequence`` the exchange's (0: unknown)."""

    ticker: str
    exchange_time: datetime
    receive_time: datetime
    sequence: int
    side: Side
    price: int
    size: int


Levels = tuple[tuple[int, int], ...]
"""An order book side as (price, size) pairs, best (highest price) first."""


class BookCheckpointRecord(NamedTuple):
    """A market's full book holding every change at or before ``exchange_time``."""

    ticker: str
    exchange_time: datetime
    receive_time: datetime
    sequence: int | None
    kind: CheckpointKind
    yes: Levels
    no: Levels


@dataclass(frozen=True, slots=True)
class StreamedBookChange:
    """A stored order-book change and its stream id (one sequence with the checkpoints,
    increasing in commit order; StreamOrderBooks resumes by it)."""

    stream_id: int
    change: BookChangeRecord

    @property
    def ticker(self) -> str:
        return self.change.ticker

    @property
    def stream_time(self) -> datetime:
        return self.change.exchange_time


@dataclass(frozen=True, slots=True)
class StreamedBook:
    """A full book on the order-book stream: a stored checkpoint (START, RESYNC or LOST) with its
    stream id, or a book rebuilt where a stream starts (then ``stream_id`` is the position the
    stream starts after)."""

    stream_id: int
    book: BookCheckpointRecord

    @property
    def ticker(self) -> str:
        return self.book.ticker

    @property
    def stream_time(self) -> datetime:
        return self.book.exchange_time


BookStreamRow = StreamedBookChange | StreamedBook
