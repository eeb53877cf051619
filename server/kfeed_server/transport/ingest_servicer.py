"""kfeed.v1.IngestService: batches in, one ack per batch out, sent only after commit."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import code_pb2

from kfeed.v1 import ingest_service_pb2 as pb
from kfeed.v1 import ingest_service_pb2_grpc as pb_grpc
from kfeed.v1 import types_pb2
from kfeed_server.db.repositories import BatchWriteResult, Repositories
from kfeed_server.db.repositories.ingest import TradeConflict
from kfeed_server.records import DataSource, MarketResult, MarketStatus, Side, SnapshotRecord
from kfeed_server.streaming.follower import LivePublisher
from kfeed_server.transport.book_publish import BookRows, read_book_rows
from kfeed_server.transport.convert import (
    ALL_OPTIONAL_PRESENT,
    MAX_TIMESTAMP_SECONDS,
    MIN_TIMESTAMP_SECONDS,
    SNAPSHOT_INTEGER_COLUMNS,
    SNAPSHOT_OPTIONAL_COLUMNS,
    ReadColumns,
    event_from_proto,
    feed_gap_from_proto,
    market_from_proto,
    read_columns,
    series_from_proto,
    snapshot_from_proto,
    snapshots_from_columns,
    trade_from_proto,
)
from kfeed_server.transport.errors import FieldViolation
from kfeed_server.transport.ingest_refusals import (
    MAX_REFUSED_ROWS,
    RefusedRows,
    book_tickers,
    refused_rows_to_proto,
    split_violations,
    unknown_book_rows,
    without_rows,
)
from kfeed_server.transport.market_watermarks import list_market_watermarks
from kfeed_server.transport.requests import (
    RequestTokens,
    name_problem,
    text_problem,
    ticker_problem,
)

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
ONE_DOLLAR = 10_000
MAX_BATCH_ROWS = 100_000
INT64_MAX = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The times a datetime can hold, as SnapshotColumns' microseconds since the epoch.
MIN_MICROS = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // datetime.resolution
MAX_MICROS = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // datetime.resolution
_COLUMNS = "snapshot_columns"
# The snapshot fields checked as prices and as counts (liquidity and the sequence are free).
_PRICE_FIELDS = ("yes_bid", "yes_ask", "no_bid", "no_ask", "last_price")
_COUNT_FIELDS = ("yes_bid_size", "yes_ask_size", "volume", "volume_24h", "open_interest")


_TIMESTAMP = timestamp_pb2.Timestamp.DESCRIPTOR
_TIME_RANGE = "must be a valid Timestamp (0001-01-01 to 9999-12-31, nanos 0 to 999,999,999)"


def _in_range(value: timestamp_pb2.Timestamp) -> bool:
    return (
        MIN_TIMESTAMP_SECONDS <= value.seconds <= MAX_TIMESTAMP_SECONDS
        and 0 <= value.nanos < 1_000_000_000
    )


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

    def problem(self, problem: str | None, field: str) -> None:
        if problem is not None:
            self.violations.append(FieldViolation(field, problem))

    def ticker(self, value: str, field: str) -> None:
        self.problem(ticker_problem(value), field)

    def timestamp(self, message: Message, name: str, path: str) -> None:
        """A required Timestamp (its range is checked by :meth:`fields`)."""
        self.require(message.HasField(name), f"{path}.{name}", "is required")

    def fields(self, message: Message, path: str) -> None:
        """Every set string field of ``message`` storable (tickers: ticker syntax; ids: the id
        rules; the rest: free text) and every set Timestamp in range. Walks the descriptor, so
        fields added to the protos later are checked too."""
        for descriptor, value in message.ListFields():
            name = descriptor.name
            if descriptor.type == FieldDescriptor.TYPE_STRING:
                repeated = descriptor.is_repeated
                for i, text in enumerate(value if repeated else (value,)):
                    field = f"{path}.{name}[{i}]" if repeated else f"{path}.{name}"
                    if name.endswith("ticker"):
                        self.problem(ticker_problem(text), field)
                    elif name.endswith("_id"):
                        self.problem(name_problem(text), field)
                    else:
                        self.problem(text_problem(text), field)
            elif descriptor.message_type is _TIMESTAMP:
                self.require(_in_range(value), f"{path}.{name}", _TIME_RANGE)

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

    def column(
        self,
        values: list[int],
        name: str,
        low: int,
        high: int,
        description: str,
        *,
        present_bit: int | None = None,
        present: Sequence[int] = (),
    ) -> None:
        """Every value of snapshot column ``name`` within ``low``…``high``, ignoring the rows
        where ``present_bit`` is unset. One min/max call over the column when all are in range;
        only a column with a value out of range is walked row by row, to name the rows."""
        if not values or (low <= min(values) and max(values) <= high):
            return
        for row, value in enumerate(values):
            checked = present_bit is None or present[row] >> present_bit & 1
            self.require(
                not checked or low <= value <= high, f"{_COLUMNS}.{name}[{row}]", description
            )

    def column_enum(self, values: Sequence[int], name: str, allowed: Collection[int]) -> None:
        """Every value of snapshot column ``name`` one of ``allowed`` (one set operation when
        they all are)."""
        if set(values) <= set(allowed):
            return
        for row, value in enumerate(values):
            self.require(
                value in allowed,
                f"{_COLUMNS}.{name}[{row}]",
                f"unknown or unspecified value {value}",
            )

    def snapshot_columns(self, columns: ReadColumns) -> None:
        rows, integers = columns.rows, columns.integers
        lengths_ok = True
        for name in SNAPSHOT_INTEGER_COLUMNS[1:]:  # all but ticker_index, which sets the rows
            length = len(integers[name])
            self.require(
                length == rows,
                f"{_COLUMNS}.{name}",
                f"has {length} values, not one per row ({rows}, the length of ticker_index)",
            )
            lengths_ok = lengths_ok and length == rows
        for i, ticker in enumerate(columns.tickers):
            self.ticker(ticker, f"{_COLUMNS}.tickers[{i}]")
        if not lengths_ok:
            return  # rows cannot be told apart: the length violations say it all
        self.column(
            integers["ticker_index"],
            "ticker_index",
            0,
            len(columns.tickers) - 1,
            "must index tickers",
        )
        for name in ("exchange_time_micros", "receive_time_micros"):
            self.column(integers[name], name, MIN_MICROS, MAX_MICROS, "is out of range")
        self.column_enum(integers["source"], "source", _enum_values(DataSource) - {0})
        self.column_enum(integers["status"], "status", _enum_values(MarketStatus))
        present = integers["present"]
        self.column(present, "present", 0, ALL_OPTIONAL_PRESENT, "sets an unknown field's bit")
        for bit, name in enumerate(SNAPSHOT_OPTIONAL_COLUMNS):
            if name in _PRICE_FIELDS:
                low, high, description = 0, ONE_DOLLAR, "must be within $0–$1"
            elif name in _COUNT_FIELDS:
                low, high, description = 0, INT64_MAX, "must not be negative"
            else:
                continue  # any int64 is a valid sequence number or liquidity
            self.column(
                integers[name], name, low, high, description, present_bit=bit, present=present
            )


def validate_batch(
    request: pb.PublishRequest,
    columns: ReadColumns,
    *,
    snapshots_checked: bool = False,
) -> list[FieldViolation]:
    """Every problem with ``request`` (whose ``snapshot_columns`` are read into ``columns``);
    empty when it can be stored. ``snapshots_checked``: the snapshots are known to be valid
    already (``snapshot_records`` converted them all)."""
    check = _Validator([])
    rows = (
        sum(
            len(rows)
            for rows in (request.series, request.events, request.markets, request.snapshots)
        )
        + columns.rows
        + len(request.trades)
        + len(request.feed_gaps)
    )
    check.require(rows <= MAX_BATCH_ROWS, "batch", f"at most {MAX_BATCH_ROWS} rows per batch")
    for i, series in enumerate(request.series):
        check.ticker(series.ticker, f"series[{i}].ticker")
        check.fields(series, f"series[{i}]")
    for i, event in enumerate(request.events):
        check.ticker(event.event_ticker, f"events[{i}].event_ticker")
        check.fields(event, f"events[{i}]")
    for i, market in enumerate(request.markets):
        path = f"markets[{i}]"
        check.ticker(market.ticker, f"{path}.ticker")
        check.fields(market, path)
        check.enum(market.status, MarketStatus, f"{path}.status", allow_unspecified=True)
        check.enum(market.result, MarketResult, f"{path}.result", allow_unspecified=True)
        check.price(market, "settlement_value", path)
    for i, snapshot in enumerate(() if snapshots_checked else request.snapshots):
        path = f"snapshots[{i}]"
        check.ticker(snapshot.ticker, f"{path}.ticker")
        check.fields(snapshot, path)
        check.timestamp(snapshot, "exchange_time", path)
        check.timestamp(snapshot, "receive_time", path)
        check.enum(snapshot.source, DataSource, f"{path}.source", allow_unspecified=False)
        check.enum(snapshot.status, MarketStatus, f"{path}.status", allow_unspecified=True)
        for name in _PRICE_FIELDS:
            check.price(snapshot, name, path)
        for name in _COUNT_FIELDS:
            check.count(snapshot, name, path)
    check.snapshot_columns(columns)
    first_of_id: dict[str, int] = {}
    for i, trade in enumerate(request.trades):
        path = f"trades[{i}]"
        check.require(bool(trade.trade_id), f"{path}.trade_id", "is required")
        check.ticker(trade.ticker, f"{path}.ticker")
        check.fields(trade, path)
        check.timestamp(trade, "create_time", path)
        check.enum(trade.taker_side, Side, f"{path}.taker_side", allow_unspecified=True)
        check.price(trade, "yes_price", path)
        check.price(trade, "no_price", path)
        check.count(trade, "count", path)
        check.require(
            trade.HasField("yes_price")
            and trade.yes_price.ten_thousandths + trade.no_price.ten_thousandths == ONE_DOLLAR,
            f"{path}.no_price",
            "must be $1 − yes_price",
        )
        # One id, one trade: a second, different trade under an id is refused, never dropped
        # silently (an identical one, or the same trade with a more exact time, is fine).
        first = first_of_id.setdefault(trade.trade_id, i)
        check.require(
            first == i or _same_trade(request.trades[first], trade),
            f"{path}.trade_id",
            f"names a different trade than trades[{first}]",
        )
    for i, gap in enumerate(request.feed_gaps):
        path = f"feed_gaps[{i}]"
        check.require(bool(gap.channel), f"{path}.channel", "is required")
        check.fields(gap, path)
        check.timestamp(gap, "detect_time", path)
    return check.violations


def _same_trade(a: types_pb2.Trade, b: types_pb2.Trade) -> bool:
    """True when ``a`` and ``b`` are one trade: equal, or equal but for a time one of them gives
    to the whole second only (Kalshi's WebSocket) and the other exactly, within that second
    (its REST API)."""
    if a == b:
        return True
    if a.create_time.seconds != b.create_time.seconds or 0 not in (
        a.create_time.nanos,
        b.create_time.nanos,
    ):
        return False
    a_untimed, b_untimed = types_pb2.Trade(), types_pb2.Trade()
    a_untimed.CopyFrom(a)
    b_untimed.CopyFrom(b)
    a_untimed.ClearField("create_time")
    b_untimed.ClearField("create_time")
    return a_untimed == b_untimed


def _stored_trade_violations(
    request: pb.PublishRequest, refused: RefusedRows, conflicts: Sequence[TradeConflict]
) -> list[FieldViolation]:
    """A violation per differing field of each trade whose id names another, stored trade (the
    conflicts index the trades stored, which are the request's not in ``refused``)."""
    written = [i for i in range(len(request.trades)) if ("trades", i) not in refused]
    return [
        FieldViolation(
            f"trades[{written[conflict.index]}].{name}",
            "differs from the trade stored under this trade_id (stored: "
            f"{_shown(getattr(conflict.stored, name))})",
        )
        for conflict in conflicts
        for name in conflict.fields
    ]


def _shown(value: object) -> str:
    if isinstance(value, enum.Enum):
        return value.name
    return value.isoformat() if isinstance(value, datetime) else str(value)


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
        ticker_problem(record.ticker) is None
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
    # Rows of ``snapshots`` then of ``snapshot_columns``.
    snapshots: list[SnapshotRecord] | None
    violations: list[FieldViolation]
    books: BookRows


def _check(request: pb.PublishRequest) -> _Checked:
    snapshots = snapshot_records(request)
    columns = read_columns(request.snapshot_columns)
    violations = validate_batch(request, columns, snapshots_checked=snapshots is not None)
    if snapshots is not None and not violations:
        # The order the contract gives: `snapshots` first, then `snapshot_columns`.
        snapshots += snapshots_from_columns(columns)
    books = read_book_rows(request)
    violations += books.violations
    if columns.rows + books.rows > MAX_BATCH_ROWS:
        violations.append(FieldViolation("batch", f"at most {MAX_BATCH_ROWS} rows per batch"))
    return _Checked(request, snapshots, violations, books)


def _unknown_market_violations(
    request: pb.PublishRequest, unknown: set[str]
) -> list[FieldViolation]:
    """Where the batch refers to one of the ``unknown`` markets."""
    if not unknown:
        return []
    fields = [
        (f"snapshots[{i}].ticker", s.ticker)
        for i, s in enumerate(request.snapshots)
        if s.ticker in unknown
    ]
    fields += [
        (f"{_COLUMNS}.tickers[{i}]", ticker)
        for i, ticker in enumerate(request.snapshot_columns.tickers)
        if ticker in unknown
    ]
    fields += [
        (f"trades[{i}].ticker", t.ticker)
        for i, t in enumerate(request.trades)
        if t.ticker in unknown
    ]
    return [
        FieldViolation(field, f"unknown market {ticker!r}: publish it first")
        for field, ticker in fields
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


def _ignore_stored(result: BatchWriteResult) -> None:
    del result


def _ignore_refused() -> None:
    pass


def _ignore_refused_rows(by_field: Mapping[str, int]) -> None:
    del by_field


class IngestServicer(pb_grpc.IngestServiceServicer):
    """Stores batches idempotently, publishes them to live subscribers, acks after commit.

    ``on_stored`` (right after a batch's commit), ``on_refused`` (a batch refused whole) and
    ``on_rows_refused`` (rows refused, per request field) are hooks the app points at the
    metrics, so the transport does not depend on observability.
    """

    def __init__(
        self,
        repositories: Repositories,
        live: LivePublisher,
        *,
        on_stored: Callable[[BatchWriteResult], None] = _ignore_stored,
        on_refused: Callable[[], None] = _ignore_refused,
        on_rows_refused: Callable[[Mapping[str, int]], None] = _ignore_refused_rows,
        tokens: RequestTokens | None = None,
        writing: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        # Held while a batch is stored: live fan-out gives way to it (streaming.hub).
        self._writing = writing
        self._on_rows_refused = on_rows_refused
        self._on_stored = on_stored
        self._on_refused = on_refused
        self._markets = repositories.markets
        self._trades = repositories.trades
        self._snapshots = repositories.snapshots
        self._tokens = tokens or RequestTokens(secrets.token_bytes(32))
        self._writer = repositories.ingest
        self._live = live
        # Tickers of stored markets. Markets are never deleted, so a ticker once stored stays
        # known, and only tickers new to this process cost a database query (asking for all of
        # a 5,000-row batch's tickers every time cost ≈5–10 ms).
        self._known_tickers: set[str] = set()
        # One batch at a time: snapshot ids then commit in increasing order, which is what
        # makes "after id N" an exact resume point for stream subscribers.
        self._write_lock = asyncio.Lock()

    async def _unknown_tickers(self, request: pb.PublishRequest, refused: RefusedRows) -> set[str]:
        """The markets the batch's unrefused rows refer to that are neither stored nor in it."""
        if refused:
            referenced = {
                t.ticker for i, t in enumerate(request.trades) if ("trades", i) not in refused
            }
            referenced.update(
                s.ticker for i, s in enumerate(request.snapshots) if ("snapshots", i) not in refused
            )
            in_batch = {
                m.ticker for i, m in enumerate(request.markets) if ("markets", i) not in refused
            }
        else:
            referenced = {t.ticker for t in request.trades}
            referenced.update(s.ticker for s in request.snapshots)
            in_batch = {m.ticker for m in request.markets}
        # A bad ticker in the column's list refuses its rows already; never query with it.
        referenced.update(t for t in request.snapshot_columns.tickers if not ticker_problem(t))
        referenced.update(t for t in book_tickers(request, refused) if not ticker_problem(t))
        unknown = referenced - self._known_tickers - in_batch
        if unknown:
            found = await self._markets.existing_tickers(sorted(unknown))
            self._known_tickers |= found
            unknown -= found
        return unknown

    def _refuse_batch(
        self, request: pb.PublishRequest, violations: list[FieldViolation]
    ) -> pb.PublishResponse:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
        log.warning("batch %d from %r refused: %s", request.batch_id, request.producer, summary)
        self._on_refused()
        return _refusal(request.batch_id, violations)

    async def _store(self, request: pb.PublishRequest) -> pb.PublishResponse:
        """Validate, refuse the invalid rows, store the rest, and say what happened."""
        checked = _check(request)
        refused: RefusedRows = {}
        batch_level = split_violations(request, checked.violations, refused)
        if batch_level:
            return self._refuse_batch(request, checked.violations)
        unknown = await self._unknown_tickers(request, refused)
        unknown_violations = _unknown_market_violations(request, unknown)
        split_violations(request, unknown_violations + unknown_book_rows(request, unknown), refused)
        if len(refused) > MAX_REFUSED_ROWS:
            return self._refuse_batch(
                request, [FieldViolation("batch", f"more than {MAX_REFUSED_ROWS} invalid rows")]
            )
        if refused:
            summary = "; ".join(
                f"{v.field}: {v.description}" for vs in list(refused.values())[:3] for v in vs[:1]
            )
            log.warning(
                "batch %d from %r: %d rows refused (%s), the rest stored",
                request.batch_id,
                request.producer,
                len(refused),
                summary,
            )
            checked = _check(without_rows(request, refused))
            if checked.violations:  # cannot happen: every violation named a refused row
                return self._refuse_batch(request, checked.violations)
        result = await self._write(checked)
        if result.trade_conflicts:
            conflicts = _stored_trade_violations(request, refused, result.trade_conflicts)
            split_violations(request, conflicts, refused)
            log.warning(
                "batch %d from %r: %d trades refused (%s: %s), the stored ones kept",
                request.batch_id,
                request.producer,
                len(result.trade_conflicts),
                conflicts[0].field,
                conflicts[0].description,
            )
        if refused:
            self._on_rows_refused(Counter(field for field, _ in refused))
        return pb.PublishResponse(
            batch_id=request.batch_id,
            code=code_pb2.OK,
            message=f"{len(refused)} rows refused" if refused else "",
            snapshots_stored=result.counts.snapshots,
            trades_stored=result.counts.trades,
            book_changes_stored=result.counts.book_changes,
            book_checkpoints_stored=result.counts.book_checkpoints,
            refused_rows=refused_rows_to_proto(refused),
        )

    async def _write(self, checked: _Checked) -> BatchWriteResult:
        # A producer that goes away (a killed ingest) cancels its Publish call; the batch's
        # transaction and its hand-off to live subscribers run to the end all the same. Cut off
        # between them, live streams would skip rows the database holds (SQLite publishes them
        # from here), and a transaction cut off inside the driver can keep SQLite's write lock.
        write = asyncio.ensure_future(self._write_and_publish(checked))
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            while not write.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(write)
            raise

    async def _write_and_publish(self, checked: _Checked) -> BatchWriteResult:
        request, snapshots = checked.request, checked.snapshots
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
                book_changes=checked.books.changes,
                book_checkpoints=checked.books.checkpoints,
            )
            self._known_tickers.update(m.ticker for m in markets)
            self._live.committed(markets, result)
        self._on_stored(result)
        return result

    async def ListMarketWatermarks(
        self, request: pb.ListMarketWatermarksRequest, context: Context
    ) -> pb.ListMarketWatermarksResponse:
        return await list_market_watermarks(
            request, self._markets, self._trades, self._snapshots, self._tokens
        )

    async def Publish(
        self, request_iterator: AsyncIterator[pb.PublishRequest], context: Context
    ) -> AsyncIterator[pb.PublishResponse]:
        async for request in request_iterator:
            with self._writing():
                response = await self._store(request)
            yield response
