"""Async engines and session factories for PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

import sqlite3
from functools import partial
from pathlib import Path
from typing import Any

import aiosqlite
from sqlalchemy import event
from sqlalchemy.engine import Connection, ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///data/kfeed.db"
# The async driver each database runs on; a URL naming the database alone gets it.
_ASYNC_DRIVERS = {"postgresql": "asyncpg", "postgres": "asyncpg", "sqlite": "aiosqlite"}
_URL_FORMS = "sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST:PORT/DATABASE"

# Execution option naming the SQLite transaction mode ("IMMEDIATE" takes the write lock at BEGIN,
# so a read-then-write transaction can never fail to upgrade its lock halfway).
SQLITE_BEGIN_MODE = "kfeed_sqlite_begin"
SQLITE_BUSY_TIMEOUT_MS = 30_000
_SQLITE_BEGIN_MODES = frozenset({"DEFERRED", "IMMEDIATE", "EXCLUSIVE"})


class StorageUnavailable(Exception):
    """The database cannot serve the statement now but may shortly: the connection was lost, or
    SQLite's write lock stayed taken past the busy timeout. Callers answer "try again"."""


def normalise_database_url(url: str) -> str:
    """``url`` on kfeed's async driver: ``postgresql://…`` (or ``postgres://``) becomes
    ``postgresql+asyncpg://…`` and ``sqlite://…`` becomes ``sqlite+aiosqlite://…``; ValueError,
    naming the accepted forms, for anything else."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"not a database URL; expected {_URL_FORMS}") from None
    backend, _, driver = parsed.drivername.partition("+")
    wanted = _ASYNC_DRIVERS.get(backend)
    if wanted is None:
        raise ValueError(f"unsupported database {backend!r}; expected {_URL_FORMS}")
    if driver and driver != wanted:
        raise ValueError(f"kfeed reaches {backend} through {wanted}, not {driver}: {_URL_FORMS}")
    if not driver or backend == "postgres":
        backend = "postgresql" if backend == "postgres" else backend
        return parsed.set(drivername=f"{backend}+{wanted}").render_as_string(hide_password=False)
    return url


def create_engine(url: str) -> AsyncEngine:
    """An ``AsyncEngine`` for ``url``, configured for kfeed.

    SQLite: creates the database file's folder, turns on WAL, foreign keys and a busy timeout, and
    lets SQLAlchemy (not the sqlite3 module) emit BEGIN so transactions cover reads too.
    PostgreSQL (asyncpg): a pre-pinged pool with UTC sessions. A URL without its driver gets it
    (see :func:`normalise_database_url`).
    """
    url = normalise_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _create_sqlite_engine(url)
    else:
        options: dict[str, Any] = {}
        if parsed.get_backend_name() == "postgresql":
            options = {
                "pool_size": 10,
                "max_overflow": 10,
                "pool_pre_ping": True,
                "pool_recycle": 1800,
                "connect_args": {
                    "server_settings": {"timezone": "UTC", "application_name": "kfeed"}
                },
            }
        engine = _create_async_engine(url, **options)
    event.listen(engine.sync_engine, "handle_error", _transient_as_unavailable)
    return engine


def _transient_as_unavailable(context: ExceptionContext) -> None:
    # SQLAlchemy raises what a "handle_error" listener raises in place of the driver's error.
    original = context.original_exception
    if not isinstance(original, Exception):
        # A cancellation (or an interrupt) met inside a statement, which SQLAlchemy reports as a
        # disconnect: it must go on as itself, or the cancelled task would carry on.
        return
    if context.is_disconnect or is_sqlite_busy(original):
        raise StorageUnavailable(type(original).__name__) from original


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions on ``engine`` whose objects stay readable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


class _InlineConnection(aiosqlite.Connection):
    """aiosqlite's connection with its statements run on the calling thread, the event loop's;
    its own thread opens, commits and closes it. A commit is where the disk is written (the WAL,
    and now and then a checkpoint that syncs the database file), which must not stall the loop."""

    async def _execute(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)

    async def commit(self) -> None:
        await super()._execute(self._conn.commit)  # type: ignore[no-untyped-call]


def create_writer_engine(url: str) -> AsyncEngine | None:
    """For a SQLite database file: an engine of one connection whose statements run on the event
    loop's thread, for the ingest writer (ADR 0020); None for any other database.

    Through aiosqlite each statement is a round trip to its thread and back through the event
    loop's queue: about a dozen per ingest batch, each waiting behind whatever the loop is doing
    (live fan-out) and for the GIL, for what is a millisecond of SQLite work. Inline, a batch is
    one uninterrupted step and its commit one round trip. The connection never waits for
    SQLite's lock (busy timeout 0: a wait would block the loop); the writer retries its
    ``BEGIN IMMEDIATE`` instead (``is_sqlite_busy``), and once that holds the lock nothing else
    in its transaction waits (WAL)."""
    url = normalise_database_url(url)
    parsed = make_url(url)
    database = parsed.database
    if (
        parsed.get_backend_name() != "sqlite"
        or not database
        or database == ":memory:"
        or database.startswith("file:")
    ):
        return None
    path = str(Path(database).expanduser())

    async def connect() -> aiosqlite.Connection:
        connection = _InlineConnection(
            partial(sqlite3.connect, path, check_same_thread=False), iter_chunk_size=64
        )
        connection._thread.daemon = True  # as SQLAlchemy does for its own aiosqlite connections
        return await connection

    return _create_sqlite_engine(
        url, busy_timeout_ms=0, async_creator=connect, pool_size=1, max_overflow=0
    )


def is_sqlite_busy(error: BaseException) -> bool:
    """True when ``error`` is SQLite's "database is locked" (another connection writes)."""
    original = getattr(error, "orig", error)
    return (
        isinstance(original, sqlite3.OperationalError)
        and getattr(original, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
    )


def _create_sqlite_engine(
    url: str, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS, **options: Any
) -> AsyncEngine:
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = _create_async_engine(url, **options)

    @event.listens_for(engine.sync_engine, "connect")
    def _configure_connection(dbapi_connection: Any, _record: Any) -> None:
        # The sqlite3 module's own implicit BEGIN skips reads; SQLAlchemy's "begin" event below
        # replaces it so every transaction starts where SQLAlchemy says it does.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(SQLITE_BEGIN_MODE, "DEFERRED")
        if mode not in _SQLITE_BEGIN_MODES:
            raise ValueError(f"unknown SQLite transaction mode {mode!r}")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine
