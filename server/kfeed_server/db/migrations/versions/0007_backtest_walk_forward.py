"""A walk-forward sweep's folds, stored with its parent.

Revision ID: 0007_backtest_walk_forward
Revises: 0006_book_stream_ids
Create Date: 2026-12-05

``backtests.walk_forward_folds`` is a JSON document (per fold: its windows, the best in-sample
child, the out-of-sample child), NULL for every other backtest and for runs stored before this
revision.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007_backtest_walk_forward"
down_revision: str | Sequence[str] | None = "0006_book_stream_ids"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("backtests") as batch:
        kind = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
        batch.add_column(sa.Column("walk_forward_folds", kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("backtests") as batch:
        batch.drop_column("walk_forward_folds")
