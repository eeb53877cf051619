"""Secrets the server keeps in its database, so every replica of one database shares them."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kfeed_server.db.models import server_secrets_table
from kfeed_server.db.repositories._common import insert_for


class SecretRepository:
    """Named secrets, created once and then only read."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def get_or_create(self, name: str, new_value: Callable[[], bytes]) -> bytes:
        """The secret ``name``; stores ``new_value()`` first when there is none. Servers
        starting together agree: the first insert wins and every one reads it back."""
        table = server_secrets_table
        async with self._sessions.begin() as session:
            connection = await session.connection()
            await connection.execute(
                insert_for(connection, table)
                .values(name=name, value=new_value())
                .on_conflict_do_nothing(index_elements=[table.c.name])
            )
            value = (
                await connection.execute(select(table.c.value).where(table.c.name == name))
            ).scalar_one()
        return bytes(value)
