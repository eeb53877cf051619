"""The order-book part of a PublishRequest: ``book_changes`` columns and ``book_checkpoints``,
checked and turned into records (every problem named by field, as for the rest of a batch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from kfeed.v1 import ingest_service_pb2 as pb
from kfeed.v1 import types_pb2
from kfeed_server.records import BookChangeRecord, BookCheckpointRecord, CheckpointKind, Side
from kfeed_server.transport.convert import TimestampOutOfRange, from_timestamp
from kfeed_server.transport.errors import FieldViolation
from kfeed_server.transport.requests import ticker_problem

ONE_DOLLAR = 10_000
INT64_MAX = 2**63 - 1
MAX_LEVELS = 10_000  # per side of a checkpoint
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_MICROS = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // datetime.resolution
MAX_MICROS = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // datetime.resolution
_CHANGES = "book_changes"
_INTEGER_COLUMNS = (
    "exchange_time_micros", "receive_time_micros", "exchange_sequence", "side", "price", "size",
)  # fmt: skip
_SIDES = {int(Side.YES), int(Side.NO)}
_KINDS = {int(kind) for kind in CheckpointKind} - {int(CheckpointKind.UNSPECIFIED)}


@dataclass(slots=True)
class BookRows:
    """A batch's order-book rows as records (empty when any is invalid), the tickers they name
    with the field naming each, and what is wrong with them."""

    changes: list[BookChangeRecord] = field(default_factory=list)
    checkpoints: list[BookCheckpointRecord] = field(default_factory=list)
    ticker_fields: dict[str, str] = field(default_factory=dict)
    violations: list[FieldViolation] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.changes) + len(self.checkpoints)


def _out_of(values: Sequence[int], low: int, high: int) -> list[int]:
    """The rows whose value is outside ``low``…``high`` (one min/max when none is)."""
    if not values or (low <= min(values) and max(values) <= high):
        return []
    return [row for row, value in enumerate(values) if not low <= value <= high]


def _changes(columns: pb.OrderBookChangeColumns, out: BookRows) -> None:
    tickers = list(columns.tickers)
    index = list(columns.ticker_index)
    values = {name: list(getattr(columns, name)) for name in _INTEGER_COLUMNS}
    rows = len(values["price"])
    flat = not index  # one ticker per row rather than a dictionary
    lengths = {"ticker_index": len(index)} if not flat else {"tickers": len(tickers)}
    lengths |= {name: len(column) for name, column in values.items()}
    bad = [name for name, length in lengths.items() if length != rows]
    for name in bad:
        out.violations.append(
            FieldViolation(
                f"{_CHANGES}.{name}", f"has {lengths[name]} values, not one per row ({rows})"
            )
        )
    if bad or not rows:
        return
    for row, ticker in enumerate(tickers):
        if problem := ticker_problem(ticker):
            out.violations.append(FieldViolation(f"{_CHANGES}.tickers[{row}]", problem))
        out.ticker_fields.setdefault(ticker, f"{_CHANGES}.tickers[{row}]")
    checks = [
        ("ticker_index", index, 0, len(tickers) - 1, "must index tickers"),
        ("exchange_time_micros", values["exchange_time_micros"], MIN_MICROS, MAX_MICROS,
         "is out of range"),
        ("receive_time_micros", values["receive_time_micros"], MIN_MICROS, MAX_MICROS,
         "is out of range"),
        ("exchange_sequence", values["exchange_sequence"], 0, INT64_MAX, "must not be negative"),
        ("price", values["price"], 1, ONE_DOLLAR - 1, "must be strictly within $0–$1"),
        ("size", values["size"], 0, INT64_MAX, "must not be negative"),
    ]  # fmt: skip
    for name, column, low, high, description in checks:
        for row in _out_of(column, low, high)[:100]:
            out.violations.append(FieldViolation(f"{_CHANGES}.{name}[{row}]", description))
    for row, side in enumerate(values["side"]):
        if side not in _SIDES:
            out.violations.append(
                FieldViolation(f"{_CHANGES}.side[{row}]", "must be SIDE_YES or SIDE_NO")
            )
            break
    if out.violations:
        return
    epoch, micros = _EPOCH, timedelta
    row_tickers = tickers if flat else [tickers[i] for i in index]
    sides = {int(Side.YES): Side.YES, int(Side.NO): Side.NO}
    out.changes = [
        BookChangeRecord._make(row)
        for row in zip(
            row_tickers,
            [epoch + micros(0, 0, us) for us in values["exchange_time_micros"]],
            [epoch + micros(0, 0, us) for us in values["receive_time_micros"]],
            values["exchange_sequence"],
            [sides[s] for s in values["side"]],
            values["price"],
            values["size"],
            strict=True,
        )
    ]


def _levels(
    levels: Sequence[types_pb2.PriceLevel], path: str, out: BookRows
) -> tuple[tuple[int, int], ...]:
    if len(levels) > MAX_LEVELS:
        out.violations.append(FieldViolation(path, f"at most {MAX_LEVELS} levels"))
        return ()
    pairs = tuple((level.price.ten_thousandths, level.size.hundredths) for level in levels)
    for i, (price, size) in enumerate(pairs):
        if not 0 < price < ONE_DOLLAR:
            out.violations.append(
                FieldViolation(f"{path}[{i}].price", "must be strictly within $0–$1")
            )
        if size < 0:
            out.violations.append(FieldViolation(f"{path}[{i}].size", "must not be negative"))
    if len({price for price, _ in pairs}) != len(pairs):
        out.violations.append(FieldViolation(path, "repeats a price"))
    return tuple(sorted(pairs, reverse=True))


def _checkpoints(checkpoints: Sequence[pb.OrderBookCheckpoint], out: BookRows) -> None:
    records: list[BookCheckpointRecord] = []
    for i, checkpoint in enumerate(checkpoints):
        path = f"book_checkpoints[{i}]"
        before = len(out.violations)
        book = checkpoint.book
        if problem := ticker_problem(book.ticker):
            out.violations.append(FieldViolation(f"{path}.book.ticker", problem))
        out.ticker_fields.setdefault(book.ticker, f"{path}.book.ticker")
        if checkpoint.kind not in _KINDS:
            out.violations.append(
                FieldViolation(f"{path}.kind", f"unknown or unspecified value {checkpoint.kind}")
            )
        times: list[datetime] = []
        for name in ("exchange_time", "receive_time"):
            if not book.HasField(name):
                out.violations.append(FieldViolation(f"{path}.book.{name}", "is required"))
                continue
            try:
                times.append(from_timestamp(getattr(book, name)))
            except TimestampOutOfRange:
                out.violations.append(FieldViolation(f"{path}.book.{name}", "is out of range"))
        yes = _levels(book.yes_bids, f"{path}.book.yes_bids", out)
        no = _levels(book.no_bids, f"{path}.book.no_bids", out)
        if len(out.violations) == before:
            sequence = book.exchange_sequence if book.HasField("exchange_sequence") else None
            records.append(
                BookCheckpointRecord(
                    book.ticker, times[0], times[1], sequence, CheckpointKind(checkpoint.kind),
                    yes, no,
                )
            )  # fmt: skip
    if not out.violations:
        out.checkpoints = records


def read_book_rows(request: pb.PublishRequest) -> BookRows:
    """The batch's order-book rows, checked."""
    out = BookRows()
    if request.HasField("book_changes"):
        _changes(request.book_changes, out)
    _checkpoints(request.book_checkpoints, out)
    if out.violations:
        out.changes, out.checkpoints = [], []
    return out
