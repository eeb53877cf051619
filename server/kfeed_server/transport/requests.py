"""Validation of request fields shared by the servicers: page sizes, page tokens, tickers, times.

Page tokens are opaque to callers: URL-safe base64 of a small JSON document holding the keyset
cursor and a hash of the query it belongs to, so a token cannot be replayed against other filters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from typing import TypeVar

from google.protobuf.message import Message

from kfeed_server.transport.convert import from_timestamp
from kfeed_server.transport.errors import InvalidArgument

E = TypeVar("E", bound=IntEnum)

MAX_TICKER_LENGTH = 128


@dataclass(frozen=True, slots=True)
class PageSizeLimits:
    """A list RPC's page size: ``default`` when the caller sends 0, never more than ``maximum``."""

    default: int
    maximum: int

    def resolve(self, requested: int, field: str = "page_size") -> int:
        if requested < 0:
            raise InvalidArgument.field(field, "must not be negative")
        if requested > self.maximum:
            raise InvalidArgument.field(field, f"must be at most {self.maximum}")
        return requested or self.default


def require_ticker(value: str, field: str = "ticker") -> str:
    if not value:
        raise InvalidArgument.field(field, "is required")
    if len(value) > MAX_TICKER_LENGTH or not value.isprintable() or value.strip() != value:
        raise InvalidArgument.field(field, "is not a valid ticker")
    return value


def optional_ticker(value: str, field: str) -> str | None:
    return require_ticker(value, field) if value else None


def time_window(
    message: Message, start_field: str = "start_time", end_field: str = "end_time"
) -> tuple[datetime | None, datetime | None]:
    """The request's [start, end) window; INVALID_ARGUMENT when the end is not after the start."""
    start = from_timestamp(getattr(message, start_field)) if message.HasField(start_field) else None
    end = from_timestamp(getattr(message, end_field)) if message.HasField(end_field) else None
    if start is not None and end is not None and end <= start:
        raise InvalidArgument.field(end_field, f"must be after {start_field}")
    return start, end


def enum_values(values: Sequence[int], known: type[E], field: str) -> list[E]:
    """Proto enums are open: reject numbers this server does not know, and UNSPECIFIED (0)."""
    result: list[E] = []
    for index, value in enumerate(values):
        try:
            member = known(value)
        except ValueError:
            raise InvalidArgument.field(f"{field}[{index}]", f"unknown value {value}") from None
        if value == 0:
            raise InvalidArgument.field(f"{field}[{index}]", "must not be UNSPECIFIED")
        result.append(member)
    return result


def _query_hash(query: Sequence[object]) -> str:
    return hashlib.sha256(repr(tuple(query)).encode()).hexdigest()[:16]


def _encode_value(value: object) -> object:
    if isinstance(value, datetime):
        return {"t": value.isoformat()}
    if isinstance(value, str | int):
        return value
    raise TypeError(f"cannot put {type(value).__name__} in a page token")


def _decode_value(value: object) -> object:
    if isinstance(value, dict):
        return datetime.fromisoformat(str(value["t"]))
    if isinstance(value, str | int):
        return value
    raise ValueError("bad cursor value")


def encode_page_token(cursor: tuple[object, ...] | None, query: Sequence[object]) -> str:
    """The token for the page after ``cursor`` ("" when there is none)."""
    if cursor is None:
        return ""
    document = {"c": [_encode_value(v) for v in cursor], "q": _query_hash(query)}
    raw = json.dumps(document, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(
    token: str, query: Sequence[object], shape: tuple[type, ...], field: str = "page_token"
) -> tuple[object, ...] | None:
    """The cursor in ``token`` (None for ""), whose values have the types in ``shape``.

    INVALID_ARGUMENT when the token is undecodable, malformed or made for another query.
    """
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        document = json.loads(raw)
        cursor = tuple(_decode_value(v) for v in document["c"])
        query_hash = document["q"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InvalidArgument.field(field, "is not a valid page token") from None
    if len(cursor) != len(shape) or not all(
        isinstance(v, t) for v, t in zip(cursor, shape, strict=True)
    ):
        raise InvalidArgument.field(field, "is not a valid page token")
    if query_hash != _query_hash(query):
        raise InvalidArgument.field(field, "belongs to a request with different filters")
    return cursor


_RESUME_PREFIX = b"kfeed.snapshot:"


def encode_resume_token(snapshot_id: int) -> str:
    """An opaque token naming a position in the snapshot stream (after ``snapshot_id``)."""
    return base64.urlsafe_b64encode(_RESUME_PREFIX + str(snapshot_id).encode()).decode().rstrip("=")


def decode_resume_token(token: str, field: str = "resume_token") -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        if not raw.startswith(_RESUME_PREFIX):
            raise ValueError(token)
        snapshot_id = int(raw[len(_RESUME_PREFIX) :])
    except (binascii.Error, ValueError):
        raise InvalidArgument.field(field, "is not a valid resume token") from None
    if snapshot_id < 0:
        raise InvalidArgument.field(field, "is not a valid resume token")
    return snapshot_id


def duration_seconds(
    message: Message, name: str, *, default: float | None, minimum: float, maximum: float
) -> float | None:
    """A Duration field in seconds: ``default`` when unset or zero, else within the bounds."""
    value = getattr(message, name)
    if not message.HasField(name) or (value.seconds == 0 and value.nanos == 0):
        return default
    seconds = value.seconds + value.nanos / 1e9
    if not minimum <= seconds <= maximum:
        raise InvalidArgument.field(name, f"must be between {minimum:g} s and {maximum:g} s")
    return float(seconds)
