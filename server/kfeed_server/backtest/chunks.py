"""Version 1 of the fingerprint's row encoding (``fingerprint.Fingerprinter(version=1)``): kept so
that runs stored with it can be checked against a rerun of the same version.

A chunk of at most 4,096 rows is encoded as ``marshal`` format version 2 (no object references,
so the bytes depend only on the values, never on object identity) of the triple
``(columns, times, statuses)``: ``columns`` one list per field of ``MARKET_COLUMNS``
(snapshot_id, ticker, exchange_sequence, yes_bid, yes_ask, no_bid, no_ask, yes_bid_size,
yes_ask_size, last_price, volume, volume_24h, open_interest, liquidity) with None for a missing
value, ``times`` the exchange times as POSIX seconds (float), ``statuses`` the market statuses as
ints. Version 2 (the current one) hashes the columns themselves instead (ADR 0021).
"""

from __future__ import annotations

import marshal
from collections.abc import Sequence
from datetime import datetime
from operator import attrgetter

from kfeed_server.records import OPTIONAL_SNAPSHOT_FIELDS, SnapshotRecord

# Version 2 is the last marshal version without back-references (added in version 3), so equal
# values always encode to equal bytes.
MARSHAL_VERSION = 2

MARKET_COLUMNS = ("snapshot_id", "ticker", *OPTIONAL_SNAPSHOT_FIELDS)
"""The market-data columns of a chunk, in order."""
_COLUMN_GETTERS = [attrgetter(name) for name in MARKET_COLUMNS]
_EXCHANGE_TIME = attrgetter("exchange_time")
_STATUS = attrgetter("status")
_timestamp = datetime.timestamp


def encode_market_data(rows: Sequence[SnapshotRecord]) -> bytes:
    """The canonical bytes of ``rows``' market data, column by column (C-level maps, no per-row
    bytecode)."""
    return marshal.dumps(
        (
            [list(map(getter, rows)) for getter in _COLUMN_GETTERS],
            list(map(_timestamp, map(_EXCHANGE_TIME, rows))),
            list(map(int, map(_STATUS, rows))),
        ),
        MARSHAL_VERSION,
    )
