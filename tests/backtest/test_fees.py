"""Kalshi taker fee: hand-computed values, both roundings, and never negative."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kfeed_server.backtest import FeeRounding, taker_fee


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
