"""Backtests say which definition their data fingerprint follows.

Revision ID: 0009_fingerprint_version
Revises: 0008_event_fee_overrides
Create Date: 2026-12-06

``backtests.fingerprint_version`` names the definition of ``content_hash`` (docs/BACKTESTING.md,
"Fingerprint"; ADR 0021): 2 hashes the snapshot columns, 1 the ``marshal`` encoding of 4,096-row
chunks. Runs stored before this revision were fingerprinted by version 1, hence the default;
hashes of different versions are not comparable.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_fingerprint_version"
down_revision: str | Sequence[str] | None = "0008_event_fee_overrides"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("backtests") as batch:
        batch.add_column(
            sa.Column("fingerprint_version", sa.SmallInteger(), nullable=False, server_default="1")
        )


def downgrade() -> None:
    with op.batch_alter_table("backtests") as batch:
        batch.drop_column("fingerprint_version")
