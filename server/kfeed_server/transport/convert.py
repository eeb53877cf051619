"""Conversions between records (kfeed_server.records) and kfeed.v1 messages.

Enum values are shared with the proto enums by construction, so enums convert with ``int``.
Optional money fields map to unset sub-messages, never to zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import repeat
from typing import Any

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from kfeed.v1 import ingest_service_pb2, types_pb2
from kfeed_server.records import (
    OPTIONAL_SNAPSHOT_FIELDS,
    CandleRecord,
    DataSource,
    EventRecord,
    FeedGapRecord,
    MarketRecord,
    MarketResult,
    MarketStatus,
    PriceOhlc,
    SeriesRecord,
    Side,
    SnapshotRecord,
    TradeRecord,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """An aware datetime as a Timestamp, exact to the microsecond."""
    delta = value - _EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    seconds, micro = divmod(micros, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=micro * 1000)


# The range google.protobuf.Timestamp allows (0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z),
# which is also the range of a Python datetime.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799


class TimestampOutOfRange(ValueError):
    """A Timestamp outside 0001-01-01..9999-12-31, or with nanos outside 0..999,999,999."""


def from_timestamp(value: timestamp_pb2.Timestamp) -> datetime:
    """A Timestamp as an aware UTC datetime, truncated to the microsecond (kfeed's precision).

    Raises TimestampOutOfRange for a Timestamp the proto documentation calls invalid."""
    seconds, nanos = value.seconds, value.nanos
    if not (
        MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS and 0 <= nanos < 1_000_000_000
    ):
        raise TimestampOutOfRange(f"Timestamp out of range: seconds={seconds} nanos={nanos}")
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


def optional_timestamp(message: Message, field: str) -> datetime | None:
    """The Timestamp field's datetime when ``message`` has it set, else None."""
    return from_timestamp(getattr(message, field)) if message.HasField(field) else None


def dollars(value: int) -> types_pb2.Dollars:
    return types_pb2.Dollars(ten_thousandths=value)


def contracts(value: int) -> types_pb2.Contracts:
    return types_pb2.Contracts(hundredths=value)


def market_to_proto(record: MarketRecord) -> types_pb2.Market:
    market = types_pb2.Market(
        ticker=record.ticker,
        event_ticker=record.event_ticker,
        series_ticker=record.series_ticker,
        title=record.title,
        subtitle=record.subtitle,
        yes_sub_title=record.yes_sub_title,
        no_sub_title=record.no_sub_title,
        market_type=record.market_type,
        status=int(record.status),  # type: ignore[arg-type]
        result=int(record.result),  # type: ignore[arg-type]
        price_level_structure=record.price_level_structure,
        fractional_trading_enabled=record.fractional_trading_enabled,
        rules_primary=record.rules_primary,
    )
    for field, value in (
        ("open_time", record.open_time),
        ("close_time", record.close_time),
        ("expiration_time", record.expiration_time),
        ("settlement_time", record.settlement_time),
        ("update_time", record.update_time),
    ):
        if value is not None:
            getattr(market, field).CopyFrom(timestamp(value))
    if record.settlement_value is not None:
        market.settlement_value.ten_thousandths = record.settlement_value
    return market


def market_from_proto(message: types_pb2.Market) -> MarketRecord:
    return MarketRecord(
        ticker=message.ticker,
        event_ticker=message.event_ticker,
        series_ticker=message.series_ticker,
        title=message.title,
        subtitle=message.subtitle,
        yes_sub_title=message.yes_sub_title,
        no_sub_title=message.no_sub_title,
        market_type=message.market_type or "binary",
        status=MarketStatus(message.status),
        result=MarketResult(message.result),
        open_time=optional_timestamp(message, "open_time"),
        close_time=optional_timestamp(message, "close_time"),
        expiration_time=optional_timestamp(message, "expiration_time"),
        settlement_time=optional_timestamp(message, "settlement_time"),
        settlement_value=(
            message.settlement_value.ten_thousandths
            if message.HasField("settlement_value")
            else None
        ),
        price_level_structure=message.price_level_structure,
        fractional_trading_enabled=message.fractional_trading_enabled,
        rules_primary=message.rules_primary,
    )


def series_to_proto(record: SeriesRecord) -> types_pb2.Series:
    return types_pb2.Series(
        ticker=record.ticker,
        title=record.title,
        category=record.category,
        frequency=record.frequency,
        tags=list(record.tags),
        fee_type=record.fee_type,
        fee_multiplier_ten_thousandths=record.fee_multiplier_ten_thousandths,
    )


def event_to_proto(record: EventRecord) -> types_pb2.Event:
    event = types_pb2.Event(
        event_ticker=record.event_ticker,
        series_ticker=record.series_ticker,
        title=record.title,
        sub_title=record.sub_title,
        category=record.category,
        mutually_exclusive=record.mutually_exclusive,
        fee_type_override=record.fee_type_override,
        fee_multiplier_override_ten_thousandths=record.fee_multiplier_override_ten_thousandths,
    )
    if record.strike_time is not None:
        event.strike_time.CopyFrom(timestamp(record.strike_time))
    return event


def series_from_proto(message: types_pb2.Series) -> SeriesRecord:
    return SeriesRecord(
        ticker=message.ticker,
        title=message.title,
        category=message.category,
        frequency=message.frequency,
        tags=tuple(message.tags),
        fee_type=message.fee_type,
        fee_multiplier_ten_thousandths=message.fee_multiplier_ten_thousandths,
    )


def event_from_proto(message: types_pb2.Event) -> EventRecord:
    return EventRecord(
        event_ticker=message.event_ticker,
        series_ticker=message.series_ticker,
        title=message.title,
        sub_title=message.sub_title,
        category=message.category,
        mutually_exclusive=message.mutually_exclusive,
        strike_time=optional_timestamp(message, "strike_time"),
        fee_type_override=message.fee_type_override,
        fee_multiplier_override_ten_thousandths=(
            message.fee_multiplier_override_ten_thousandths
            if message.HasField("fee_multiplier_override_ten_thousandths")
            else None
        ),
    )


def _timestamp_fields(value: datetime) -> dict[str, int]:
    delta = value - _EPOCH
    return {"seconds": delta.days * 86_400 + delta.seconds, "nanos": delta.microseconds * 1000}


def snapshot_fields(r: SnapshotRecord) -> dict[str, Any]:
    """A snapshot as MarketSnapshot constructor arguments.

    This is the hot path of ListSnapshots and of every stream: one constructor call with nested
    dicts is much cheaper than building and copying sub-messages. ``None`` leaves a field unset.
    """
    yes_bid, yes_ask, no_bid, no_ask = r.yes_bid, r.yes_ask, r.no_bid, r.no_ask
    last_price, liquidity = r.last_price, r.liquidity
    bid_size, ask_size, volume = r.yes_bid_size, r.yes_ask_size, r.volume
    volume_24h, open_interest = r.volume_24h, r.open_interest
    return {
        "snapshot_id": r.snapshot_id,
        "ticker": r.ticker,
        "exchange_time": _timestamp_fields(r.exchange_time),
        "receive_time": _timestamp_fields(r.receive_time),
        "source": r.source,
        "status": r.status,
        "exchange_sequence": r.exchange_sequence,
        "yes_bid": None if yes_bid is None else {"ten_thousandths": yes_bid},
        "yes_ask": None if yes_ask is None else {"ten_thousandths": yes_ask},
        "no_bid": None if no_bid is None else {"ten_thousandths": no_bid},
        "no_ask": None if no_ask is None else {"ten_thousandths": no_ask},
        "last_price": None if last_price is None else {"ten_thousandths": last_price},
        "liquidity": None if liquidity is None else {"ten_thousandths": liquidity},
        "yes_bid_size": None if bid_size is None else {"hundredths": bid_size},
        "yes_ask_size": None if ask_size is None else {"hundredths": ask_size},
        "volume": None if volume is None else {"hundredths": volume},
        "volume_24h": None if volume_24h is None else {"hundredths": volume_24h},
        "open_interest": None if open_interest is None else {"hundredths": open_interest},
    }


def snapshot_to_proto(record: SnapshotRecord) -> types_pb2.MarketSnapshot:
    return types_pb2.MarketSnapshot(**snapshot_fields(record))


_SOURCES = {int(member): member for member in DataSource}
_STATUSES = {int(member): member for member in MarketStatus}


def snapshot_from_proto(m: types_pb2.MarketSnapshot) -> SnapshotRecord:
    """A snapshot message as a record. ValueError for an unknown enum value or a Timestamp out of
    range.

    The ingest hot path (every published snapshot): each field is read once, with dict lookups
    for enums, which is about twice as fast as a loop over field names."""
    has = m.HasField
    try:
        source, status = _SOURCES[m.source], _STATUSES[m.status]
        exchange_time, receive_time = (
            from_timestamp(m.exchange_time),
            from_timestamp(m.receive_time),
        )
    except (KeyError, TimestampOutOfRange) as error:
        raise ValueError(f"invalid snapshot of {m.ticker!r}: {error}") from error
    return SnapshotRecord(
        m.ticker,
        exchange_time,
        receive_time,
        source,
        m.exchange_sequence if has("exchange_sequence") else None,
        m.yes_bid.ten_thousandths if has("yes_bid") else None,
        m.yes_ask.ten_thousandths if has("yes_ask") else None,
        m.no_bid.ten_thousandths if has("no_bid") else None,
        m.no_ask.ten_thousandths if has("no_ask") else None,
        m.yes_bid_size.hundredths if has("yes_bid_size") else None,
        m.yes_ask_size.hundredths if has("yes_ask_size") else None,
        m.last_price.ten_thousandths if has("last_price") else None,
        m.volume.hundredths if has("volume") else None,
        m.volume_24h.hundredths if has("volume_24h") else None,
        m.open_interest.hundredths if has("open_interest") else None,
        m.liquidity.ten_thousandths if has("liquidity") else None,
        status,
    )


# The optional columns of SnapshotColumns, bit i of ``present`` for the i-th (see
# ingest_service.proto), in SnapshotRecord's order.
SNAPSHOT_OPTIONAL_COLUMNS = OPTIONAL_SNAPSHOT_FIELDS
ALL_OPTIONAL_PRESENT = (1 << len(SNAPSHOT_OPTIONAL_COLUMNS)) - 1


# SnapshotColumns' integer columns (all but ``tickers``), one value per row each.
SNAPSHOT_INTEGER_COLUMNS = (
    "ticker_index", "exchange_time_micros", "receive_time_micros", "source", "status", "present",
    *SNAPSHOT_OPTIONAL_COLUMNS,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ReadColumns:
    """A SnapshotColumns message's columns read out once, as lists: the checks and the decoding
    both walk them (reading a packed column costs, and a list iterates faster than a column)."""

    tickers: list[str]
    # Every column of SNAPSHOT_INTEGER_COLUMNS by name.
    integers: dict[str, list[int]]

    @property
    def rows(self) -> int:
        return len(self.integers["ticker_index"])


def read_columns(columns: ingest_service_pb2.SnapshotColumns) -> ReadColumns:
    return ReadColumns(
        list(columns.tickers),
        {name: getattr(columns, name)[:] for name in SNAPSHOT_INTEGER_COLUMNS},
    )


def snapshots_from_columns(columns: ReadColumns) -> list[SnapshotRecord]:
    """The rows of valid ``columns`` (the servicer validated them) as records.

    The ingest hot path for columnar batches, so it works column by column: each column is
    converted in one comprehension and the rows are zipped together in C. The optional columns
    are walked only when some row leaves a field unset (rare in a live feed)."""
    tickers, integers = columns.tickers, columns.integers
    epoch, micros = _EPOCH, timedelta
    present = integers["present"]
    optional: list[Sequence[int | None]] = [integers[name] for name in SNAPSHOT_OPTIONAL_COLUMNS]
    if present.count(ALL_OPTIONAL_PRESENT) != len(present):
        optional = [
            [v if bits >> bit & 1 else None for v, bits in zip(values, present, strict=True)]
            for bit, values in enumerate(optional)
        ]
    rows = zip(
        [tickers[index] for index in integers["ticker_index"]],
        [epoch + micros(0, 0, us) for us in integers["exchange_time_micros"]],  # days, s, µs
        [epoch + micros(0, 0, us) for us in integers["receive_time_micros"]],
        [_SOURCES[source] for source in integers["source"]],
        *optional,
        [_STATUSES[status] for status in integers["status"]],
        repeat(0, len(present)),  # snapshot_id: not stored yet
        strict=True,
    )
    return list(map(SnapshotRecord._make, rows))


def trade_to_proto(record: TradeRecord) -> types_pb2.Trade:
    return types_pb2.Trade(
        trade_id=record.trade_id,
        ticker=record.ticker,
        yes_price=dollars(record.yes_price),
        no_price=dollars(record.no_price),
        count=contracts(record.count),
        taker_side=int(record.taker_side),  # type: ignore[arg-type]
        create_time=timestamp(record.create_time),
    )


def trade_from_proto(message: types_pb2.Trade) -> TradeRecord:
    return TradeRecord(
        trade_id=message.trade_id,
        ticker=message.ticker,
        yes_price=message.yes_price.ten_thousandths,
        no_price=message.no_price.ten_thousandths,
        count=message.count.hundredths,
        taker_side=Side(message.taker_side),
        create_time=from_timestamp(message.create_time),
    )


def _price_ohlc(value: PriceOhlc) -> types_pb2.PriceOhlc:
    return types_pb2.PriceOhlc(
        open=dollars(value.open),
        high=dollars(value.high),
        low=dollars(value.low),
        close=dollars(value.close),
    )


def candle_to_proto(record: CandleRecord) -> types_pb2.Candle:
    candle = types_pb2.Candle(
        start_time=timestamp(record.start_time),
        end_time=timestamp(record.end_time),
        volume=contracts(record.volume),
        trade_count=record.trade_count,
    )
    if record.yes_bid is not None:
        candle.yes_bid.CopyFrom(_price_ohlc(record.yes_bid))
    if record.yes_ask is not None:
        candle.yes_ask.CopyFrom(_price_ohlc(record.yes_ask))
    if record.price is not None:
        candle.price.CopyFrom(_price_ohlc(record.price))
    if record.mean_price is not None:
        candle.mean_price.ten_thousandths = record.mean_price
    if record.open_interest is not None:
        candle.open_interest.hundredths = record.open_interest
    return candle


def feed_gap_to_proto(record: FeedGapRecord) -> types_pb2.FeedGap:
    gap = types_pb2.FeedGap(
        gap_id=record.gap_id,
        ticker=record.ticker,
        channel=record.channel,
        subscription_id=record.subscription_id,
        expected_sequence=record.expected_sequence,
        received_sequence=record.received_sequence,
        detect_time=timestamp(record.detect_time),
        recovered=record.recovered,
    )
    if record.recover_time is not None:
        gap.recover_time.CopyFrom(timestamp(record.recover_time))
    return gap


def feed_gap_from_proto(message: types_pb2.FeedGap) -> FeedGapRecord:
    return FeedGapRecord(
        ticker=message.ticker,
        channel=message.channel,
        subscription_id=message.subscription_id,
        expected_sequence=message.expected_sequence,
        received_sequence=message.received_sequence,
        detect_time=from_timestamp(message.detect_time),
        recovered=message.recovered,
        recover_time=optional_timestamp(message, "recover_time"),
    )
