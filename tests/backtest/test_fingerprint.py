"""The fingerprint's two versions, each against an independent computation from its documented
definition (docs/BACKTESTING.md, "Fingerprint"): version 2 over the columns in their fixed
little-endian layout, version 1 over the marshal encoding of 4,096-row chunks (runs stored with it
must still check against a rerun)."""

from __future__ import annotations

import hashlib
import marshal
import random
import struct
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from kfeed_server.backtest import Fingerprinter, fingerprint
from kfeed_server.backtest.replay_batches import batch_from_records, from_ipc, to_ipc
from kfeed_server.records import OPTIONAL_SNAPSHOT_FIELDS, DataSource, MarketStatus, SnapshotRecord
from kfeed_server.records.backtest import FEE_SCHEDULE_VERSION

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _random_rows(count: int, seed: int) -> list[SnapshotRecord]:
    """Rows with every optional field sometimes missing, tickers of several byte lengths (one
    not ASCII), times before and after 1970 to the microsecond, values up to int64's range."""
    rng = random.Random(seed)
    tickers = ("A", "KXHIGHNY-25JAN01-T40", "KX-É€", "B" * 40)
    statuses = list(MarketStatus)
    rows = []
    moment = datetime(1969, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)
    for i in range(count):
        moment += timedelta(microseconds=rng.choice([0, 1, 999, 86_400_000_000]))
        optional = [
            None if rng.random() < 0.2 else rng.choice([0, 1, rng.randrange(10_000), 2**62 + i])
            for _ in OPTIONAL_SNAPSHOT_FIELDS
        ]
        received = moment + timedelta(seconds=rng.random())
        source = rng.choice(list(DataSource))
        status = rng.choice(statuses)
        rows.append(
            SnapshotRecord._make(
                (rng.choice(tickers), moment, received, source, *optional, status, 1_000 + 3 * i)
            )
        )
    return rows


def _combined(rows_digest: bytes) -> str:
    """The content hash of a run over rows with that digest, no books or trades, no tickers."""
    events = hashlib.sha256().digest()
    terms = hashlib.sha256(marshal.dumps([FEE_SCHEDULE_VERSION], 2)).digest()
    return hashlib.sha256(rows_digest + events + terms).hexdigest()


def _version_2_by_hand(rows: Sequence[SnapshotRecord]) -> str:
    """Version 2 as documented, one row and one value at a time with struct."""
    order = ["snapshot_id", "ticker.length", "ticker.utf8", "exchange_time", "status"]
    for name in OPTIONAL_SNAPSHOT_FIELDS:
        order += [f"{name}.valid", name]
    streams = {name: bytearray() for name in order}
    for row in rows:
        utf8 = row.ticker.encode()
        streams["snapshot_id"] += struct.pack("<q", row.snapshot_id)
        streams["ticker.length"] += struct.pack("<q", len(utf8))
        streams["ticker.utf8"] += utf8
        micros = (row.exchange_time - _EPOCH) // timedelta(microseconds=1)
        streams["exchange_time"] += struct.pack("<q", micros)
        streams["status"] += struct.pack("<q", int(row.status))
        for name in OPTIONAL_SNAPSHOT_FIELDS:
            value = getattr(row, name)
            streams[f"{name}.valid"] += b"\x00" if value is None else b"\x01"
            streams[name] += struct.pack("<q", 0 if value is None else value)
    digests = b"".join(hashlib.sha256(streams[name]).digest() for name in order)
    return _combined(hashlib.sha256(digests).digest())


def _version_1_by_hand(rows: Sequence[SnapshotRecord]) -> str:
    """Version 1 as documented: marshal (format 2) of each 4,096-row chunk's columns."""
    digest = hashlib.sha256()
    for first in range(0, len(rows), 4_096):
        chunk = rows[first : first + 4_096]
        columns = [
            [getattr(row, name) for row in chunk]
            for name in ("snapshot_id", "ticker", *OPTIONAL_SNAPSHOT_FIELDS)
        ]
        times = [row.exchange_time.timestamp() for row in chunk]
        statuses = [int(row.status) for row in chunk]
        digest.update(marshal.dumps((columns, times, statuses), 2))
    return _combined(digest.digest())


ROWS = _random_rows(9_000, seed=3)


def test_version_2_hashes_the_documented_column_layout() -> None:
    printed = fingerprint(ROWS)
    assert printed.version == 2
    assert printed.content_hash == _version_2_by_hand(ROWS)
    assert (printed.row_count, printed.first_snapshot_id, printed.last_snapshot_id) == (
        len(ROWS),
        ROWS[0].snapshot_id,
        ROWS[-1].snapshot_id,
    )


def test_version_1_is_still_the_marshal_encoding() -> None:
    printed = fingerprint(ROWS, version=1)
    assert printed.version == 1
    assert printed.content_hash == _version_1_by_hand(ROWS)
    assert printed.content_hash != fingerprint(ROWS).content_hash


@pytest.mark.parametrize("version", [1, 2])
def test_columns_and_records_in_any_cut_give_the_same_fingerprint(version: int) -> None:
    """Batches of columns (as the worker receives them, through Arrow IPC), records one at a
    time, or both mixed: the same rows in the same order give the same fingerprint."""
    expected = fingerprint(ROWS, version=version)
    rng = random.Random(version)
    fingerprinter = Fingerprinter(version)
    first = 0
    while first < len(ROWS):
        size = rng.choice([1, 5, 700, 4_096, 5_000])
        part = ROWS[first : first + size]
        if rng.random() < 0.3:
            for row in part:
                fingerprinter.add(row)
        else:
            fingerprinter.add_batch(from_ipc(to_ipc(batch_from_records(part)).to_pybytes()))
        first += size
    fingerprinter.add_terms((), {}, {}, FEE_SCHEDULE_VERSION)
    assert fingerprinter.result() == expected


def test_what_the_fingerprint_leaves_out_and_what_it_does_not() -> None:
    base = fingerprint(ROWS).content_hash
    last = ROWS[-1]
    assert fingerprint([*ROWS[:-1], last._replace(source=DataSource.BACKFILL)]).content_hash == base
    for changed in (
        last._replace(yes_bid=None if last.yes_bid is not None else 0),
        last._replace(ticker=last.ticker + "X"),
        last._replace(exchange_time=last.exchange_time + timedelta(microseconds=1)),
        last._replace(snapshot_id=last.snapshot_id + 1),
    ):
        assert fingerprint([*ROWS[:-1], changed]).content_hash != base
    # Where a ticker ends is part of it: "AB","C" is not "A","BC".
    moved = [ROWS[0]._replace(ticker="AB"), ROWS[1]._replace(ticker="C")]
    assert fingerprint(moved) != fingerprint([moved[0]._replace(ticker="A"),
                                              moved[1]._replace(ticker="BC")])  # fmt: skip


def test_an_unknown_version_is_refused() -> None:
    with pytest.raises(ValueError, match="version 3"):
        Fingerprinter(3)
