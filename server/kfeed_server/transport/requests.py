"""Validation of request fields shared by the servicers: page sizes, tickers, ids, free text,
times, and the page and resume tokens the server hands out.

Every helper raises :class:`InvalidArgument` naming the field, so hostile input (out-of-range
Timestamps, NUL or control characters, huge strings, tampered tokens) is refused before it
reaches a query. Page and resume tokens are authenticated with a MAC under the server's token
key (:class:`RequestTokens`, docs/adr/0012-request-tokens-and-hostile-input.md): a token the
server did not issue is INVALID_ARGUMENT before anything in it is parsed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.message import Message

from kfeed_server.transport.convert import TimestampOutOfRange, from_timestamp
from kfeed_server.transport.errors import InvalidArgument, Unavailable

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

E = TypeVar("E", bound=IntEnum)

MAX_TICKER_LENGTH = 128
# Server-made ids (backtest ids) and names (strategies, parameters, metrics).
MAX_ID_LENGTH = 128
MAX_NAME_LENGTH = 128
# Free text a caller may store (titles, rules, producer names) and parameter string values.
MAX_TEXT_LENGTH = 16_384
# The longest page or resume token this server issues is far shorter; longer is refused unread.
MAX_TOKEN_LENGTH = 2048


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


# Visible ASCII: Kalshi's tickers are upper-case letters, digits, "-", "." and "_"
# (KXHIGHNY-25DEC05-B45.5); kfeed accepts any visible ASCII character, but never white space,
# control characters or anything that could not be typed back to read the market again.
_TICKER = re.compile(r"[!-~]+")


def ticker_problem(value: str) -> str | None:
    """Why ``value`` is not a valid ticker (None when it is): a ticker is 1–128 visible ASCII
    characters (``!`` to ``~``: no spaces, no control characters)."""
    if not value:
        return "is required"
    if len(value) > MAX_TICKER_LENGTH:
        return f"must be at most {MAX_TICKER_LENGTH} characters"
    if not _TICKER.fullmatch(value):
        return "must be visible ASCII characters only (no spaces or control characters)"
    return None


def require_ticker(value: str, field: str = "ticker") -> str:
    problem = ticker_problem(value)
    if problem is not None:
        raise InvalidArgument.field(field, problem if value else "is required")
    return value


def optional_ticker(value: str, field: str) -> str | None:
    return require_ticker(value, field) if value else None


def ticker_list(values: Sequence[str], maximum: int, field: str = "tickers") -> list[str]:
    """A repeated ticker field: at most ``maximum``, each valid (the error names its index)."""
    if len(values) > maximum:
        raise InvalidArgument.field(field, f"at most {maximum} tickers")
    return [require_ticker(t, f"{field}[{i}]") for i, t in enumerate(values)]


def name_problem(value: str, max_length: int = MAX_NAME_LENGTH) -> str | None:
    """Why ``value`` is not a valid id or name (None when it is; "" is valid: callers decide
    whether it is required). Ids and names follow the ticker rules."""
    if len(value) > max_length:
        return f"must be at most {max_length} characters"
    if not value.isprintable() or value.strip() != value:
        return "must be printable, without leading or trailing white space"
    return None


def require_id(value: str, field: str) -> str:
    """A required id (e.g. ``backtest_id``)."""
    if not value:
        raise InvalidArgument.field(field, "is required")
    return optional_name(value, field, MAX_ID_LENGTH)


def optional_name(value: str, field: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """An id or name that may be empty."""
    problem = name_problem(value, max_length)
    if problem is not None:
        raise InvalidArgument.field(field, problem)
    return value


# C0 controls but tab, newline and carriage return; DEL and the C1 controls.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def text_problem(value: str, max_length: int = MAX_TEXT_LENGTH) -> str | None:
    """Why free text ``value`` cannot be stored (None when it can): too long, or a control
    character other than tab, newline and carriage return (PostgreSQL refuses NUL in text)."""
    if len(value) > max_length:
        return f"must be at most {max_length} characters"
    if _CONTROL_CHARACTER.search(value):
        return "must not contain control characters"
    return None


def check_text(value: str, field: str, max_length: int = MAX_TEXT_LENGTH) -> str:
    problem = text_problem(value, max_length)
    if problem is not None:
        raise InvalidArgument.field(field, problem)
    return value


_TIME_RANGE = "must be a valid Timestamp (0001-01-01 to 9999-12-31, nanos 0 to 999,999,999)"


def optional_time(message: Message, name: str, field: str | None = None) -> datetime | None:
    """The Timestamp field ``name`` as a datetime (None when unset); ``field`` is its path in
    the request (default ``name``)."""
    if not message.HasField(name):
        return None
    try:
        return from_timestamp(getattr(message, name))
    except TimestampOutOfRange:
        raise InvalidArgument.field(field or name, _TIME_RANGE) from None


def time_window(
    message: Message, start_field: str = "start_time", end_field: str = "end_time"
) -> tuple[datetime | None, datetime | None]:
    """The request's [start, end) window; INVALID_ARGUMENT when the end is not after the start."""
    start = optional_time(message, start_field)
    end = optional_time(message, end_field)
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


TOKEN_KEY_BYTES = 32
# MAC bytes in a token: 128 bits, far beyond guessing over the network.
_MAC_BYTES = 16
_RESUME_TOKEN_CACHE = 8192
# Domain separation: a page token never passes as a resume token, nor the reverse.
_PAGE_DOMAIN = b"kfeed.page-token.v1:"
_RESUME_DOMAIN = b"kfeed.resume-token.v1:"
_SNAPSHOT_ID = struct.Struct(">Q")
INT64_MAX = 2**63 - 1


def new_token_key() -> bytes:
    """A fresh random token key."""
    return secrets.token_bytes(TOKEN_KEY_BYTES)


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _b64decode(token: str) -> bytes:
    if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        raise ValueError("not a token")
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


class RequestTokens:
    """Issues and checks page tokens and stream resume tokens, authenticated by a MAC.

    A token is URL-safe base64 of ``MAC || payload`` where MAC is keyed BLAKE2b (16 bytes) of
    ``domain || payload`` under the key (a MAC by design, and cheaper here than HMAC-SHA256
    through OpenSSL, which matters: every streamed message carries a token). Page tokens carry
    a small JSON document (the keyset cursor and a hash of the query it belongs to, so a token
    cannot be replayed against other filters); resume tokens a snapshot id (8 bytes,
    big-endian). The key is the server's
    ``--token-key-file`` or one kept in the database, so tokens survive restarts and are good on
    every replica of one database (docs/adr/0012-request-tokens-and-hostile-input.md). Until
    :meth:`set_key` is called (the server loads the key after migrating) every use answers
    UNAVAILABLE.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self._key: bytes | None = None
        # The tokens of recently streamed positions: every subscriber gets the same ones.
        self._resume_tokens: OrderedDict[tuple[str, int], str] = OrderedDict()
        if key is not None:
            self.set_key(key)

    @property
    def has_key(self) -> bool:
        return self._key is not None

    def set_key(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a token key needs at least 16 bytes")
        # BLAKE2b takes keys of up to 64 bytes: a configured key of any length is hashed to 32.
        self._key = hashlib.sha256(key).digest()
        self._resume_tokens.clear()

    def _mac(self, domain: bytes, payload: bytes) -> bytes:
        if self._key is None:
            raise Unavailable("the server is starting: try again shortly")
        return hashlib.blake2b(domain + payload, key=self._key, digest_size=_MAC_BYTES).digest()

    def _sign(self, domain: bytes, payload: bytes) -> str:
        return _b64encode(self._mac(domain, payload) + payload)

    def _verified_payload(self, domain: bytes, token: str) -> bytes | None:
        """The payload of ``token`` when this server issued it, else None."""
        try:
            raw = _b64decode(token)
        except (binascii.Error, ValueError):
            return None
        mac, payload = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
        if len(mac) != _MAC_BYTES or not hmac.compare_digest(mac, self._mac(domain, payload)):
            return None
        return payload

    def encode_page_token(self, cursor: tuple[object, ...] | None, query: Sequence[object]) -> str:
        """The token for the page after ``cursor`` ("" when there is none)."""
        if cursor is None:
            return ""
        document = {"c": [_encode_value(v) for v in cursor], "q": _query_hash(query)}
        return self._sign(_PAGE_DOMAIN, json.dumps(document, separators=(",", ":")).encode())

    def decode_page_token(
        self,
        token: str,
        query: Sequence[object],
        shape: tuple[type, ...],
        field: str = "page_token",
    ) -> tuple[object, ...] | None:
        """The cursor in ``token`` (None for ""), whose values have the types in ``shape``.

        INVALID_ARGUMENT when the token was not issued by this server (or its replicas) or was
        made for another query."""
        if not token:
            return None
        payload = self._verified_payload(_PAGE_DOMAIN, token)
        if payload is None:
            raise InvalidArgument.field(field, "is not a valid page token")
        try:
            document = json.loads(payload)
            cursor = tuple(_decode_value(v) for v in document["c"])
            query_hash = document["q"]
        except (ValueError, KeyError, TypeError, RecursionError):
            # Only a token signed under a key this server shares but of another format gets here.
            raise InvalidArgument.field(field, "is not a valid page token") from None
        if len(cursor) != len(shape) or not all(
            isinstance(v, t) for v, t in zip(cursor, shape, strict=True)
        ):
            raise InvalidArgument.field(field, "is not a valid page token")
        if query_hash != _query_hash(query):
            raise InvalidArgument.field(field, "belongs to a request with different filters")
        return cursor

    def encode_resume_token(self, snapshot_id: int, stream: str = "") -> str:
        """An opaque token naming a position in a stream (after ``snapshot_id``, or the row id
        of another ``stream``, e.g. "trades": a token of one stream never resumes another)."""
        cache = self._resume_tokens
        token = cache.get((stream, snapshot_id))
        if token is None:
            token = self._sign(_resume_domain(stream), _SNAPSHOT_ID.pack(snapshot_id))
            cache[stream, snapshot_id] = token
            if len(cache) > _RESUME_TOKEN_CACHE:
                cache.popitem(last=False)
        return token

    def resume_token_array(
        self, ids: npt.NDArray[np.int64], stream: str = ""
    ) -> npt.NDArray[np.uint8]:
        """The tokens ``encode_resume_token`` gives each of ``ids`` (a column replay's; not
        cached), as an n × 32 array of their ASCII characters: computed in compiled code
        (``resume_macs``), ≈0.3 µs a token instead of ≈1 µs through hashlib."""
        from kfeed_server.transport.resume_macs import resume_tokens  # numba: off the start-up path

        if self._key is None:
            raise Unavailable("the server is starting: try again shortly")
        return resume_tokens(self._key, _resume_domain(stream), ids)

    def decode_resume_token(self, token: str, field: str = "resume_token", stream: str = "") -> int:
        """The id in ``token``; INVALID_ARGUMENT unless this server issued it for ``stream``."""
        payload = self._verified_payload(_resume_domain(stream), token)
        if payload is None or len(payload) != _SNAPSHOT_ID.size:
            raise InvalidArgument.field(field, "is not a valid resume token")
        (snapshot_id,) = _SNAPSHOT_ID.unpack(payload)
        if snapshot_id > INT64_MAX:
            raise InvalidArgument.field(field, "is not a valid resume token")
        return int(snapshot_id)


def _resume_domain(stream: str) -> bytes:
    # The snapshot stream's tokens keep the domain they were first issued under.
    return _RESUME_DOMAIN + (stream.encode() + b":" if stream else b"")


def duration_seconds(
    message: Message, name: str, *, default: float | None, minimum: float, maximum: float
) -> float | None:
    """A Duration field in seconds: ``default`` when unset or zero, else within the bounds."""
    value = getattr(message, name)
    if not message.HasField(name) or (value.seconds == 0 and value.nanos == 0):
        return default
    if not -999_999_999 <= value.nanos <= 999_999_999:
        raise InvalidArgument.field(name, f"must be between {minimum:g} s and {maximum:g} s")
    seconds = value.seconds + value.nanos / 1e9
    if not minimum <= seconds <= maximum:
        raise InvalidArgument.field(name, f"must be between {minimum:g} s and {maximum:g} s")
    return float(seconds)
