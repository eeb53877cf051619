"""The dead-letter file: rows the server refused, kept with the reason, never resent.

One JSON object per line: when, which producer and batch, the request field and row index, the
violations, and the row itself (as protobuf JSON, or a snapshot_columns row as its column
values; a batch refused whole is written as one line holding the whole batch). Refused rows are
a fact about the data, not an outage: the ingest records them here and goes on, so one bad row
from the exchange never blocks the spool.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from kfeed.v1 import ingest_service_pb2

logger = logging.getLogger(__name__)

PublishRequest = ingest_service_pb2.PublishRequest
PublishResponse = ingest_service_pb2.PublishResponse
COLUMN_ROWS = "snapshot_columns"
WHOLE_BATCH = "batch"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One refused row (or a whole refused batch, ``field`` = "batch")."""

    batch_id: int
    field: str
    index: int
    violations: tuple[tuple[str, str], ...]
    row: object  # JSON-ready

    def to_json(self, producer: str, time: datetime) -> str:
        return json.dumps(
            {
                "time": time.isoformat(),
                "producer": producer,
                "batch_id": self.batch_id,
                "field": self.field,
                "index": self.index,
                "violations": [{"field": f, "description": d} for f, d in self.violations],
                "row": self.row,
            },
            ensure_ascii=False,
        )


def _column_row(columns: ingest_service_pb2.SnapshotColumns, index: int) -> object:
    row: dict[str, object] = {}
    for descriptor, values in columns.ListFields():
        if descriptor.name == "tickers" or index >= len(values):
            continue
        row[descriptor.name] = values[index]
    ticker_index = row.get("ticker_index")
    if isinstance(ticker_index, int) and ticker_index < len(columns.tickers):
        row["ticker"] = columns.tickers[ticker_index]
    return row


def _row(request: PublishRequest, field: str, index: int) -> object:
    if field == COLUMN_ROWS:
        return _column_row(request.snapshot_columns, index)
    rows = getattr(request, field, None)
    if rows is None or index >= len(rows):
        return None  # a field this ingest does not know (a newer server): the reason says it
    return MessageToDict(rows[index], preserving_proto_field_name=True)


def dead_letters(request: PublishRequest, response: PublishResponse) -> list[DeadLetter]:
    """What of ``request`` the server refused in ``response``: its refused rows, or the whole
    batch when the batch was refused."""
    if response.code != 0:
        violations = tuple((v.field, v.description) for v in response.field_violations)
        row = MessageToDict(request, preserving_proto_field_name=True)
        return [DeadLetter(response.batch_id, WHOLE_BATCH, 0, violations, row)]
    return [
        DeadLetter(
            response.batch_id,
            refused.field,
            refused.index,
            tuple((v.field, v.description) for v in refused.field_violations),
            _row(request, refused.field, refused.index),
        )
        for refused in response.refused_rows
    ]


class DeadLetterFile:
    """Appends dead letters to ``path`` (created with its folder on first use)."""

    def __init__(self, path: Path, producer: str) -> None:
        self.path = path
        self._producer = producer

    def append(self, letters: Sequence[DeadLetter]) -> None:
        """Write ``letters``, one line each, and flush them to the file (blocking: run it in a
        thread)."""
        if not letters:
            return
        now = datetime.now(UTC)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            for letter in letters:
                file.write(letter.to_json(self._producer, now) + "\n")
