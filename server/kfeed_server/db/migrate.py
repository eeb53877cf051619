"""Programmatic Alembic: upgrade, downgrade and check the schema without an alembic.ini.

Importing Alembic costs about half a second, most of `kfeed serve`'s start-up, and is needed only
when there is something to migrate: whether the database is current is decided from the scripts'
revision ids (read with ``ast``) and the ``alembic_version`` table, and Alembic is imported only
to actually upgrade or downgrade.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from kfeed_server.db.engine import SQLITE_BEGIN_MODE

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
VERSION_TABLE = "alembic_version"
# Held by the migrating transaction on PostgreSQL.
_MIGRATION_LOCK_KEY = 0x6B_66_65_65_64_02


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` for kfeed's migrations, optionally bound to an open connection."""
    from alembic.config import Config  # lazily: see the module docstring

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def script_heads() -> frozenset[str]:
    """The newest revision(s) of the migration scripts: revisions no other script revises."""
    revisions: set[str] = set()
    revised: set[str] = set()
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                name, value = node.target.id, node.value
            elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                name, value = node.targets[0].id, node.value
            else:
                continue
            if name == "revision" and value is not None:
                revisions.add(ast.literal_eval(value))
            elif name == "down_revision" and value is not None:
                parent = ast.literal_eval(value)
                revised.update([parent] if isinstance(parent, str) else parent or ())
    return frozenset(revisions - revised)


def _applied_heads(connection: Connection) -> frozenset[str]:
    if not inspect(connection).has_table(VERSION_TABLE):
        return frozenset()
    rows = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))
    return frozenset(str(row[0]) for row in rows)


async def schema_is_current(engine: AsyncEngine) -> bool:
    """True when the database is at the newest migration (and so matches the models)."""
    async with engine.connect() as connection:
        return await connection.run_sync(_applied_heads) == script_heads()


async def upgrade_to_head(engine: AsyncEngine) -> None:
    """Apply every migration not yet applied to ``engine``'s database."""
    if await schema_is_current(engine):
        return
    from alembic import command  # lazily: see the module docstring

    # Servers starting together on one database migrate one after the other (SQLite: the write
    # lock taken at BEGIN; PostgreSQL: an advisory lock); the later ones find the schema at head.
    async with engine.execution_options(**{SQLITE_BEGIN_MODE: "IMMEDIATE"}).begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY)))
        await connection.run_sync(lambda c: command.upgrade(alembic_config(c), "head"))


async def downgrade_to_base(engine: AsyncEngine) -> None:
    """Revert every migration: drops kfeed's tables (and their data)."""
    from alembic import command  # lazily: see the module docstring

    async with engine.begin() as connection:
        await connection.run_sync(lambda c: command.downgrade(alembic_config(c), "base"))
