"""SnapshotRecord's market state (what the ingest dedup compares) and its stored form."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from kfeed_server.records import DataSource, MarketStatus, SnapshotRecord
from tests.support.factories import make_snapshot

BASE = make_snapshot("KXSTATE-A", 1)
STATE_FIELDS = (
    "yes_bid", "yes_ask", "no_bid", "no_ask", "yes_bid_size", "yes_ask_size", "last_price",
    "volume", "volume_24h", "open_interest", "liquidity", "status",
)  # fmt: skip


@pytest.mark.parametrize("field", STATE_FIELDS)
def test_every_book_and_activity_field_changes_the_state(field: str) -> None:
    value = getattr(BASE, field)
    new_value: Any = MarketStatus.CLOSED if field == "status" else (value or 0) + 1
    changed = BASE._replace(**{field: new_value})
    assert not changed.same_market_state(BASE)
    assert changed.book_and_activity() != BASE.book_and_activity()


def test_unset_differs_from_zero() -> None:
    assert not BASE._replace(yes_bid=None).same_market_state(BASE._replace(yes_bid=0))


def test_times_source_sequence_and_id_are_not_state() -> None:
    later = BASE._replace(
        exchange_time=BASE.exchange_time + timedelta(seconds=1),
        receive_time=BASE.receive_time + timedelta(seconds=2),
        source=DataSource.BACKFILL,
        exchange_sequence=(BASE.exchange_sequence or 0) + 7,
        snapshot_id=99,
    )
    assert later.same_market_state(BASE)
    assert later.book_and_activity() == BASE.book_and_activity()


def test_another_market_in_the_same_state_is_another_state() -> None:
    other = BASE._replace(ticker="KXSTATE-B")
    assert not other.same_market_state(BASE)
    assert other.book_and_activity() == BASE.book_and_activity()


def test_with_id_keeps_every_field() -> None:
    stored = BASE.with_id(42)
    assert stored.snapshot_id == 42
    assert stored._replace(snapshot_id=BASE.snapshot_id) == BASE
    assert SnapshotRecord._fields[-1] == "snapshot_id"  # COPY rows put the id column last
