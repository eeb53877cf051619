"""Trades get a stream id: increasing in commit order, what StreamTrades resumes by.

Revision ID: 0005_trade_stream_ids
Revises: 0004_order_books
Create Date: 2026-12-05

The writer assigns ids under its write lock (writes are serialised), so "id greater than the
last delivered" is exactly "not delivered yet". Trades stored before this revision are numbered
in (create_time, trade_id) order.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_trade_stream_ids"
down_revision: str | Sequence[str] | None = "0004_order_books"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("trades", sa.Column("stream_id", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE trades SET stream_id = ranked.n FROM (SELECT trade_id, row_number() OVER "
        "(ORDER BY create_time, trade_id) AS n FROM trades) AS ranked "
        "WHERE trades.trade_id = ranked.trade_id"
    )
    with op.batch_alter_table("trades") as batch:
        batch.alter_column("stream_id", existing_type=sa.BigInteger(), nullable=False)
        batch.create_unique_constraint("uq_trades_stream_id", ["stream_id"])


def downgrade() -> None:
    with op.batch_alter_table("trades") as batch:
        batch.drop_constraint("uq_trades_stream_id", type_="unique")
        batch.drop_column("stream_id")
