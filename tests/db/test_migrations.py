"""Migrations build exactly the models' schema, and go down and up again, on both databases."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from kfeed_server.db import create_engine, downgrade_to_base, schema_is_current, upgrade_to_head
from kfeed_server.db.models import Base, is_partition

KFEED_TABLES = set(Base.metadata.tables)


def _schema_diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection,
        opts={
            "compare_type": True,
            "include_name": lambda name, kind, _: not (kind == "table" and is_partition(name)),
        },
    )
    return list(compare_metadata(context, Base.metadata))


def _table_names(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_migrated_schema_matches_the_models(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        assert await connection.run_sync(_schema_diff) == []
    assert await schema_is_current(engine)


async def test_upgrade_downgrade_upgrade(engine: AsyncEngine) -> None:
    await downgrade_to_base(engine)
    async with engine.connect() as connection:
        assert await connection.run_sync(_table_names) & KFEED_TABLES == set()
    assert not await schema_is_current(engine)

    await upgrade_to_head(engine)
    async with engine.connect() as connection:
        assert await connection.run_sync(_table_names) >= KFEED_TABLES
        assert await connection.run_sync(_schema_diff) == []
    assert await schema_is_current(engine)


async def test_upgrade_is_a_no_op_when_current(engine: AsyncEngine) -> None:
    await upgrade_to_head(engine)
    assert await schema_is_current(engine)


async def test_servers_starting_together_migrate_one_after_the_other(
    engine: AsyncEngine, database_url: str
) -> None:
    """Replicas started at once on a new database: every upgrade succeeds, the schema once."""
    await downgrade_to_base(engine)
    engines = [create_engine(database_url) for _ in range(3)]
    try:
        await asyncio.gather(*(upgrade_to_head(e) for e in engines))
    finally:
        for other in engines:
            await other.dispose()
    assert await schema_is_current(engine)
    async with engine.connect() as connection:
        assert await connection.run_sync(_schema_diff) == []
