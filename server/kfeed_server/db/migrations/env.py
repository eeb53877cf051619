"""Alembic environment: runs on a connection that ``kfeed_server.db.migrate`` hands over, or on the
URL in the config's ``sqlalchemy.url`` (or ``KFEED_DATABASE_URL``) when run from the alembic CLI."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection

from kfeed_server.db.engine import DEFAULT_DATABASE_URL, create_engine
from kfeed_server.db.models import Base

config = context.config
target_metadata = Base.metadata


def _run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place: batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine() -> None:
    url = (
        config.get_main_option("sqlalchemy.url")
        or os.environ.get("KFEED_DATABASE_URL")
        or DEFAULT_DATABASE_URL
    )
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_run_on)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("kfeed migrations run online only")

handed_over = config.attributes.get("connection")
if isinstance(handed_over, Connection):
    _run_on(handed_over)
else:
    asyncio.run(_run_with_own_engine())
