"""Fixtures of the ingest tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.fake_ingest_server import FakeIngestServer


@pytest.fixture
async def server() -> AsyncIterator[FakeIngestServer]:
    """A started :class:`FakeIngestServer` (the Publish peer of the publisher and runner tests)."""
    fake = FakeIngestServer()
    await fake.start()
    yield fake
    await fake.stop()
