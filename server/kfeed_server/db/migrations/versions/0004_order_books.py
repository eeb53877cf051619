"""Order books: every level change, and full-book checkpoints.

Revision ID: 0004_order_books
Revises: 0003_backtest_data_quality
Create Date: 2026-12-05

``order_book_changes`` holds one row per level whose size changed (the new size, not the delta),
keyed by (ticker, exchange_time, side, price, sequence): a batch sent twice is stored once, and
the key's prefix is the index a rebuild reads. On PostgreSQL the table is partitioned by
exchange time (declarative RANGE partitions of one day, created ahead by the server, plus a
DEFAULT partition that catches anything outside them); old partitions are dropped by retention.
``order_book_checkpoints`` holds full books (levels packed as little-endian int64 pairs).
See docs/adr/0017-order-book-storage.md.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_order_books"
down_revision: str | Sequence[str] | None = "0003_backtest_data_quality"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[object]:
    kind = sa.DateTime(timezone=True).with_variant(sa.BigInteger(), "sqlite")
    return sa.Column(name, kind, nullable=nullable)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE TABLE order_book_changes (
                ticker TEXT NOT NULL,
                exchange_time TIMESTAMPTZ NOT NULL,
                receive_time TIMESTAMPTZ NOT NULL,
                sequence BIGINT NOT NULL,
                side SMALLINT NOT NULL,
                price BIGINT NOT NULL,
                size BIGINT NOT NULL,
                CONSTRAINT pk_order_book_changes
                    PRIMARY KEY (ticker, exchange_time, side, price, sequence)
            ) PARTITION BY RANGE (exchange_time)
            """
        )
        op.execute(
            "CREATE TABLE order_book_changes_default PARTITION OF order_book_changes DEFAULT"
        )
    else:
        op.create_table(
            "order_book_changes",
            sa.Column("ticker", sa.Text(), nullable=False),
            _timestamp("exchange_time"),
            _timestamp("receive_time"),
            sa.Column("sequence", sa.BigInteger(), nullable=False),
            sa.Column("side", sa.SmallInteger(), nullable=False),
            sa.Column("price", sa.BigInteger(), nullable=False),
            sa.Column("size", sa.BigInteger(), nullable=False),
            sa.PrimaryKeyConstraint(
                "ticker", "exchange_time", "side", "price", "sequence", name="pk_order_book_changes"
            ),
        )
    op.create_table(
        "order_book_checkpoints",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), sa.Identity(),
            primary_key=True,
        ),
        sa.Column("ticker", sa.Text(), nullable=False),
        _timestamp("exchange_time"),
        _timestamp("receive_time"),
        sa.Column("sequence", sa.BigInteger(), nullable=True),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("yes_levels", sa.LargeBinary(), nullable=False),
        sa.Column("no_levels", sa.LargeBinary(), nullable=False),
        sa.UniqueConstraint(
            "ticker", "exchange_time", "kind", "receive_time",
            name="uq_order_book_checkpoints_key",
        ),
        sqlite_autoincrement=True,
    )  # fmt: skip


def downgrade() -> None:
    op.drop_table("order_book_checkpoints")
    op.drop_table("order_book_changes")
