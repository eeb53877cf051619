"""Column types that behave the same on PostgreSQL and SQLite."""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import BigInteger, DateTime, Integer, SmallInteger
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)

E = TypeVar("E", bound=enum.IntEnum)

# Surrogate keys: BIGINT identity on PostgreSQL; on SQLite only "INTEGER PRIMARY KEY" aliases the
# rowid (BIGINT would not), which is what makes it auto-increment.
BigIntId: TypeEngine[int] = BigInteger().with_variant(Integer(), "sqlite")


def to_epoch_micros(value: datetime) -> int:
    """Microseconds since the Unix epoch of a timezone-aware datetime (exact, no float)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: kfeed stores timezone-aware UTC only")
    return (value - _EPOCH) // _ONE_MICROSECOND


def from_epoch_micros(value: int) -> datetime:
    """The UTC datetime ``value`` microseconds after the Unix epoch."""
    return _EPOCH + timedelta(microseconds=value)


class UtcDateTime(TypeDecorator[datetime]):
    """A UTC instant with microsecond precision, timezone-aware on read on every database.

    PostgreSQL stores ``TIMESTAMP WITH TIME ZONE``. SQLite has no timestamp type, so it stores a
    BIGINT of microseconds since the Unix epoch: exact (no float rounding), ordered like the
    instants it encodes (negative before 1970 included), compact and fast to index. Naive datetimes
    are refused on both databases rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return to_epoch_micros(value)
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: kfeed stores timezone-aware UTC only")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, int):
            return from_epoch_micros(value)
        assert isinstance(value, datetime)
        return value.astimezone(UTC)

    def result_processor(
        self, dialect: Dialect, coltype: object
    ) -> Callable[[Any], datetime | None]:
        # Reads are the hot path of ListSnapshots and replay: one plain function per value
        # instead of TypeDecorator's generic wrapper; asyncpg already returns UTC datetimes.
        if dialect.name == "sqlite":
            return _from_optional_epoch_micros
        return _as_utc


def _from_optional_epoch_micros(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + timedelta(microseconds=value)


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is UTC:
        return value
    return value.astimezone(UTC)


class IntEnumType(TypeDecorator[E], Generic[E]):
    """An ``IntEnum`` stored as SMALLINT with the enum's own numbers (equal to the proto's)."""

    impl = SmallInteger()
    cache_ok = True

    def __init__(self, enum_class: type[E]) -> None:
        super().__init__()
        self.enum_class = enum_class

    def process_bind_param(self, value: E | int | None, dialect: Dialect) -> int | None:
        return None if value is None else int(value)

    def process_result_value(self, value: int | None, dialect: Dialect) -> E | None:
        return None if value is None else self.enum_class(value)

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], E | None]:
        # A dict lookup is an order of magnitude cheaper than calling the enum class.
        members: dict[int, E] = {int(member): member for member in self.enum_class}

        def to_member(value: int | None) -> E | None:
            return None if value is None else members[value]

        return to_member
