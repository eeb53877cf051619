"""Kalshi JSON → kfeed.v1 messages: exact fixed point, legacy fallback, vocabularies, books."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kfeed.v1 import types_pb2
from kfeed_ingest.kalshi.models import (
    KalshiCandlestick,
    KalshiEvent,
    KalshiMarket,
    KalshiSeries,
    KalshiTrade,
)
from kfeed_ingest.kalshi.normalise import (
    FixedPointError,
    SnapshotDeduper,
    TopOfBook,
    book_side,
    event_message,
    format_price,
    market_message,
    market_result,
    market_status,
    parse_count,
    parse_price,
    series_message,
    snapshot_from_candlestick,
    snapshot_from_market,
    trade_message,
)

RECEIVED = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)


@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=0, max_value=4))
def test_any_decimal_string_with_at_most_four_places_parses_exactly(
    units: int, places: int
) -> None:
    # `units` in 1/10^places dollars, written as the decimal string Kalshi would send.
    text = f"{Decimal(units) / 10**places:.{places}f}"
    assert parse_price(text) == units * 10 ** (4 - places)
    assert parse_price(format_price(parse_price(text))) == parse_price(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.4200", 4200),
        ("0.1250", 1250),
        ("1", 10000),
        ("0.0001", 1),
        ("0.99990", 9999),
        ("0.1", 1000),
    ],
)
def test_known_prices(text: str, expected: int) -> None:
    assert parse_price(text) == expected


def test_float_noise_cannot_creep_in() -> None:
    # 0.29 * 10000 == 2899.9999999999995 in binary floating point.
    assert parse_price("0.29") == 2900
    assert parse_count("0.29") == 29


@pytest.mark.parametrize("text", ["0.12345", "0.00001", "abc", "", "NaN", "Infinity"])
def test_finer_than_a_hundredth_of_a_cent_or_not_a_number_is_rejected(text: str) -> None:
    with pytest.raises(FixedPointError):
        parse_price(text)


def test_counts_are_hundredths_and_reject_a_third_decimal() -> None:
    assert parse_count("1500.00") == 150000
    assert parse_count("0.25") == 25
    with pytest.raises(FixedPointError, match="more than 2 decimal places"):
        parse_count("1.005")


def _market(**fields: object) -> KalshiMarket:
    return KalshiMarket.model_validate({"ticker": "KXT-1", "event_ticker": "KXT", **fields})


def test_dollar_fields_win_and_legacy_cents_are_only_a_fallback() -> None:
    both = snapshot_from_market(_market(yes_bid_dollars="0.4210", yes_bid=40), RECEIVED)
    legacy = snapshot_from_market(_market(yes_bid=40, volume=12), RECEIVED)
    neither = snapshot_from_market(_market(), RECEIVED)

    assert both.yes_bid.ten_thousandths == 4210
    assert legacy.yes_bid.ten_thousandths == 4000
    assert legacy.volume.hundredths == 1200
    assert not neither.HasField("yes_bid")
    assert not neither.HasField("volume")


def test_rest_snapshot_fields_and_complements() -> None:
    snapshot = snapshot_from_market(
        _market(
            status="active",
            yes_bid_dollars="0.4200",
            yes_ask_dollars="0.4400",
            last_price_dollars="0.4300",
            volume_fp="1500.00",
            volume_24h_fp="12.50",
            open_interest_fp="300.00",
            liquidity_dollars="1234.5600",
            yes_bid_size_fp="10.00",
            unknown_new_field={"nested": True},
        ),
        RECEIVED,
    )
    assert snapshot.no_bid.ten_thousandths == 5600  # 1 - yes ask
    assert snapshot.no_ask.ten_thousandths == 5800  # 1 - yes bid
    assert snapshot.volume_24h.hundredths == 1250
    assert snapshot.liquidity.ten_thousandths == 12345600
    assert snapshot.yes_bid_size.hundredths == 1000
    assert snapshot.status == types_pb2.MARKET_STATUS_OPEN
    assert snapshot.source == types_pb2.DATA_SOURCE_POLL
    assert snapshot.receive_time.ToDatetime(tzinfo=UTC) == RECEIVED


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("initialized", types_pb2.MARKET_STATUS_UNOPENED),
        ("unopened", types_pb2.MARKET_STATUS_UNOPENED),
        ("active", types_pb2.MARKET_STATUS_OPEN),
        ("open", types_pb2.MARKET_STATUS_OPEN),
        ("inactive", types_pb2.MARKET_STATUS_PAUSED),
        ("paused", types_pb2.MARKET_STATUS_PAUSED),
        ("closed", types_pb2.MARKET_STATUS_CLOSED),
        ("determined", types_pb2.MARKET_STATUS_DETERMINED),
        ("disputed", types_pb2.MARKET_STATUS_DISPUTED),
        ("amended", types_pb2.MARKET_STATUS_AMENDED),
        ("finalized", types_pb2.MARKET_STATUS_FINALIZED),
        ("settled", types_pb2.MARKET_STATUS_FINALIZED),
        ("something_new", types_pb2.MARKET_STATUS_UNSPECIFIED),
    ],
)
def test_status_field_and_filter_vocabularies_map_to_one_enum(
    name: str, status: types_pb2.MarketStatus.ValueType
) -> None:
    assert market_status(name) == status


def test_results() -> None:
    assert market_result("yes") == types_pb2.MARKET_RESULT_YES
    assert market_result("no") == types_pb2.MARKET_RESULT_NO
    assert market_result("scalar") == types_pb2.MARKET_RESULT_SCALAR
    assert market_result("") == types_pb2.MARKET_RESULT_UNSPECIFIED
    assert market_result(None) == types_pb2.MARKET_RESULT_UNSPECIFIED


def test_market_message_converts_times_to_utc_and_settlement_to_fixed_point() -> None:
    market = market_message(
        _market(
            status="finalized",
            result="yes",
            settlement_value_dollars="1.0000",
            close_time="2026-11-25T10:00:00-05:00",
            open_time="",
        ),
        series_ticker="KXS",
    )
    assert market.series_ticker == "KXS"
    assert market.result == types_pb2.MARKET_RESULT_YES
    assert market.settlement_value.ten_thousandths == 10000
    assert market.close_time.ToDatetime(tzinfo=UTC) == datetime(2026, 11, 25, 15, tzinfo=UTC)
    assert not market.HasField("open_time")


def test_series_fee_multiplier_is_exact() -> None:
    series = series_message(KalshiSeries(ticker="KXS", fee_multiplier=0.35, tags=None))
    assert series.fee_multiplier_ten_thousandths == 3500
    assert series_message(KalshiSeries(ticker="KXS")).fee_multiplier_ten_thousandths == 10000


def test_event_fee_overrides_are_kept_exactly_and_absent_ones_stay_unset() -> None:
    overridden = event_message(
        KalshiEvent.model_validate(
            {"event_ticker": "KXE", "fee_type_override": "flat", "fee_multiplier_override": 0.35}
        )
    )
    assert overridden.fee_type_override == "flat"
    assert overridden.fee_multiplier_override_ten_thousandths == 3_500
    plain = event_message(KalshiEvent(event_ticker="KXE"))
    assert plain.fee_type_override == ""
    assert not plain.HasField("fee_multiplier_override_ten_thousandths")


def test_best_yes_ask_is_one_minus_best_no_bid_whatever_the_order() -> None:
    yes = book_side([["0.4200", "10.00"], ["0.4500", "3.00"], ["0.4000", "1.00"]])
    no = book_side([["0.5200", "7.00"], ["0.5000", "2.00"]])
    top = TopOfBook.from_levels(yes, no)
    assert (top.yes_bid, top.yes_bid_size) == (4500, 300)
    assert (top.no_bid, top.no_bid_size) == (5200, 700)
    assert top.yes_ask == 4800
    assert top.no_ask == 5500


def test_empty_book_side_leaves_prices_absent() -> None:
    snapshot = types_pb2.MarketSnapshot(yes_ask=types_pb2.Dollars(ten_thousandths=1))
    TopOfBook.from_levels({4200: 100}, {}).apply_to(snapshot)
    assert snapshot.yes_bid.ten_thousandths == 4200
    assert not snapshot.HasField("yes_ask")
    assert not snapshot.HasField("no_bid")


def test_trade_with_new_and_old_field_names() -> None:
    new = trade_message(
        KalshiTrade.model_validate(
            {
                "trade_id": "t1",
                "ticker": "KXT-1",
                "count_fp": "2.50",
                "yes_price_dollars": "0.4200",
                "no_price_dollars": "0.5800",
                "taker_outcome_side": "no",
                "created_time": "2026-11-25T12:00:00.5Z",
            }
        )
    )
    old = trade_message(
        KalshiTrade.model_validate(
            {
                "trade_id": "t2",
                "market_ticker": "KXT-1",
                "count": 3,
                "yes_price": 42,
                "taker_side": "yes",
                "ts": 1764072000,
            }
        )
    )
    assert (new.count.hundredths, new.yes_price.ten_thousandths, new.taker_side) == (
        250,
        4200,
        types_pb2.SIDE_NO,
    )
    assert new.create_time.ToDatetime(tzinfo=UTC) == datetime(
        2026, 11, 25, 12, 0, 0, 500000, tzinfo=UTC
    )
    assert (old.ticker, old.count.hundredths, old.no_price.ten_thousandths) == ("KXT-1", 300, 5800)
    assert old.taker_side == types_pb2.SIDE_YES


def test_candlestick_snapshot_uses_the_period_end_as_exchange_time() -> None:
    candle = KalshiCandlestick.model_validate(
        {
            "end_period_ts": 1764072000,
            "volume_fp": "5.00",
            "open_interest_fp": "10.00",
            "price": {"close_dollars": "0.4300"},
            "yes_bid": {"close_dollars": "0.4200"},
            "yes_ask": {"close_dollars": None},
        }
    )
    snapshot = snapshot_from_candlestick("KXT-1", candle, RECEIVED)
    assert snapshot.source == types_pb2.DATA_SOURCE_BACKFILL
    assert snapshot.exchange_time.seconds == 1764072000
    assert snapshot.yes_bid.ten_thousandths == 4200
    assert snapshot.no_ask.ten_thousandths == 5800
    assert not snapshot.HasField("yes_ask")
    assert snapshot.open_interest.hundredths == 1000


def test_deduper_suppresses_only_identical_book_and_activity() -> None:
    deduper = SnapshotDeduper()
    first = snapshot_from_market(_market(yes_bid_dollars="0.42"), RECEIVED)
    later_same = snapshot_from_market(_market(yes_bid_dollars="0.4200"), datetime.now(UTC))
    later_same.exchange_sequence = 7
    changed = snapshot_from_market(_market(yes_bid_dollars="0.4300"), datetime.now(UTC))
    other_market = snapshot_from_market(_market(ticker="KXT-2", yes_bid_dollars="0.42"), RECEIVED)

    assert deduper.admit(first)
    assert not deduper.admit(later_same)
    assert deduper.admit(other_market)
    assert deduper.admit(changed)
    back = snapshot_from_market(_market(yes_bid_dollars="0.42"), datetime.now(UTC))
    assert deduper.admit(back)  # back to the earlier book: a change relative to the last one


def test_deduper_keeps_one_snapshot_per_market_and_exchange_instant() -> None:
    """A REST read of a quiet market shows the instant the socket showed (24 h volume and
    liquidity as REST has them): not a second snapshot of that instant, nor an older one."""
    deduper = SnapshotDeduper()
    live = snapshot_from_market(_market(yes_bid_dollars="0.42"), RECEIVED)
    rest_same_instant = snapshot_from_market(
        _market(yes_bid_dollars="0.42", volume_24h_fp="12.00"), RECEIVED
    )
    older = snapshot_from_market(_market(yes_bid_dollars="0.41"), RECEIVED)
    older.exchange_time.FromDatetime(RECEIVED - timedelta(seconds=1))
    assert deduper.admit(live)
    assert not deduper.admit(rest_same_instant)
    assert not deduper.admit(older)
    deduper.shown("KXT-9", 5_000_000)  # the server holds an instant of another market
    stored_instant = snapshot_from_market(_market(ticker="KXT-9"), RECEIVED)
    stored_instant.exchange_time.FromMicroseconds(5_000_000)
    assert not deduper.admit(stored_instant)


def test_kalshis_empty_side_placeholders_become_absent_prices() -> None:
    snapshot = snapshot_from_market(
        _market(
            yes_bid_dollars="0.0000",
            yes_ask_dollars="1.0000",
            no_bid_dollars="0.0000",
            no_ask_dollars="1.0000",
        ),
        RECEIVED,
    )
    for name in ("yes_bid", "yes_ask", "no_bid", "no_ask"):
        assert not snapshot.HasField(name), name


def test_rest_snapshot_exchange_time_is_updated_time_when_given() -> None:
    snapshot = snapshot_from_market(_market(updated_time="2026-11-25T11:59:00Z"), RECEIVED)
    assert snapshot.exchange_time.ToDatetime(tzinfo=UTC) == datetime(
        2026, 11, 25, 11, 59, tzinfo=UTC
    )
    assert snapshot.receive_time.ToDatetime(tzinfo=UTC) == RECEIVED
