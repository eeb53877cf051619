"""Kalshi taker fee: hand-computed values, both roundings, and never negative."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kfeed_server.backtest import EngineConfig, FeeRounding, taker_fee, validate_config
from kfeed_server.backtest.fees import FeeModel, FeeType, MarketFees, market_fees
from kfeed_server.records import SeriesRecord
from kfeed_server.records.backtest import FEE_SCHEDULE_VERSION


@pytest.mark.parametrize(
    ("count", "price", "cent", "ten_thousandth"),
    [
        # 1 contract at $0.50: 0.07 × 1 × 0.5 × 0.5 = $0.0175 → $0.02 / $0.0175.
        (100, 5_000, 200, 175),
        # 10 contracts at $0.50: $0.175 → $0.18 / $0.1750.
        (1_000, 5_000, 1_800, 1_750),
        # 100 contracts at $0.30: 0.07 × 100 × 0.3 × 0.7 = $1.47 exactly, no rounding either way.
        (10_000, 3_000, 14_700, 14_700),
        # 1 contract at $0.01: 0.07 × 0.01 × 0.99 = $0.000693 → $0.01 / $0.0007.
        (100, 100, 100, 7),
        # Sub-penny price $0.0050: 0.07 × 0.005 × 0.995 = $0.00034825 → $0.01 / $0.0004.
        (100, 50, 100, 4),
        # Sub-penny price $0.9950 is symmetric with $0.0050.
        (100, 9_950, 100, 4),
        # Half a contract at $0.50: 0.07 × 0.5 × 0.25 = $0.00875 → $0.01 / $0.0088.
        (50, 5_000, 100, 88),
        # 3 contracts at $0.37: 0.07 × 3 × 0.37 × 0.63 = $0.048951 → $0.05 / $0.0490.
        (300, 3_700, 500, 490),
        # Prices of 0 and 1 carry no fee.
        (100, 0, 0, 0),
        (100, 10_000, 0, 0),
    ],
)
def test_fee_matches_hand_computed_value(
    count: int, price: int, cent: int, ten_thousandth: int
) -> None:
    assert taker_fee(count, price, 700, FeeRounding.CENT) == cent
    assert taker_fee(count, price, 700, FeeRounding.TEN_THOUSANDTH) == ten_thousandth


def test_fee_is_largest_at_half() -> None:
    fees = [taker_fee(10_000, price, 700, FeeRounding.TEN_THOUSANDTH) for price in range(10_001)]
    assert max(fees) == fees[5_000] == 17_500  # 0.07 × 100 × 0.25 = $1.75


def test_custom_rate() -> None:
    # Maker-style rate 0.0175 on 1 contract at $0.50: $0.004375 → $0.01 / $0.0044.
    assert taker_fee(100, 5_000, 175, FeeRounding.CENT) == 100
    assert taker_fee(100, 5_000, 175, FeeRounding.TEN_THOUSANDTH) == 44


@given(
    count=st.integers(0, 10**9),
    price=st.integers(0, 10_000),
    rate=st.integers(0, 10_000),
    rounding=st.sampled_from([FeeRounding.CENT, FeeRounding.TEN_THOUSANDTH]),
)
def test_fee_is_never_negative_and_rounds_up(
    count: int, price: int, rate: int, rounding: FeeRounding
) -> None:
    fee = taker_fee(count, price, rate, rounding)
    exact_times_10_10 = rate * count * price * (10_000 - price)
    assert fee >= 0
    assert fee % rounding.unit == 0
    # fee is the smallest multiple of the unit at or above the exact fee.
    assert fee * 10**10 >= exact_times_10_10
    assert (fee - rounding.unit) * 10**10 < exact_times_10_10 or fee == 0


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="bad fee inputs"):
        taker_fee(100, 10_001)


# --- the fee schedule: series fee types, multipliers, event overrides, maker fees -------------


@pytest.mark.parametrize(
    ("terms", "count", "price", "maker", "cent", "ten_thousandth"),
    [
        # Quadratic × 1, taker, 10 @ $0.50: 0.07 × 10 × 0.25 = $0.175 → $0.18 / $0.1750.
        (MarketFees(FeeType.QUADRATIC, 10_000), 1_000, 5_000, False, 1_800, 1_750),
        # Multiplier 0.5: 0.07 × 0.5 × 10 × 0.25 = $0.0875 → $0.09 / $0.0875.
        (MarketFees(FeeType.QUADRATIC, 5_000), 1_000, 5_000, False, 900, 875),
        # Makers pay nothing in a quadratic series.
        (MarketFees(FeeType.QUADRATIC, 10_000), 1_000, 5_000, True, 0, 0),
        # Maker in a series with maker fees: 0.0175 × 10 × 0.25 = $0.04375 → $0.05 / $0.0438.
        (MarketFees(FeeType.QUADRATIC_WITH_MAKER_FEES, 10_000), 1_000, 5_000, True, 500, 438),
        # Its takers pay the usual 0.07 × 3 × 0.37 × 0.63 = $0.048951 → $0.05 / $0.0490.
        (MarketFees(FeeType.QUADRATIC_WITH_MAKER_FEES, 10_000), 300, 3_700, False, 500, 490),
        # Flat: charged at P = 0.50 whatever the price: 10 @ $0.10 pays like 10 @ $0.50.
        (MarketFees(FeeType.FLAT, 10_000), 1_000, 1_000, False, 1_800, 1_750),
        # Multiplier 2, 1 @ $0.30: 0.07 × 2 × 0.3 × 0.7 = $0.0294 → $0.03 / $0.0294.
        (MarketFees(FeeType.QUADRATIC, 20_000), 100, 3_000, False, 300, 294),
    ],
)
def test_fee_schedule_matches_hand_computed_values(
    terms: MarketFees, count: int, price: int, maker: bool, cent: int, ten_thousandth: int
) -> None:
    assert FeeModel(rounding=FeeRounding.CENT).fee(terms, count, price, maker=maker) == cent
    tenth = FeeModel(rounding=FeeRounding.TEN_THOUSANDTH)
    assert tenth.fee(terms, count, price, maker=maker) == ten_thousandth


def test_a_series_gives_its_terms_and_an_event_override_wins() -> None:
    series = SeriesRecord(
        "KXS", fee_type="quadratic_with_maker_fees", fee_multiplier_ten_thousandths=5_000
    )
    assert market_fees(series) == MarketFees(FeeType.QUADRATIC_WITH_MAKER_FEES, 5_000)
    assert market_fees(series, "flat", 20_000) == MarketFees(FeeType.FLAT, 20_000)
    assert market_fees(series, "", 15_000) == MarketFees(FeeType.QUADRATIC_WITH_MAKER_FEES, 15_000)
    # No series known, or a fee type this schedule does not know: quadratic × 1.
    assert market_fees(None) == MarketFees(FeeType.QUADRATIC, 10_000)
    assert market_fees(SeriesRecord("KXT", fee_type="surcharge")).fee_type is FeeType.QUADRATIC


def test_the_run_records_the_fee_schedule_version() -> None:
    config = validate_config(EngineConfig("threshold", ("A",)))
    assert config.fee_schedule_version == FEE_SCHEDULE_VERSION
