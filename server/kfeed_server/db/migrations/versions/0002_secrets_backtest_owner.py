"""Server secrets (the token key) and the creator of each backtest.

Revision ID: 0002_secrets_backtest_owner
Revises: 0001_initial
Create Date: 2026-12-05

``server_secrets`` holds secrets every replica of one database must share, today the key that
authenticates page and resume tokens (docs/adr/0012-request-tokens-and-hostile-input.md).
``backtests.created_by`` is the name of the token that created the run ("" for runs created
before this revision), so only its creator or an admin may cancel it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_secrets_backtest_owner"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "server_secrets",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_server_secrets"),
    )
    with op.batch_alter_table("backtests") as batch:
        batch.add_column(sa.Column("created_by", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("backtests") as batch:
        batch.drop_column("created_by")
    op.drop_table("server_secrets")
