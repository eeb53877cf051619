"""Order-book records the ingest publishes: level changes and full-book checkpoints.

A change says that one level's size *became* ``size`` (0: the level is gone), not by how much it
moved, so replaying changes is idempotent and a duplicate never corrupts a book. Changes go out as
``OrderBookChangeColumns`` (packed columns, like snapshots: docs/adr/0008-columnar-publish.md),
checkpoints as ``OrderBookCheckpoint`` messages (few). How they are stored and read back:
docs/adr/0017-order-book-storage.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from kfeed.v1 import ingest_service_pb2, types_pb2
from kfeed_ingest.kalshi.normalise import timestamp

START = ingest_service_pb2.ORDER_BOOK_CHECKPOINT_KIND_START
RESYNC = ingest_service_pb2.ORDER_BOOK_CHECKPOINT_KIND_RESYNC
PERIODIC = ingest_service_pb2.ORDER_BOOK_CHECKPOINT_KIND_PERIODIC
LOST = ingest_service_pb2.ORDER_BOOK_CHECKPOINT_KIND_LOST

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(moment: datetime) -> int:
    """Microseconds since the epoch of an aware datetime, exactly (no float)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class BookChange(NamedTuple):
    """One level of one market's book took a new size (counts in 1/100 contract)."""

    ticker: str
    exchange_time_us: int
    receive_time_us: int
    sequence: int  # the frame's seq on its subscription; 0 = unknown
    side: types_pb2.Side.ValueType
    price: int
    size: int


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """A periodic checkpoint is due after ``every_changes`` changes or ``every_seconds`` of a
    market's exchange time since its last checkpoint, whichever comes first."""

    every_changes: int = 1_000
    every_seconds: float = 60.0


def book_levels(side: Mapping[int, int]) -> list[types_pb2.PriceLevel]:
    """``{price: size}`` as price levels, best (highest price) first."""
    return [
        types_pb2.PriceLevel(
            price=types_pb2.Dollars(ten_thousandths=price),
            size=types_pb2.Contracts(hundredths=size),
        )
        for price, size in sorted(side.items(), reverse=True)
    ]


def checkpoint(
    ticker: str,
    kind: ingest_service_pb2.OrderBookCheckpointKind.ValueType,
    exchange_time: datetime,
    receive_time: datetime,
    sequence: int | None,
    yes: Mapping[int, int],
    no: Mapping[int, int],
) -> ingest_service_pb2.OrderBookCheckpoint:
    """A full book as published (``LOST``: the last book known before the feed broke)."""
    book = types_pb2.OrderBook(
        ticker=ticker,
        exchange_time=timestamp(exchange_time),
        receive_time=timestamp(receive_time),
        yes_bids=book_levels(yes),
        no_bids=book_levels(no),
    )
    if sequence:
        book.exchange_sequence = sequence
    return ingest_service_pb2.OrderBookCheckpoint(book=book, kind=kind)


def _value_columns(changes: Sequence[BookChange]) -> ingest_service_pb2.OrderBookChangeColumns:
    """Every column of ``changes`` but the tickers, rows in the same order."""
    return ingest_service_pb2.OrderBookChangeColumns(
        exchange_time_micros=[c.exchange_time_us for c in changes],
        receive_time_micros=[c.receive_time_us for c in changes],
        exchange_sequence=[c.sequence for c in changes],
        side=[c.side for c in changes],
        price=[c.price for c in changes],
        size=[c.size for c in changes],
    )


def change_columns(
    changes: Sequence[BookChange],
) -> ingest_service_pb2.OrderBookChangeColumns:
    """``changes`` as columns, rows in the same order."""
    ticker_numbers: dict[str, int] = {}
    columns = _value_columns(changes)
    columns.ticker_index.extend(
        [ticker_numbers.setdefault(c.ticker, len(ticker_numbers)) for c in changes]
    )
    columns.tickers.extend(ticker_numbers)
    return columns


def recorded_change_columns(
    changes: Sequence[BookChange],
) -> ingest_service_pb2.OrderBookChangeColumns:
    """``changes`` as columns in the form without a dictionary (``ticker_index`` empty, one
    ticker per row), which stays valid when such messages are merged (the spool's recorded
    rows)."""
    columns = _value_columns(changes)
    columns.tickers.extend([c.ticker for c in changes])
    return columns
