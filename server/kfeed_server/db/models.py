"""SQLAlchemy 2.0 typed models: the schema of kfeed's database on PostgreSQL and SQLite.

Fixed point everywhere: prices and amounts are BIGINT in 1/10,000 USD, counts BIGINT in
1/100 contract. Enums are SMALLINT with the numbers of the IntEnums in ``kfeed_server.records``.
Unique keys make every write idempotent (see docs/adr/0002-persistence.md).

Snapshots, trades and gaps carry no foreign key to ``markets``: the WebSocket feed may deliver a
market's ticks before its metadata, and those must not be lost.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

from kfeed_server.db.types import BigIntId, IntEnumType, UtcDateTime
from kfeed_server.records import (
    BacktestState,
    CheckpointKind,
    DataSource,
    MarketResult,
    MarketStatus,
    OrderAction,
    Side,
)

# Deterministic constraint names, so migrations can address them on both databases.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JsonDocument: TypeEngine[Any] = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    """Declarative base of every kfeed table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UtcDateTime(),
        int: BigInteger(),
        str: Text(),
        bool: Boolean(),
        float: Double(),
    }


def _identity_id() -> Mapped[int]:
    """A surrogate key: BIGINT identity on PostgreSQL, INTEGER PRIMARY KEY on SQLite."""
    return mapped_column(BigIntId, Identity(), primary_key=True)


class Series(Base):
    """A Kalshi series: the template events are made from."""

    __tablename__ = "series"

    ticker: Mapped[str] = mapped_column(primary_key=True)
    title: Mapped[str]
    category: Mapped[str]
    frequency: Mapped[str]
    tags: Mapped[list[str]] = mapped_column(JsonDocument)
    fee_type: Mapped[str]
    fee_multiplier_ten_thousandths: Mapped[int]
    update_time: Mapped[datetime]


class Event(Base):
    """A Kalshi event: a group of markets, in one series."""

    __tablename__ = "events"

    event_ticker: Mapped[str] = mapped_column(primary_key=True)
    series_ticker: Mapped[str] = mapped_column(index=True)
    title: Mapped[str]
    sub_title: Mapped[str]
    category: Mapped[str]
    mutually_exclusive: Mapped[bool]
    strike_time: Mapped[datetime | None]
    update_time: Mapped[datetime]
    # Kalshi's event-level fee overrides ("" / NULL: the series' terms apply).
    fee_type_override: Mapped[str] = mapped_column(server_default="")
    fee_multiplier_override_ten_thousandths: Mapped[int | None] = mapped_column(BigInteger)


class Market(Base):
    """A Kalshi market: metadata and lifecycle (status, result, settlement)."""

    __tablename__ = "markets"

    ticker: Mapped[str] = mapped_column(primary_key=True)
    event_ticker: Mapped[str] = mapped_column(index=True)
    series_ticker: Mapped[str] = mapped_column(index=True)
    title: Mapped[str]
    subtitle: Mapped[str]
    yes_sub_title: Mapped[str]
    no_sub_title: Mapped[str]
    market_type: Mapped[str]
    status: Mapped[MarketStatus] = mapped_column(IntEnumType(MarketStatus))
    result: Mapped[MarketResult] = mapped_column(IntEnumType(MarketResult))
    open_time: Mapped[datetime | None]
    close_time: Mapped[datetime | None]
    expiration_time: Mapped[datetime | None]
    settlement_time: Mapped[datetime | None]
    settlement_value: Mapped[int | None]
    price_level_structure: Mapped[str]
    fractional_trading_enabled: Mapped[bool]
    rules_primary: Mapped[str]
    update_time: Mapped[datetime]


class MarketSnapshot(Base):
    """Top of book and activity of one market at one moment; ``id`` is the resume token."""

    __tablename__ = "market_snapshots"
    __table_args__ = (
        UniqueConstraint(
            "ticker", "source", "exchange_time", "receive_time", name="uq_market_snapshots_key"
        ),
        Index("ix_market_snapshots_ticker_exchange_time_id", "ticker", "exchange_time", "id"),
        # AUTOINCREMENT: ids are resume tokens and must never be reused, even after a delete.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = _identity_id()
    ticker: Mapped[str]
    source: Mapped[DataSource] = mapped_column(IntEnumType(DataSource))
    exchange_time: Mapped[datetime]
    receive_time: Mapped[datetime]
    exchange_sequence: Mapped[int | None]
    yes_bid: Mapped[int | None]
    yes_ask: Mapped[int | None]
    no_bid: Mapped[int | None]
    no_ask: Mapped[int | None]
    yes_bid_size: Mapped[int | None]
    yes_ask_size: Mapped[int | None]
    last_price: Mapped[int | None]
    volume: Mapped[int | None]
    volume_24h: Mapped[int | None]
    open_interest: Mapped[int | None]
    liquidity: Mapped[int | None]
    status: Mapped[MarketStatus] = mapped_column(IntEnumType(MarketStatus))


class Trade(Base):
    """A public trade; the exchange's trade id is the key."""

    __tablename__ = "trades"
    __table_args__ = (
        Index("ix_trades_ticker_create_time_trade_id", "ticker", "create_time", "trade_id"),
    )

    trade_id: Mapped[str] = mapped_column(primary_key=True)
    ticker: Mapped[str]
    yes_price: Mapped[int]
    no_price: Mapped[int]
    count: Mapped[int]
    taker_side: Mapped[Side] = mapped_column(IntEnumType(Side))
    create_time: Mapped[datetime]
    # Assigned in commit order by the (serialised) writer: what StreamTrades resumes by.
    stream_id: Mapped[int] = mapped_column(unique=True)


class FeedGap(Base):
    """A sequence gap detected on the WebSocket feed, and whether it was recovered."""

    __tablename__ = "feed_gaps"
    __table_args__ = (
        UniqueConstraint(
            "channel",
            "subscription_id",
            "expected_sequence",
            "detect_time",
            name="uq_feed_gaps_key",
        ),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = _identity_id()
    channel: Mapped[str]
    subscription_id: Mapped[int]
    expected_sequence: Mapped[int]
    received_sequence: Mapped[int]
    detect_time: Mapped[datetime]
    ticker: Mapped[str]
    recovered: Mapped[bool]
    recover_time: Mapped[datetime | None]


class Backtest(Base):
    """A backtest run (or a sweep parent): configuration, state, progress, fingerprint, metrics."""

    __tablename__ = "backtests"
    __table_args__ = (
        # Serves "newest first" by a backward scan: as fast as a DESC index, and it compares
        # cleanly in Alembic on both databases.
        Index("ix_backtests_create_time_backtest_id", "create_time", "backtest_id"),
    )

    backtest_id: Mapped[str] = mapped_column(primary_key=True)
    parent_backtest_id: Mapped[str | None] = mapped_column(index=True)
    strategy: Mapped[str] = mapped_column(index=True)
    state: Mapped[BacktestState] = mapped_column(IntEnumType(BacktestState))
    config: Mapped[dict[str, Any]] = mapped_column(JsonDocument)
    sweep: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)
    fraction_done: Mapped[float]
    snapshots_processed: Mapped[int]
    snapshots_total: Mapped[int]
    interim_pnl: Mapped[int]
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)
    row_count: Mapped[int]
    first_snapshot_id: Mapped[int]
    last_snapshot_id: Mapped[int]
    content_hash: Mapped[str]
    code_version: Mapped[str]
    create_time: Mapped[datetime]
    run_start_time: Mapped[datetime | None]
    run_end_time: Mapped[datetime | None]
    error_message: Mapped[str]
    ranked_child_ids: Mapped[list[str]] = mapped_column(JsonDocument)
    # The name of the token that created the run ("anonymous" without authentication; "" for
    # runs older than the column): only it or an admin may cancel the run.
    created_by: Mapped[str] = mapped_column(server_default="")
    data_quality: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)
    event_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # The fingerprint's definition (runs stored before the column: version 1).
    fingerprint_version: Mapped[int] = mapped_column(SmallInteger, server_default="1")
    # A walk-forward sweep's parent: its folds (NULL otherwise).
    walk_forward_folds: Mapped[list[Any] | None] = mapped_column(JsonDocument)


class BacktestExecution(Base):
    """One fill or settlement of a backtest; (backtest_id, sequence) is its key."""

    __tablename__ = "backtest_executions"

    backtest_id: Mapped[str] = mapped_column(
        ForeignKey("backtests.backtest_id", ondelete="CASCADE"), primary_key=True
    )
    sequence: Mapped[int] = mapped_column(primary_key=True)
    ticker: Mapped[str]
    time: Mapped[datetime]
    snapshot_id: Mapped[int]
    side: Mapped[Side] = mapped_column(IntEnumType(Side))
    action: Mapped[OrderAction] = mapped_column(IntEnumType(OrderAction))
    count: Mapped[int]
    price: Mapped[int]
    fee: Mapped[int]
    cash_after: Mapped[int]
    position_after: Mapped[int]
    realized_pnl: Mapped[int]


class BacktestEquityPoint(Base):
    """One point of a backtest's equity curve (1/10,000 USD)."""

    __tablename__ = "backtest_equity_points"
    __table_args__ = (
        Index("ix_backtest_equity_points_backtest_id_time", "backtest_id", "time"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = _identity_id()
    backtest_id: Mapped[str] = mapped_column(
        ForeignKey("backtests.backtest_id", ondelete="CASCADE")
    )
    time: Mapped[datetime]
    equity: Mapped[int]


# The tables, typed as ``Table`` for Core statements.
class ServerSecret(Base):
    """A secret every replica of this database shares, by name (e.g. the token key)."""

    __tablename__ = "server_secrets"

    name: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)


class OrderBookChange(Base):
    """One level of a market's order book took a new size (0: the level is gone).

    The key makes a resent change a duplicate, and its prefix (ticker, exchange time) is the
    range a rebuild reads. On PostgreSQL the table is partitioned by exchange time (migration
    0004_order_books; kfeed_server.db.repositories.books keeps the partitions)."""

    __tablename__ = "order_book_changes"
    __table_args__ = (Index("ix_order_book_changes_stream_id", "stream_id"),)

    ticker: Mapped[str] = mapped_column(primary_key=True)
    exchange_time: Mapped[datetime] = mapped_column(primary_key=True)
    receive_time: Mapped[datetime]
    side: Mapped[Side] = mapped_column(IntEnumType(Side), primary_key=True)
    price: Mapped[int] = mapped_column(primary_key=True)
    size: Mapped[int]
    # The exchange's sequence number of the frame (0: unknown).
    sequence: Mapped[int] = mapped_column(primary_key=True)
    # Assigned in commit order by the (serialised) writer, shared with the checkpoints: what
    # StreamOrderBooks resumes by (migration 0006_book_stream_ids).
    stream_id: Mapped[int]


BOOK_PARTITION_PREFIX = "order_book_changes_"


def is_partition(table_name: str) -> bool:
    """A partition of ``order_book_changes`` (PostgreSQL): made by the server, not the models."""
    return table_name.startswith(BOOK_PARTITION_PREFIX)


class OrderBookCheckpoint(Base):
    """A market's full book at an instant (or, kind LOST, where its recording stopped)."""

    __tablename__ = "order_book_checkpoints"
    __table_args__ = (
        UniqueConstraint(
            "ticker", "exchange_time", "kind", "receive_time", name="uq_order_book_checkpoints_key"
        ),
        Index("ix_order_book_checkpoints_stream_id", "stream_id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = _identity_id()
    ticker: Mapped[str]
    exchange_time: Mapped[datetime]
    receive_time: Mapped[datetime]
    sequence: Mapped[int | None]
    kind: Mapped[CheckpointKind] = mapped_column(IntEnumType(CheckpointKind))
    # (price, size) pairs as little-endian int64s, best first (kfeed_server.books.levels).
    yes_levels: Mapped[bytes] = mapped_column(LargeBinary)
    no_levels: Mapped[bytes] = mapped_column(LargeBinary)
    # The book stream's position, shared with the changes (see OrderBookChange.stream_id).
    stream_id: Mapped[int]


series_table: Table = Base.metadata.tables["series"]
events_table: Table = Base.metadata.tables["events"]
markets_table: Table = Base.metadata.tables["markets"]
snapshots_table: Table = Base.metadata.tables["market_snapshots"]
trades_table: Table = Base.metadata.tables["trades"]
feed_gaps_table: Table = Base.metadata.tables["feed_gaps"]
backtests_table: Table = Base.metadata.tables["backtests"]
executions_table: Table = Base.metadata.tables["backtest_executions"]
equity_points_table: Table = Base.metadata.tables["backtest_equity_points"]
server_secrets_table: Table = Base.metadata.tables["server_secrets"]
book_changes_table: Table = Base.metadata.tables["order_book_changes"]
book_checkpoints_table: Table = Base.metadata.tables["order_book_checkpoints"]
