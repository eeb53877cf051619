"""The data fingerprint: what a run read, so that a stored result shows when the data changed.

See docs/BACKTESTING.md ("Fingerprint")."""

from __future__ import annotations

import hashlib
import marshal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kfeed_server.backtest.books import BookState
from kfeed_server.backtest.chunks import MARSHAL_VERSION, EncodedChunk, encode_market_data
from kfeed_server.backtest.fees import DEFAULT_MARKET_FEES, MarketFees
from kfeed_server.records import MarketRecord, SnapshotRecord, TradeRecord
from kfeed_server.records.backtest import FEE_SCHEDULE_VERSION

FINGERPRINT_CHUNK = 4_096
"""Rows per SHA-256 update of the fingerprint (part of its definition)."""


@dataclass(frozen=True, slots=True)
class DataFingerprint:
    """What a run read: snapshot rows replayed, their id range, books and trades replayed
    (``event_count``) and a SHA-256 over all of it and the markets' terms (see
    ``Fingerprinter``). Ids are 0 when no row was replayed."""

    row_count: int
    first_snapshot_id: int
    last_snapshot_id: int
    content_hash: str
    event_count: int = 0


class Fingerprinter:
    """SHA-256 over everything a run read: snapshot rows in replay order (with their count and
    id range), the books and trades replayed, and each market's terms (result, settlement time
    and value, fee type and multiplier, the fee schedule's version). The content hash is the
    SHA-256 of the three parts' digests, so a market that settles after a run changes the
    fingerprint of a rerun over the same rows.

    Rows are hashed in chunks of 4,096 in the canonical encoding of ``chunks.encode_market_data``
    (snapshot id, ticker, exchange sequence, prices, sizes, activity, exchange time as POSIX
    seconds, status; ingest metadata such as receive_time and source left out, so re-recording the
    same market data keeps the fingerprint). ``add`` only keeps a reference; the encoding happens
    a chunk at a time in C-level maps. ``add_encoded`` takes a chunk encoded elsewhere (the
    service encodes while it reads), which gives the same hash when the chunks hold the same rows
    in the same order *and* the same chunk boundaries: the service's chunks are 4,096 rows too.
    """

    __slots__ = (
        "_event_count",
        "_events",
        "_first_id",
        "_hash",
        "_last_id",
        "_row_count",
        "_rows",
        "_terms",
    )

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._events = hashlib.sha256()
        self._terms = hashlib.sha256()
        self._event_count = 0
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

    def add_event(self, event: BookState | TradeRecord) -> None:
        """Adds a book or a trade the run replayed."""
        if isinstance(event, BookState):
            values: tuple[Any, ...] = (
                "book",
                event.ticker,
                event.exchange_time.timestamp(),
                event.yes_bids,
                event.no_bids,
            )
        else:
            values = (
                "trade",
                event.ticker,
                event.trade_id,
                event.create_time.timestamp(),
                event.yes_price,
                event.no_price,
                event.count,
                int(event.taker_side),
            )
        self._events.update(marshal.dumps(values, MARSHAL_VERSION))
        self._event_count += 1

    def add_terms(
        self,
        tickers: Sequence[str],
        markets: Mapping[str, MarketRecord],
        fees: Mapping[str, MarketFees],
        fee_schedule_version: str,
    ) -> None:
        """Adds what the run knew of its markets: result, settlement time and value, and fee
        terms (of each ticker, in the order given), and the fee schedule's version."""
        values: list[Any] = [fee_schedule_version]
        for ticker in tickers:
            market = markets.get(ticker)
            terms = fees.get(ticker, DEFAULT_MARKET_FEES)
            values.append(
                (
                    ticker,
                    None if market is None else int(market.result),
                    None
                    if market is None or market.settlement_time is None
                    else market.settlement_time.timestamp(),
                    None if market is None else market.settlement_value,
                    str(terms.fee_type),
                    terms.multiplier,
                )
            )
        self._terms.update(marshal.dumps(values, MARSHAL_VERSION))

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

    def copy(self) -> Fingerprinter:
        """An independent fingerprinter holding what this one holds (a sweep's points share the
        rows, then each adds its own terms)."""
        self._flush()
        twin = Fingerprinter()
        twin._hash = self._hash.copy()
        twin._events = self._events.copy()
        twin._terms = self._terms.copy()
        twin._event_count = self._event_count
        twin._count(self._row_count, self._first_id, self._last_id)
        return twin

    def result(self) -> DataFingerprint:
        """The fingerprint of the rows added so far."""
        self._flush()
        combined = hashlib.sha256()
        for part in (self._hash, self._events, self._terms):
            combined.update(part.digest())
        return DataFingerprint(
            self._row_count,
            self._first_id,
            self._last_id,
            combined.hexdigest(),
            self._event_count,
        )


def fingerprint(
    events: Iterable[SnapshotRecord | BookState | TradeRecord],
    *,
    tickers: Sequence[str] = (),
    markets: Mapping[str, MarketRecord] | None = None,
    fees: Mapping[str, MarketFees] | None = None,
    fee_schedule_version: str = FEE_SCHEDULE_VERSION,
) -> DataFingerprint:
    """The fingerprint of ``events`` as given and of the markets' terms (a run fingerprints the
    events it replays and its tickers' terms)."""
    fingerprinter = Fingerprinter()
    for event in events:
        if isinstance(event, SnapshotRecord):
            fingerprinter.add(event)
        else:
            fingerprinter.add_event(event)
    fingerprinter.add_terms(tickers, markets or {}, fees or {}, fee_schedule_version)
    return fingerprinter.result()
