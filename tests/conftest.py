"""Fixtures shared by the whole suite: a fresh, migrated, empty database per test, a real kfeed
server on it, and the server's log lines. (Helpers that are not fixtures live in tests/support/.)

``database_url`` runs each test that uses it on SQLite and on PostgreSQL (127.0.0.1:5432, user
postgres, admin database ``test``). PostgreSQL databases are cloned from a template migrated once
per schema version (its name carries a hash of the migrations), so a test pays for a
``CREATE DATABASE … TEMPLATE`` only, and parallel xdist workers never share a database.
Without a reachable PostgreSQL the PostgreSQL half is skipped, or fails when
``KFEED_TEST_REQUIRE_POSTGRES=1`` (CI).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from kfeed_server.app import KfeedServer, ServerConfig, warm_up_compiled_reads
from kfeed_server.db import create_engine, create_writer_engine, upgrade_to_head
from kfeed_server.db.migrate import MIGRATIONS_DIR
from kfeed_server.db.repositories import Repositories, build_repositories
from kfeed_server.logs import JsonFormatter, _RequestIdFilter
from tests.support.servers import PublishSession, serving

POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
POSTGRES_URL_TEMPLATE = "postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"
# Any fixed number: the PostgreSQL advisory lock that serialises template creation across workers.
_TEMPLATE_LOCK_KEY = 0x6B66_6565_64


def _schema_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(MIGRATIONS_DIR.rglob("*.py")):
        digest.update(path.relative_to(MIGRATIONS_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


async def _admin_connection() -> asyncpg.Connection:
    return await asyncpg.connect(POSTGRES_DSN, timeout=5)


async def _ensure_template(name: str) -> None:
    admin = await _admin_connection()
    try:
        await admin.execute("SELECT pg_advisory_lock($1)", _TEMPLATE_LOCK_KEY)
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return
        # Templates of other schema versions are dropped once they are a day old: a checkout on
        # another branch (or a parallel worktree) may still be cloning from a younger one.
        stale = await admin.fetch(
            "SELECT d.datname FROM pg_database d"
            " LEFT JOIN pg_shdescription s ON s.objoid = d.oid"
            " WHERE d.datname LIKE 'kfeed_template_%' AND d.datname NOT LIKE '%_building'"
            " AND coalesce(s.description, '0')::double precision"
            " < extract(epoch FROM now()) - 86400"
        )
        for row in stale:
            await admin.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
        # Built under a temporary name and renamed when complete, so a crash never leaves a
        # half-migrated template behind under the real name.
        building = f"{name}_building"
        await admin.execute(f'DROP DATABASE IF EXISTS "{building}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{building}"')
        engine = create_engine(POSTGRES_URL_TEMPLATE.format(database=building))
        try:
            await upgrade_to_head(engine)
        finally:
            await engine.dispose()
        await admin.execute(f'ALTER DATABASE "{building}" RENAME TO "{name}"')
        created = await admin.fetchval("SELECT extract(epoch FROM now())::text")
        await admin.execute(f"COMMENT ON DATABASE \"{name}\" IS '{created}'")
    finally:
        await admin.execute("SELECT pg_advisory_unlock($1)", _TEMPLATE_LOCK_KEY)
        await admin.close()


@pytest.fixture(scope="session", autouse=True)
def compiled_reads() -> None:
    """The numba kernels of columnar reads, compiled (or loaded from numba's cache) once per
    worker before any test: `kfeed serve` does it after start-up; a first compile inside a test
    would hold the GIL for seconds and starve the event loop the test is timing."""
    warm_up_compiled_reads()


@pytest.fixture(scope="session")
async def postgres_template() -> str | None:
    """The migrated template database's name, or None when PostgreSQL is unreachable."""
    name = f"kfeed_template_{_schema_hash()}"
    try:
        await _ensure_template(name)
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        if os.environ.get("KFEED_TEST_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is required but unusable: {error!r}")
        return None
    return name


async def _postgres_database(template: str | None) -> AsyncIterator[str]:
    if template is None:
        if os.environ.get("KFEED_TEST_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL at 127.0.0.1:5432 is required but unreachable")
        pytest.skip("PostgreSQL at 127.0.0.1:5432 is unreachable")
    name = f"kfeed_t_{secrets.token_hex(6)}"
    admin = await _admin_connection()
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        yield POSTGRES_URL_TEMPLATE.format(database=name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
async def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database file, copied for each test instead of migrating each time."""
    path = tmp_path_factory.mktemp("sqlite-template") / "kfeed.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        await upgrade_to_head(engine)
    finally:
        # Closing the last connection checkpoints the WAL into the file, so the copy is complete.
        await engine.dispose()
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    sqlite_template: Path,
    postgres_template: str | None,
) -> AsyncIterator[str]:
    """The URL of a fresh, migrated, empty database for this test (SQLite, then PostgreSQL)."""
    if request.param == "sqlite":
        database = tmp_path / "kfeed-test.db"
        shutil.copyfile(sqlite_template, database)
        yield f"sqlite+aiosqlite:///{database}"
    else:
        async for url in _postgres_database(postgres_template):
            yield url


@pytest.fixture
async def postgres_url(postgres_template: str | None) -> AsyncIterator[str]:
    """A fresh, migrated, empty PostgreSQL database, for what only PostgreSQL does."""
    async for url in _postgres_database(postgres_template):
        yield url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An ``AsyncEngine`` on this test's database, disposed afterwards."""
    engine = create_engine(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def repositories(engine: AsyncEngine, database_url: str) -> AsyncIterator[Repositories]:
    """Every repository, on this test's database; the ingest writer on its own engine as the
    server has it (SQLite: statements on the event loop's thread)."""
    writer = create_writer_engine(database_url)
    try:
        yield build_repositories(engine, writer)
    finally:
        if writer is not None:
            await writer.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    """A fresh migrated SQLite database, for what does not depend on the engine (auth, TLS,
    metrics, clients)."""
    database = tmp_path / "kfeed-sqlite.db"
    shutil.copyfile(sqlite_template, database)
    return f"sqlite+aiosqlite:///{database}"


@pytest.fixture
async def kfeed_server(database_url: str) -> AsyncIterator[KfeedServer]:
    """A real server on ``database_url``, on an ephemeral loopback port."""
    async with serving(ServerConfig(listen="127.0.0.1:0", database_url=database_url)) as server:
        yield server


@pytest.fixture
async def channel(kfeed_server: KfeedServer) -> AsyncIterator[grpc.aio.Channel]:
    """A plaintext channel to ``kfeed_server``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{kfeed_server.port}") as open_channel:
        yield open_channel


@pytest.fixture
async def publisher(channel: grpc.aio.Channel) -> AsyncIterator[PublishSession]:
    """An open IngestService.Publish stream to ``kfeed_server``."""
    async with PublishSession(channel) as session:
        yield session


@pytest.fixture
def json_log_lines() -> Iterator[list[str]]:
    """Every log record of the process, at DEBUG, formatted as the server's JSON lines."""

    class _Lines(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.lines: list[str] = []
            self.addFilter(_RequestIdFilter())
            self.setFormatter(JsonFormatter())

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(self.format(record))

    handler = _Lines()
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e is marked `e2e` (a conftest's `pytestmark` marks nothing)."""
    e2e_dir = Path(__file__).parent / "e2e"
    for item in items:
        if item.path.is_relative_to(e2e_dir):
            item.add_marker(pytest.mark.e2e)
