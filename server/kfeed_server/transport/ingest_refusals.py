"""Refusing a published batch row by row: which row a violation belongs to, the batch without
its refused rows, and the ack's account of them.

The batch validator names every violation by its path in the request (``trades[3].no_price``,
``snapshot_columns.yes_bid[7]``, ``book_changes.price[2]``); a path with a row index refuses
that row, and a bad ticker in a column batch's ticker dictionary refuses every row that uses it.
Paths without a row (columns of different lengths, too many rows) refuse the whole batch: its
rows cannot be told apart.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from google.protobuf.message import Message

from kfeed.v1 import ingest_service_pb2 as pb
from kfeed_server.transport.errors import FieldViolation

# The PublishRequest fields whose rows are messages.
MESSAGE_ROW_FIELDS = (
    "series", "events", "markets", "snapshots", "trades", "feed_gaps", "book_checkpoints",
)  # fmt: skip
COLUMN_ROWS = "snapshot_columns"
BOOK_CHANGES = "book_changes"
# Violations reported per refused row, and refused rows per ack (beyond it the batch is refused
# whole: an ack must stay far below the 8 MiB message limit).
MAX_VIOLATIONS_PER_ROW = 5
MAX_REFUSED_ROWS = 10_000

_MESSAGE_ROW = re.compile(rf"({'|'.join(MESSAGE_ROW_FIELDS)})\[(\d+)\]")
_COLUMN_ROW = re.compile(r"(snapshot_columns|book_changes)\.(\w+)\[(\d+)\]")

# (PublishRequest field, row index) -> what is wrong with the row.
RowKey = tuple[str, int]
RefusedRows = dict[RowKey, list[FieldViolation]]


def _rows_of_ticker(request: pb.PublishRequest, field: str) -> dict[int, list[int]]:
    """For a column batch with a ticker dictionary: ticker index -> the rows using it."""
    rows: dict[int, list[int]] = {}
    for row, index in enumerate(getattr(request, field).ticker_index):
        rows.setdefault(index, []).append(row)
    return rows


def _is_flat(request: pb.PublishRequest, field: str) -> bool:
    """True for book_changes sent with one ticker per row (no ``ticker_index``)."""
    return field == BOOK_CHANGES and not request.book_changes.ticker_index


def split_violations(
    request: pb.PublishRequest, violations: Sequence[FieldViolation], refused: RefusedRows
) -> list[FieldViolation]:
    """Files each row's violations in ``refused`` under its row; returns the violations that
    belong to no row (they refuse the whole batch)."""
    batch_level: list[FieldViolation] = []
    rows_of_ticker: dict[str, dict[int, list[int]]] = {}
    for violation in violations:
        if match := _MESSAGE_ROW.match(violation.field):
            refused.setdefault((match[1], int(match[2])), []).append(violation)
        elif match := _COLUMN_ROW.fullmatch(violation.field):
            field, column, index = match[1], match[2], int(match[3])
            if column != "tickers" or _is_flat(request, field):
                refused.setdefault((field, index), []).append(violation)
                continue
            if field not in rows_of_ticker:
                rows_of_ticker[field] = _rows_of_ticker(request, field)
            for row in rows_of_ticker[field].get(index, ()):
                refused.setdefault((field, row), []).append(violation)
        else:
            batch_level.append(violation)
    return batch_level


def book_tickers(request: pb.PublishRequest, refused: RefusedRows) -> set[str]:
    """The markets the order-book rows not in ``refused`` name."""
    tickers = {
        checkpoint.book.ticker
        for i, checkpoint in enumerate(request.book_checkpoints)
        if ("book_checkpoints", i) not in refused
    }
    changes = request.book_changes
    if _is_flat(request, BOOK_CHANGES):
        tickers.update(t for i, t in enumerate(changes.tickers) if (BOOK_CHANGES, i) not in refused)
    else:
        tickers.update(changes.tickers)
    return tickers


def unknown_book_rows(request: pb.PublishRequest, unknown: set[str]) -> list[FieldViolation]:
    """A violation for every order-book row (or dictionary ticker) naming an ``unknown``
    market."""
    if not unknown:
        return []

    def violation(field: str, ticker: str) -> FieldViolation:
        return FieldViolation(field, f"unknown market {ticker!r}: publish it first")

    found = [
        violation(f"book_checkpoints[{i}].book.ticker", c.book.ticker)
        for i, c in enumerate(request.book_checkpoints)
        if c.book.ticker in unknown
    ]
    found += [
        violation(f"{BOOK_CHANGES}.tickers[{i}]", ticker)
        for i, ticker in enumerate(request.book_changes.tickers)
        if ticker in unknown
    ]
    return found


def without_rows(request: pb.PublishRequest, rows: Collection[RowKey]) -> pb.PublishRequest:
    """A copy of ``request`` without ``rows`` (the others keep their order)."""
    dropped: dict[str, set[int]] = {}
    for field, index in rows:
        dropped.setdefault(field, set()).add(index)
    kept = pb.PublishRequest()
    kept.CopyFrom(request)
    for field in MESSAGE_ROW_FIELDS:
        if field in dropped:
            target = getattr(kept, field)
            del target[:]
            target.extend(
                row for i, row in enumerate(getattr(request, field)) if i not in dropped[field]
            )
    if COLUMN_ROWS in dropped:
        _drop_column_rows(
            request.snapshot_columns, kept.snapshot_columns, dropped[COLUMN_ROWS], "tickers"
        )
    if BOOK_CHANGES in dropped:
        dictionary = "" if _is_flat(request, BOOK_CHANGES) else "tickers"
        _drop_column_rows(
            request.book_changes, kept.book_changes, dropped[BOOK_CHANGES], dictionary
        )
    return kept


def _drop_column_rows(source: Message, target: Message, drop: set[int], dictionary: str) -> None:
    """Copy each column of ``source`` to ``target`` but the rows in ``drop`` (the column named
    ``dictionary`` is a ticker dictionary, not a column: kept whole)."""
    for descriptor, values in source.ListFields():
        if descriptor.name == dictionary or not descriptor.is_repeated:
            continue
        column = getattr(target, descriptor.name)
        del column[:]
        column.extend(v for i, v in enumerate(values) if i not in drop)


def refused_rows_to_proto(refused: RefusedRows) -> list[pb.RefusedRow]:
    """The ack's ``refused_rows``, in request order."""
    return [
        pb.RefusedRow(
            field=field,
            index=index,
            field_violations=[
                pb.FieldViolation(field=v.field, description=v.description)
                for v in violations[:MAX_VIOLATIONS_PER_ROW]
            ],
        )
        for (field, index), violations in sorted(refused.items())
    ]
