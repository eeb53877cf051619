"""Initial schema: market data, feed gaps and backtests.

Revision ID: 0001_initial
Revises:
Create Date: 2025-11-25

Self-contained on purpose (no imports from the models): a migration must keep building the schema
it was written for even after the models move on. Types that differ by database:
timestamps are TIMESTAMPTZ on PostgreSQL and BIGINT microseconds since the epoch on SQLite;
surrogate ids are BIGINT identity on PostgreSQL and INTEGER PRIMARY KEY AUTOINCREMENT on SQLite.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_initial"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[object]:
    kind = sa.DateTime(timezone=True).with_variant(sa.BigInteger(), "sqlite")
    return sa.Column(name, kind, nullable=nullable)


def _identity_id() -> sa.Column[object]:
    kind = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    return sa.Column("id", kind, sa.Identity(), primary_key=True)


def _json(name: str, *, nullable: bool = False) -> sa.Column[object]:
    kind = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    return sa.Column(name, kind, nullable=nullable)


def _text(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.Text(), nullable=nullable)


def _bigint(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.BigInteger(), nullable=nullable)


def _smallint(name: str) -> sa.Column[object]:
    return sa.Column(name, sa.SmallInteger(), nullable=False)


def _bool(name: str) -> sa.Column[object]:
    return sa.Column(name, sa.Boolean(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "series",
        _text("ticker"),
        _text("title"),
        _text("category"),
        _text("frequency"),
        _json("tags"),
        _text("fee_type"),
        _bigint("fee_multiplier_ten_thousandths"),
        _timestamp("update_time"),
        sa.PrimaryKeyConstraint("ticker", name="pk_series"),
    )
    op.create_table(
        "events",
        _text("event_ticker"),
        _text("series_ticker"),
        _text("title"),
        _text("sub_title"),
        _text("category"),
        _bool("mutually_exclusive"),
        _timestamp("strike_time", nullable=True),
        _timestamp("update_time"),
        sa.PrimaryKeyConstraint("event_ticker", name="pk_events"),
    )
    op.create_index("ix_events_series_ticker", "events", ["series_ticker"])
    op.create_table(
        "markets",
        _text("ticker"),
        _text("event_ticker"),
        _text("series_ticker"),
        _text("title"),
        _text("subtitle"),
        _text("yes_sub_title"),
        _text("no_sub_title"),
        _text("market_type"),
        _smallint("status"),
        _smallint("result"),
        _timestamp("open_time", nullable=True),
        _timestamp("close_time", nullable=True),
        _timestamp("expiration_time", nullable=True),
        _timestamp("settlement_time", nullable=True),
        _bigint("settlement_value", nullable=True),
        _text("price_level_structure"),
        _bool("fractional_trading_enabled"),
        _text("rules_primary"),
        _timestamp("update_time"),
        sa.PrimaryKeyConstraint("ticker", name="pk_markets"),
    )
    op.create_index("ix_markets_event_ticker", "markets", ["event_ticker"])
    op.create_index("ix_markets_series_ticker", "markets", ["series_ticker"])
    op.create_table(
        "market_snapshots",
        _identity_id(),
        _text("ticker"),
        _smallint("source"),
        _timestamp("exchange_time"),
        _timestamp("receive_time"),
        *(
            _bigint(name, nullable=True)
            for name in (
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
        ),
        _smallint("status"),
        sa.PrimaryKeyConstraint("id", name="pk_market_snapshots"),
        sa.UniqueConstraint(
            "ticker", "source", "exchange_time", "receive_time", name="uq_market_snapshots_key"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_market_snapshots_ticker_exchange_time_id",
        "market_snapshots",
        ["ticker", "exchange_time", "id"],
    )
    op.create_table(
        "trades",
        _text("trade_id"),
        _text("ticker"),
        _bigint("yes_price"),
        _bigint("no_price"),
        _bigint("count"),
        _smallint("taker_side"),
        _timestamp("create_time"),
        sa.PrimaryKeyConstraint("trade_id", name="pk_trades"),
    )
    op.create_index(
        "ix_trades_ticker_create_time_trade_id", "trades", ["ticker", "create_time", "trade_id"]
    )
    op.create_table(
        "feed_gaps",
        _identity_id(),
        _text("channel"),
        _bigint("subscription_id"),
        _bigint("expected_sequence"),
        _bigint("received_sequence"),
        _timestamp("detect_time"),
        _text("ticker"),
        _bool("recovered"),
        _timestamp("recover_time", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_feed_gaps"),
        sa.UniqueConstraint(
            "channel",
            "subscription_id",
            "expected_sequence",
            "detect_time",
            name="uq_feed_gaps_key",
        ),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "backtests",
        _text("backtest_id"),
        _text("parent_backtest_id", nullable=True),
        _text("strategy"),
        _smallint("state"),
        _json("config"),
        _json("sweep", nullable=True),
        sa.Column("fraction_done", sa.Double(), nullable=False),
        _bigint("snapshots_processed"),
        _bigint("snapshots_total"),
        _bigint("interim_pnl"),
        _json("metrics", nullable=True),
        _bigint("row_count"),
        _bigint("first_snapshot_id"),
        _bigint("last_snapshot_id"),
        _text("content_hash"),
        _text("code_version"),
        _timestamp("create_time"),
        _timestamp("run_start_time", nullable=True),
        _timestamp("run_end_time", nullable=True),
        _text("error_message"),
        _json("ranked_child_ids"),
        sa.PrimaryKeyConstraint("backtest_id", name="pk_backtests"),
    )
    op.create_index(
        "ix_backtests_create_time_backtest_id", "backtests", ["create_time", "backtest_id"]
    )
    op.create_index("ix_backtests_parent_backtest_id", "backtests", ["parent_backtest_id"])
    op.create_index("ix_backtests_strategy", "backtests", ["strategy"])
    op.create_table(
        "backtest_executions",
        _text("backtest_id"),
        _bigint("sequence"),
        _text("ticker"),
        _timestamp("time"),
        _bigint("snapshot_id"),
        _smallint("side"),
        _smallint("action"),
        *(
            _bigint(name)
            for name in (
                "count",
                "price",
                "fee",
                "cash_after",
                "position_after",
                "realized_pnl",
            )
        ),
        sa.PrimaryKeyConstraint("backtest_id", "sequence", name="pk_backtest_executions"),
        sa.ForeignKeyConstraint(
            ["backtest_id"],
            ["backtests.backtest_id"],
            name="fk_backtest_executions_backtest_id_backtests",
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "backtest_equity_points",
        _identity_id(),
        _text("backtest_id"),
        _timestamp("time"),
        _bigint("equity"),
        sa.PrimaryKeyConstraint("id", name="pk_backtest_equity_points"),
        sa.ForeignKeyConstraint(
            ["backtest_id"],
            ["backtests.backtest_id"],
            name="fk_backtest_equity_points_backtest_id_backtests",
            ondelete="CASCADE",
        ),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_backtest_equity_points_backtest_id_time",
        "backtest_equity_points",
        ["backtest_id", "time"],
    )


def downgrade() -> None:
    for table in (
        "backtest_equity_points",
        "backtest_executions",
        "backtests",
        "feed_gaps",
        "trades",
        "market_snapshots",
        "markets",
        "events",
        "series",
    ):
        op.drop_table(table)
