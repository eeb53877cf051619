"""Migrations build exactly the models' schema, and go down and up again, on both databases."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from kfeed_server.backtest import EngineConfig, fingerprint
from kfeed_server.db import create_engine, downgrade_to_base, schema_is_current, upgrade_to_head
from kfeed_server.db.migrate import alembic_config
from kfeed_server.db.models import Base, is_partition, trades_table
from kfeed_server.db.repositories import BacktestRecord, Repositories
from kfeed_server.db.repositories.markets import record_rows
from kfeed_server.records import BacktestState
from tests.support.factories import make_snapshot, make_trade

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


async def test_trades_stored_before_stream_ids_are_numbered_in_time_order(
    engine: AsyncEngine,
) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(
            lambda c: command.downgrade(alembic_config(c), "0004_order_books")
        )
    stored = [make_trade("KXOLD", i) for i in (2, 0, 1)]
    async with engine.begin() as connection:
        await connection.execute(trades_table.insert(), record_rows(stored))
    await upgrade_to_head(engine)
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(trades_table.c.trade_id).order_by(trades_table.c.stream_id)
        )
        assert [trade_id for (trade_id,) in rows] == [
            make_trade("KXOLD", i).trade_id for i in range(3)
        ]


async def test_backtests_stored_before_fingerprint_versions_are_version_1_and_still_verify(
    engine: AsyncEngine, repositories: Repositories
) -> None:
    """A run fingerprinted before version 2 existed reads back as version 1, and the version 1
    fingerprint of the same rows still equals its stored hash (version 2's does not)."""
    rows = [make_snapshot("KXOLD", i) for i in range(10)]
    printed = fingerprint(rows, tickers=("KXOLD",), version=1)
    stored = BacktestRecord(
        backtest_id="before-versions",
        config=EngineConfig("threshold", ("KXOLD",)),
        state=BacktestState.SUCCEEDED,
        row_count=printed.row_count,
        first_snapshot_id=printed.first_snapshot_id,
        last_snapshot_id=printed.last_snapshot_id,
        content_hash=printed.content_hash,
    )
    await repositories.backtests.create(stored)
    async with engine.begin() as connection:
        await connection.run_sync(
            lambda c: command.downgrade(alembic_config(c), "0008_event_fee_overrides")
        )
    await upgrade_to_head(engine)
    read = await repositories.backtests.get(stored.backtest_id)
    assert read == replace(stored, fingerprint_version=1)
    rerun = fingerprint(rows, tickers=("KXOLD",), version=read.fingerprint_version)
    assert rerun.content_hash == read.content_hash
    assert fingerprint(rows, tickers=("KXOLD",)).content_hash != read.content_hash
