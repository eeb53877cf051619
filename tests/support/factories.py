"""Builders of records for tests: deterministic, distinct market states unless told otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from kfeed_server.db.repositories.export import SNAPSHOT_REPLAY
from kfeed_server.records import (
    DataSource,
    EventRecord,
    FeedGapRecord,
    MarketRecord,
    MarketStatus,
    SeriesRecord,
    Side,
    SnapshotRecord,
    TradeRecord,
)

# A fixed instant with a non-zero microsecond part, so truncation shows up in round trips.
BASE_TIME = datetime(2025, 3, 14, 15, 9, 26, 535_897, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """``BASE_TIME`` plus ``seconds``."""
    return BASE_TIME + timedelta(seconds=seconds)


def make_snapshot(ticker: str, i: int, **overrides: Any) -> SnapshotRecord:
    """The ``i``-th snapshot of ``ticker``: one second apart, a different book for every ``i``."""
    exchange_time = at(i)
    snapshot = SnapshotRecord(
        ticker=ticker,
        exchange_time=exchange_time,
        receive_time=exchange_time + timedelta(microseconds=1_234),
        source=DataSource.WEBSOCKET,
        exchange_sequence=i,
        yes_bid=4_000 + i,
        yes_ask=4_100 + i,
        no_bid=5_900 - i,
        no_ask=6_000 - i,
        yes_bid_size=10_000,
        yes_ask_size=20_000,
        last_price=4_050,
        volume=100 * i,
        volume_24h=100 * i,
        open_interest=5_000,
        liquidity=1_000_000,
        status=MarketStatus.OPEN,
    )
    return snapshot._replace(**overrides)


def make_market(ticker: str, **overrides: Any) -> MarketRecord:
    """An open binary market in event ``EV-<ticker>`` of series ``SER``."""
    market = MarketRecord(
        ticker=ticker,
        event_ticker=f"EV-{ticker}",
        series_ticker="SER",
        title=f"Will {ticker} happen?",
        status=MarketStatus.OPEN,
        open_time=at(-3600),
        close_time=at(86_400),
    )
    return replace(market, **overrides)


def make_series(ticker: str = "SER", **overrides: Any) -> SeriesRecord:
    """A daily series."""
    return replace(SeriesRecord(ticker=ticker, title="Series", frequency="daily"), **overrides)


def make_event(event_ticker: str, **overrides: Any) -> EventRecord:
    """An event of series ``SER``."""
    event = EventRecord(event_ticker=event_ticker, series_ticker="SER", title="Event")
    return replace(event, **overrides)


def make_trade(ticker: str, i: int, **overrides: Any) -> TradeRecord:
    """The ``i``-th trade of ``ticker``, one second apart."""
    trade = TradeRecord(
        trade_id=f"{ticker}-t{i:06d}",
        ticker=ticker,
        yes_price=4_000 + i,
        no_price=6_000 - i,
        count=100,
        taker_side=Side.YES,
        create_time=at(i),
    )
    return replace(trade, **overrides)


def make_gap(i: int, **overrides: Any) -> FeedGapRecord:
    """The ``i``-th gap on the ticker channel."""
    gap = FeedGapRecord(
        channel="ticker",
        subscription_id=1,
        expected_sequence=10 * i,
        received_sequence=10 * i + 3,
        detect_time=at(i),
    )
    return replace(gap, **overrides)


def replay_columns(rows: Sequence[SnapshotRecord]) -> pa.RecordBatch:
    """Stored snapshots as the columns a replay reads them in (``SNAPSHOT_REPLAY``)."""
    fields = SNAPSHOT_REPLAY.schema.names
    values = {name: [getattr(r, name) for r in rows] for name in fields}
    for name in ("source", "status"):
        values[name] = [int(v) for v in values[name]]
    return pa.RecordBatch.from_pydict(values, schema=SNAPSHOT_REPLAY.schema)


def exported_row(snapshot: SnapshotRecord) -> dict[str, object]:
    """``snapshot`` as a row of an ExportSnapshots table (enums as their lowercase names)."""
    row: dict[str, object] = snapshot._asdict()
    row["source"] = snapshot.source.name.lower()
    row["status"] = snapshot.status.name.lower()
    return row
