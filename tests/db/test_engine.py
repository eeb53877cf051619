"""create_engine: SQLite gets its folder, WAL, foreign keys and a busy timeout."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from kfeed_server.db import create_engine, schema_is_current, upgrade_to_head
from kfeed_server.db.engine import SQLITE_BUSY_TIMEOUT_MS


async def test_sqlite_engine_creates_folder_and_sets_pragmas(tmp_path: Path) -> None:
    database = tmp_path / "nested" / "folder" / "kfeed.db"
    engine = create_engine(f"sqlite+aiosqlite:///{database}")
    try:
        async with engine.connect() as connection:
            journal = await connection.scalar(text("PRAGMA journal_mode"))
            foreign_keys = await connection.scalar(text("PRAGMA foreign_keys"))
            busy_timeout = await connection.scalar(text("PRAGMA busy_timeout"))
        assert (journal, foreign_keys, busy_timeout) == ("wal", 1, SQLITE_BUSY_TIMEOUT_MS)
        assert database.exists()
        assert not await schema_is_current(engine)
        await upgrade_to_head(engine)
        assert await schema_is_current(engine)
    finally:
        await engine.dispose()
