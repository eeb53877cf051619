"""The data fingerprint: what a run read, so that a stored result shows when the data changed.

See docs/BACKTESTING.md ("Fingerprint")."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from kfeed_server.backtest.chunks import EncodedChunk, encode_market_data
from kfeed_server.records import SnapshotRecord

FINGERPRINT_CHUNK = 4_096
"""Rows per SHA-256 update of the fingerprint (part of its definition)."""


@dataclass(frozen=True, slots=True)
class DataFingerprint:
    """What a run read: rows replayed, their snapshot id range and a SHA-256 over them in replay
    order (see ``Fingerprinter``). Ids are 0 when no row was replayed."""

    row_count: int
    first_snapshot_id: int
    last_snapshot_id: int
    content_hash: str


class Fingerprinter:
    """SHA-256 over snapshot rows in replay order, with their count and id range.

    Rows are hashed in chunks of 4,096 in the canonical encoding of ``chunks.encode_market_data``
    (snapshot id, ticker, exchange sequence, prices, sizes, activity, exchange time as POSIX
    seconds, status; ingest metadata such as receive_time and source left out, so re-recording the
    same market data keeps the fingerprint). ``add`` only keeps a reference; the encoding happens
    a chunk at a time in C-level maps. ``add_encoded`` takes a chunk encoded elsewhere (the
    service encodes while it reads), which gives the same hash when the chunks hold the same rows
    in the same order *and* the same chunk boundaries: the service's chunks are 4,096 rows too.
    """

    __slots__ = ("_first_id", "_hash", "_last_id", "_row_count", "_rows")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._rows: list[SnapshotRecord] = []
        self._row_count = 0
        self._first_id = 0
        self._last_id = 0

    def add(self, s: SnapshotRecord) -> None:
        """Adds one row."""
        rows = self._rows
        rows.append(s)
        if len(rows) >= FINGERPRINT_CHUNK:
            self._flush()

    def add_encoded(self, chunk: EncodedChunk) -> None:
        """Adds an already encoded chunk (of at most ``FINGERPRINT_CHUNK`` rows, after any rows
        given to ``add`` have filled whole chunks)."""
        self._flush()
        self._count(chunk.row_count, chunk.first_snapshot_id, chunk.last_snapshot_id)
        self._hash.update(chunk.market_data)

    def _count(self, rows: int, first_id: int, last_id: int) -> None:
        if not self._row_count:
            self._first_id = first_id
        self._last_id = last_id
        self._row_count += rows

    def _flush(self) -> None:
        rows = self._rows
        if not rows:
            return
        self._count(len(rows), rows[0].snapshot_id, rows[-1].snapshot_id)
        self._hash.update(encode_market_data(rows))
        rows.clear()

    def result(self) -> DataFingerprint:
        """The fingerprint of the rows added so far."""
        self._flush()
        return DataFingerprint(
            self._row_count, self._first_id, self._last_id, self._hash.copy().hexdigest()
        )


def fingerprint(snapshots: Iterable[SnapshotRecord]) -> DataFingerprint:
    """The fingerprint of ``snapshots`` as given (a run fingerprints the rows it replays)."""
    fingerprinter = Fingerprinter()
    for snapshot in snapshots:
        fingerprinter.add(snapshot)
    return fingerprinter.result()
