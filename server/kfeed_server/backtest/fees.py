"""Kalshi's taker fee, in exact integer arithmetic.

The fee of a fill of C contracts at P dollars is ``rate × C × P × (1 − P)`` rounded *up*, either to
the cent (Kalshi's older, conservative rule; the default) or to $0.0001 (today's rule before the
per-order refund of overpaid rounding, which a backtest does not model).

Units: the rate in 1/10,000 (700 = 0.07), the count in 1/100 contract, the price in 1/10,000 USD and
the fee in 1/10,000 USD. So

    fee = rate/10^4 × count/10^2 × price/10^4 × (10^4 − price)/10^4   dollars
        = rate × count × price × (10^4 − price) / 10^10               1/10,000 USD

and rounding up to a unit of ``u`` (1 or 100) of 1/10,000 USD is
``ceil(numerator / (10^10 × u)) × u``.
"""

from __future__ import annotations

import enum

PRICE_SCALE = 10_000
"""1/10,000 USD per dollar: a contract pays PRICE_SCALE when it wins."""
COUNT_SCALE = 100
"""1/100 contract per contract."""
KALSHI_TAKER_FEE_RATE = 700
"""Kalshi's taker fee coefficient 0.07, in 1/10,000."""

# 10^10 (see the module docstring): the fee numerator's scale over 1/10,000 USD.
_FEE_DENOMINATOR = PRICE_SCALE * COUNT_SCALE * PRICE_SCALE


class FeeRounding(enum.IntEnum):
    """How each fill's fee is rounded up; values equal the proto ``FeeRounding`` numbers.
    UNSPECIFIED means CENT."""

    UNSPECIFIED = 0
    CENT = 1
    TEN_THOUSANDTH = 2

    @property
    def unit(self) -> int:
        """The rounding unit in 1/10,000 USD."""
        return 1 if self is FeeRounding.TEN_THOUSANDTH else 100


def taker_fee(
    count: int,
    price: int,
    rate: int = KALSHI_TAKER_FEE_RATE,
    rounding: FeeRounding = FeeRounding.CENT,
) -> int:
    """The taker fee, in 1/10,000 USD, of a fill of ``count`` (1/100 contract) at ``price``
    (1/10,000 USD, 0..10,000) with the coefficient ``rate`` (1/10,000). Never negative."""
    if count < 0 or not 0 <= price <= PRICE_SCALE or rate < 0:
        raise ValueError(f"bad fee inputs: count={count} price={price} rate={rate}")
    unit = rounding.unit
    numerator = rate * count * price * (PRICE_SCALE - price)
    # Ceiling division of non-negative integers, exact.
    return -(-numerator // (_FEE_DENOMINATOR * unit)) * unit
