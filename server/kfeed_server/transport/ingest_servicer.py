"""kfeed.v1.IngestService: batches in, one ack per batch out, sent only after commit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import code_pb2

from kfeed.v1 import ingest_service_pb2 as pb
from kfeed.v1 import ingest_service_pb2_grpc as pb_grpc
from kfeed.v1 import types_pb2
from kfeed_server.db.repositories import Repositories
from kfeed_server.observability.metrics import record_refused_batch, record_stored_batch
from kfeed_server.records import DataSource, MarketResult, MarketStatus, Side, SnapshotRecord
from kfeed_server.streaming.hub import SnapshotHub
from kfeed_server.transport.convert import (
    event_from_proto,
    feed_gap_from_proto,
    market_from_proto,
    series_from_proto,
    snapshot_from_proto,
    trade_from_proto,
)
from kfeed_server.transport.errors import FieldViolation

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
ONE_DOLLAR = 10_000
MAX_BATCH_ROWS = 100_000


_ENUM_VALUES: dict[type[Any], frozenset[int]] = {}


def _enum_values(known: type[Any]) -> frozenset[int]:
    values = _ENUM_VALUES.get(known)
    if values is None:
        values = _ENUM_VALUES[known] = frozenset(int(m) for m in known)
    return values


@dataclass(slots=True)
class _Validator:
    """Collects every violation of a batch, so one ack tells the producer all that is wrong."""

    violations: list[FieldViolation]

    def require(self, ok: bool, field: str, description: str) -> None:
        if not ok:
            self.violations.append(FieldViolation(field, description))

    def ticker(self, value: str, field: str) -> None:
        self.require(bool(value) and len(value) <= 128, field, "is required (at most 128 chars)")

    def timestamp(self, message: Message, name: str, path: str) -> None:
        self.require(message.HasField(name), f"{path}.{name}", "is required")

    def enum(self, value: int, known: type[Any], field: str, *, allow_unspecified: bool) -> None:
        valid = value in _enum_values(known) and (allow_unspecified or value != 0)
        self.require(valid, field, f"unknown or unspecified value {value}")

    def price(self, message: Message, name: str, path: str) -> None:
        if message.HasField(name):
            value = getattr(message, name).ten_thousandths
            self.require(0 <= value <= ONE_DOLLAR, f"{path}.{name}", "must be within $0–$1")

    def count(self, message: Message, name: str, path: str) -> None:
        if message.HasField(name):
            value = getattr(message, name).hundredths
            self.require(value >= 0, f"{path}.{name}", "must not be negative")


def validate_batch(
    request: pb.PublishRequest, *, snapshots_checked: bool = False
) -> list[FieldViolation]:
    """Every problem with ``request``; empty when it can be stored. ``snapshots_checked``: the
    snapshots are known to be valid already (``snapshot_records`` converted them all)."""
    check = _Validator([])
    rows = (
        sum(
            len(rows)
            for rows in (request.series, request.events, request.markets, request.snapshots)
        )
        + len(request.trades)
        + len(request.feed_gaps)
    )
    check.require(rows <= MAX_BATCH_ROWS, "batch", f"at most {MAX_BATCH_ROWS} rows per batch")
    for i, series in enumerate(request.series):
        check.ticker(series.ticker, f"series[{i}].ticker")
    for i, event in enumerate(request.events):
        check.ticker(event.event_ticker, f"events[{i}].event_ticker")
    for i, market in enumerate(request.markets):
        path = f"markets[{i}]"
        check.ticker(market.ticker, f"{path}.ticker")
        check.enum(market.status, MarketStatus, f"{path}.status", allow_unspecified=True)
        check.enum(market.result, MarketResult, f"{path}.result", allow_unspecified=True)
    for i, snapshot in enumerate(() if snapshots_checked else request.snapshots):
        path = f"snapshots[{i}]"
        check.ticker(snapshot.ticker, f"{path}.ticker")
        check.timestamp(snapshot, "exchange_time", path)
        check.timestamp(snapshot, "receive_time", path)
        check.enum(snapshot.source, DataSource, f"{path}.source", allow_unspecified=False)
        check.enum(snapshot.status, MarketStatus, f"{path}.status", allow_unspecified=True)
        for name in ("yes_bid", "yes_ask", "no_bid", "no_ask", "last_price"):
            check.price(snapshot, name, path)
        for name in ("yes_bid_size", "yes_ask_size", "volume", "volume_24h", "open_interest"):
            check.count(snapshot, name, path)
    for i, trade in enumerate(request.trades):
        path = f"trades[{i}]"
        check.require(bool(trade.trade_id), f"{path}.trade_id", "is required")
        check.ticker(trade.ticker, f"{path}.ticker")
        check.timestamp(trade, "create_time", path)
        check.enum(trade.taker_side, Side, f"{path}.taker_side", allow_unspecified=True)
        check.price(trade, "yes_price", path)
        check.price(trade, "no_price", path)
        check.count(trade, "count", path)
    for i, gap in enumerate(request.feed_gaps):
        path = f"feed_gaps[{i}]"
        check.require(bool(gap.channel), f"{path}.channel", "is required")
        check.timestamp(gap, "detect_time", path)
    return check.violations


def _snapshot_record(m: types_pb2.MarketSnapshot) -> SnapshotRecord | None:
    """The record of a valid snapshot message; None when anything in it is invalid, which
    ``validate_batch`` then spells out. The checks run on the record, cheaper than on messages."""
    if not (m.HasField("exchange_time") and m.HasField("receive_time")):
        return None
    try:
        record = snapshot_from_proto(m)
    except ValueError:
        return None
    prices = (record.yes_bid, record.yes_ask, record.no_bid, record.no_ask, record.last_price)
    counts = (
        record.yes_bid_size, record.yes_ask_size, record.volume, record.volume_24h,
        record.open_interest,
    )  # fmt: skip
    valid = (
        0 < len(record.ticker) <= 128
        and record.source is not DataSource.UNSPECIFIED
        and all(price is None or 0 <= price <= ONE_DOLLAR for price in prices)
        and all(count is None or count >= 0 for count in counts)
    )
    return record if valid else None


def snapshot_records(request: pb.PublishRequest) -> list[SnapshotRecord] | None:
    """The records of the batch's snapshots when every one is valid, else None."""
    records = []
    for message in request.snapshots:
        record = _snapshot_record(message)
        if record is None:
            return None
        records.append(record)
    return records


@dataclass(frozen=True, slots=True)
class _Checked:
    """A batch after the checks that need no database: its problems, or its snapshots' records
    (None when some snapshot is invalid; then ``violations`` names it)."""

    request: pb.PublishRequest
    snapshots: list[SnapshotRecord] | None
    violations: list[FieldViolation]


def _check(request: pb.PublishRequest) -> _Checked:
    snapshots = snapshot_records(request)
    violations = validate_batch(request, snapshots_checked=snapshots is not None)
    return _Checked(request, snapshots, violations)


def _unknown_market_violations(request: pb.PublishRequest, known: set[str]) -> list[FieldViolation]:
    unknown = [
        (f"snapshots[{i}]", s.ticker)
        for i, s in enumerate(request.snapshots)
        if s.ticker not in known
    ]
    unknown += [
        (f"trades[{i}]", t.ticker) for i, t in enumerate(request.trades) if t.ticker not in known
    ]
    return [
        FieldViolation(f"{path}.ticker", f"unknown market {ticker!r}: publish it first")
        for path, ticker in unknown
    ]


def _refusal(batch_id: int, violations: list[FieldViolation]) -> pb.PublishResponse:
    return pb.PublishResponse(
        batch_id=batch_id,
        code=code_pb2.INVALID_ARGUMENT,
        message=f"batch refused: {len(violations)} invalid field(s)",
        field_violations=[
            pb.FieldViolation(field=v.field, description=v.description) for v in violations[:100]
        ],
    )


class IngestServicer(pb_grpc.IngestServiceServicer):
    """Stores batches idempotently, publishes them to live subscribers, acks after commit."""

    def __init__(self, repositories: Repositories, hub: SnapshotHub) -> None:
        self._markets = repositories.markets
        self._writer = repositories.ingest
        self._hub = hub
        # One batch at a time: snapshot ids then commit in increasing order, which is what
        # makes "after id N" an exact resume point for stream subscribers.
        self._write_lock = asyncio.Lock()

    async def _store(self, checked: _Checked) -> pb.PublishResponse:
        request, snapshots, violations = checked.request, checked.snapshots, checked.violations
        if not violations:
            referenced = {t.ticker for t in request.trades}
            referenced.update(s.ticker for s in snapshots or request.snapshots)
            known = {m.ticker for m in request.markets}
            known |= await self._markets.existing_tickers(sorted(referenced - known))
            violations = _unknown_market_violations(request, known)
        if violations:
            summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
            log.warning("batch %d from %r refused: %s", request.batch_id, request.producer, summary)
            record_refused_batch()
            return _refusal(request.batch_id, violations)
        markets = [market_from_proto(m) for m in request.markets]
        async with self._write_lock:
            result = await self._writer.write_batch(
                series=[series_from_proto(s) for s in request.series],
                events=[event_from_proto(e) for e in request.events],
                markets=markets,
                snapshots=(
                    [snapshot_from_proto(s) for s in request.snapshots]
                    if snapshots is None
                    else snapshots
                ),
                trades=[trade_from_proto(t) for t in request.trades],
                feed_gaps=[feed_gap_from_proto(g) for g in request.feed_gaps],
            )
            self._hub.remember_markets(markets)
            self._hub.publish(result.stored_snapshots, result.stored_gaps)
        record_stored_batch(result)
        return pb.PublishResponse(
            batch_id=request.batch_id,
            code=code_pb2.OK,
            snapshots_stored=result.counts.snapshots,
            trades_stored=result.counts.trades,
        )

    async def Publish(
        self, request_iterator: AsyncIterator[pb.PublishRequest], context: Context
    ) -> AsyncIterator[pb.PublishResponse]:
        async for request in request_iterator:
            yield await self._store(_check(request))
