"""PostgreSQL: order-book changes land in day partitions made ahead; retention drops old days.
SQLite has one plain table and nothing to maintain."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from kfeed_server.db.repositories import Repositories
from kfeed_server.db.repositories.books import insert_book_rows
from kfeed_server.records import BookChangeRecord, Side

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def change(moment: datetime, price: int) -> BookChangeRecord:
    return BookChangeRecord("KXPART-1", moment, moment, 1, Side.YES, price, 100)


async def _partition_rows(repositories: Repositories) -> dict[str, int]:
    async with repositories.engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT tableoid::regclass::text, count(*) FROM order_book_changes GROUP BY 1")
        )
        return {name: count for name, count in rows}


async def test_partitions_are_made_ahead_and_dropped_by_retention(
    repositories: Repositories,
) -> None:
    books = repositories.books
    created, dropped = await books.maintain_partitions(NOW, 3, None)
    if repositories.engine.dialect.name == "sqlite":
        assert (created, dropped) == ([], [])
        return
    assert created == [f"order_book_changes_p{day}" for day in range(20260309, 20260314)]
    assert dropped == []
    assert await books.maintain_partitions(NOW, 3, None) == ([], [])  # idempotent
    async with repositories.sessions.begin() as session:
        connection = await session.connection()
        stored = await insert_book_rows(
            connection,
            [
                change(NOW, 10),
                change(NOW + timedelta(days=2), 20),
                change(NOW - timedelta(days=30), 30),
            ],
            [],
        )
    assert stored.changes == 3
    assert await _partition_rows(repositories) == {
        "order_book_changes_p20260310": 1,
        "order_book_changes_p20260312": 1,
        "order_book_changes_default": 1,  # outside every day partition
    }
    # three days on, with a retention of two days: the days wholly before 12:00 two days ago go
    later = NOW + timedelta(days=3)
    created, dropped = await books.maintain_partitions(later, 1, timedelta(days=2))
    assert created == ["order_book_changes_p20260314"]
    assert dropped == ["order_book_changes_p20260309", "order_book_changes_p20260310"]
    assert await _partition_rows(repositories) == {
        "order_book_changes_p20260312": 1,
        "order_book_changes_default": 1,
    }
