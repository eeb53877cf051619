"""Events keep Kalshi's event-level fee overrides.

Revision ID: 0008_event_fee_overrides
Revises: 0007_backtest_walk_forward
Create Date: 2026-12-05

``events.fee_type_override`` replaces the series' fee type when not empty;
``events.fee_multiplier_override_ten_thousandths`` its fee multiplier when not NULL. Events stored
before this revision have neither (the series' terms apply, as before).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_event_fee_overrides"
down_revision: str | Sequence[str] | None = "0007_backtest_walk_forward"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.add_column(
            sa.Column("fee_type_override", sa.Text(), nullable=False, server_default="")
        )
        batch.add_column(
            sa.Column("fee_multiplier_override_ten_thousandths", sa.BigInteger(), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_column("fee_multiplier_override_ten_thousandths")
        batch.drop_column("fee_type_override")
