"""Fixed-point numbers as Kalshi writes them.

Prices are integers in 1/10,000 USD (``4200`` is ``"0.4200"``); counts are integers in
1/100 contract (``150000`` is ``"1500.00"``). No float ever touches them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache

PRICE_SCALE = 10_000
"""Price units per dollar."""
COUNT_SCALE = 100
"""Count units per contract."""
ONE_DOLLAR = PRICE_SCALE

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# Memoised: a firehose formats the same few prices and sizes again and again (one or two a frame).
@lru_cache(maxsize=1 << 16)
def dollars(price: int) -> str:
    """``4200`` → ``"0.4200"`` (four decimals, as in every ``*_dollars`` field)."""
    sign = "-" if price < 0 else ""
    whole, frac = divmod(abs(price), PRICE_SCALE)
    return f"{sign}{whole}.{frac:04d}"


@lru_cache(maxsize=1 << 16)
def count_fp(count: int) -> str:
    """``150000`` → ``"1500.00"`` (two decimals, as in every ``*_fp`` field)."""
    sign = "-" if count < 0 else ""
    whole, frac = divmod(abs(count), COUNT_SCALE)
    return f"{sign}{whole}.{frac:02d}"


def legacy_cents(price: int) -> int:
    """The removed integer-cent field; sub-penny prices are floored (the reason it was removed)."""
    return price // (PRICE_SCALE // 100)


def legacy_count(count: int) -> int:
    """The removed integer-contract field; fractional contracts are floored."""
    return count // COUNT_SCALE


def parse_dollars(text: str) -> int:
    """``"0.42"`` → ``4200``, exactly; the inverse of :func:`dollars`."""
    whole, _, frac = text.strip().partition(".")
    if len(frac) > 4:
        raise ValueError(f"more than 4 decimals: {text!r}")
    negative = whole.startswith("-")
    value = abs(int(whole or "0")) * PRICE_SCALE + int(frac.ljust(4, "0") or "0")
    return -value if negative else value


def timestamp_from_us(micros: int) -> datetime:
    """Microseconds since the epoch → an aware UTC datetime."""
    return _EPOCH + timedelta(microseconds=micros)


def rfc3339(micros: int) -> str:
    """Microseconds since the epoch → RFC 3339 in UTC with ``Z``, fraction only when non-zero."""
    moment = timestamp_from_us(micros)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def micros_from_datetime(moment: datetime) -> int:
    """An aware datetime → microseconds since the epoch (naive datetimes are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
