"""Fixtures of the client tests: a real kfeed server (SQLite only: these tests are about the
clients, not the database), seeded with tests/support/clients.py's data, and a cutting proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kfeed_server.app import KfeedServer
from tests.support.clients import MARKETS, SNAPSHOT_COUNT, TICKER, TcpProxy
from tests.support.factories import make_snapshot, make_trade
from tests.support.servers import PublishSession


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """Overrides the suite's SQLite+PostgreSQL parametrisation with SQLite alone."""
    return sqlite_url


@pytest.fixture
def address(kfeed_server: KfeedServer) -> str:
    """HOST:PORT of the running server."""
    return f"127.0.0.1:{kfeed_server.port}"


@pytest.fixture
async def seeded(publisher: PublishSession) -> PublishSession:
    """Five markets; seven snapshots and three trades of the first (``TICKER``)."""
    await publisher.publish(
        markets=MARKETS,
        snapshots=[make_snapshot(TICKER, i) for i in range(SNAPSHOT_COUNT)],
        trades=[make_trade(TICKER, i) for i in range(3)],
    )
    return publisher


@pytest.fixture
async def proxy(kfeed_server: KfeedServer) -> AsyncIterator[TcpProxy]:
    """A :class:`TcpProxy` in front of the server."""
    tcp_proxy = TcpProxy(kfeed_server.port)
    await tcp_proxy.start()
    try:
        yield tcp_proxy
    finally:
        await tcp_proxy.stop()
