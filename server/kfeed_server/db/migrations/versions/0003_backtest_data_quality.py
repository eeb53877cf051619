"""The data quality report of each backtest: feed gaps overlapping its markets and window.

Revision ID: 0003_backtest_data_quality
Revises: 0002_secrets_backtest_owner
Create Date: 2026-12-05

``backtests.data_quality`` is a JSON document (gap count, gap time, unrecovered gaps, coverage per
market), NULL until the run has read its data and for runs stored before this revision;
``backtests.event_count`` the books and trades it read besides snapshot rows.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003_backtest_data_quality"
down_revision: str | Sequence[str] | None = "0002_secrets_backtest_owner"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("backtests") as batch:
        kind = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
        batch.add_column(sa.Column("data_quality", kind, nullable=True))
        batch.add_column(
            sa.Column("event_count", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("backtests") as batch:
        batch.drop_column("event_count")
        batch.drop_column("data_quality")
