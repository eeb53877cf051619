"""Order-book changes and checkpoints get a stream id: one sequence for both, increasing in
commit order, what StreamOrderBooks resumes by.

Revision ID: 0006_book_stream_ids
Revises: 0005_trade_stream_ids
Create Date: 2026-12-05

The writer assigns ids under its write lock (writes are serialised), so "id greater than the
last delivered" is exactly "not delivered yet". Rows stored before this revision are numbered
in exchange-time order, a change before a checkpoint of the same instant (a checkpoint holds
every change at or before its time).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_book_stream_ids"
down_revision: str | Sequence[str] | None = "0005_trade_stream_ids"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every stored row with its place in the stream; checkpoints have side and price -1.
_RANKED = """
SELECT ticker, exchange_time, side, price, sequence, checkpoint_id,
       row_number() OVER (ORDER BY exchange_time, checkpoint_id IS NOT NULL, sequence,
                          ticker, side, price, checkpoint_id) AS n
FROM (
    SELECT ticker, exchange_time, side, price, sequence, NULL AS checkpoint_id
    FROM order_book_changes
    UNION ALL
    SELECT ticker, exchange_time, -1, -1, COALESCE(sequence, 0), id FROM order_book_checkpoints
) AS book_rows
"""


def upgrade() -> None:
    for table in ("order_book_changes", "order_book_checkpoints"):
        op.add_column(table, sa.Column("stream_id", sa.BigInteger(), nullable=True))
    op.execute(
        f"UPDATE order_book_changes SET stream_id = ranked.n FROM ({_RANKED}) AS ranked "
        "WHERE ranked.checkpoint_id IS NULL AND order_book_changes.ticker = ranked.ticker "
        "AND order_book_changes.exchange_time = ranked.exchange_time "
        "AND order_book_changes.side = ranked.side AND order_book_changes.price = ranked.price "
        "AND order_book_changes.sequence = ranked.sequence"
    )
    op.execute(
        f"UPDATE order_book_checkpoints SET stream_id = ranked.n FROM ({_RANKED}) AS ranked "
        "WHERE order_book_checkpoints.id = ranked.checkpoint_id"
    )
    for table in ("order_book_changes", "order_book_checkpoints"):
        with op.batch_alter_table(table) as batch:
            batch.alter_column("stream_id", existing_type=sa.BigInteger(), nullable=False)
        # On PostgreSQL an index on the partitioned table: one per partition, made with it.
        op.create_index(f"ix_{table}_stream_id", table, ["stream_id"])


def downgrade() -> None:
    for table in ("order_book_changes", "order_book_checkpoints"):
        op.drop_index(f"ix_{table}_stream_id", table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("stream_id")
