"""Kalshi's trading fees, in exact integer arithmetic, as a versioned schedule.

The fee of a fill of C contracts at P dollars is ``rate × m × C × P × (1 − P)`` rounded *up*,
either to the cent (Kalshi's older, conservative rule; the default) or to $0.0001 (today's rule
before the per-order refund of overpaid rounding, which a backtest does not model). ``rate`` is
0.07 for takers and 0.0175 for makers; ``m`` is the series' ``fee_multiplier`` (an event's
``fee_multiplier_override`` wins). Makers pay only in series whose ``fee_type`` is
``quadratic_with_maker_fees``. A ``flat`` series is charged as if every fill were at P = 0.50
(the quadratic's maximum): Kalshi publishes no formula for it, so the model takes the most it
could be. An unknown or empty ``fee_type`` is ``quadratic``.

Units: the rate in 1/10,000 (700 = 0.07), the count in 1/100 contract, the price in 1/10,000 USD and
the fee in 1/10,000 USD. So

    fee = rate/10^4 × count/10^2 × price/10^4 × (10^4 − price)/10^4   dollars
        = rate × count × price × (10^4 − price) / 10^10               1/10,000 USD

and rounding up to a unit of ``u`` (1 or 100) of 1/10,000 USD is
``ceil(numerator / (10^10 × u)) × u``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kfeed_server.records import SeriesRecord
from kfeed_server.records.backtest import KALSHI_MAKER_FEE_RATE, KALSHI_TAKER_FEE_RATE, FeeRounding

# The rules' version is ``records.backtest.FEE_SCHEDULE_VERSION``: change it with them.
PRICE_SCALE = 10_000
"""1/10,000 USD per dollar: a contract pays PRICE_SCALE when it wins."""
COUNT_SCALE = 100
"""1/100 contract per contract."""
MULTIPLIER_SCALE = 10_000
"""1/10,000 per unit of fee multiplier: 10,000 is a multiplier of 1.0."""

# 10^10 (see the module docstring): the fee numerator's scale over 1/10,000 USD.
_FEE_DENOMINATOR = PRICE_SCALE * COUNT_SCALE * PRICE_SCALE


class FeeType(enum.StrEnum):
    """A series' ``fee_type`` as Kalshi spells it."""

    QUADRATIC = "quadratic"
    QUADRATIC_WITH_MAKER_FEES = "quadratic_with_maker_fees"
    FLAT = "flat"

    @classmethod
    def parse(cls, text: str) -> FeeType:
        """``text`` as a fee type; unknown or empty text is QUADRATIC."""
        try:
            return cls(text.strip().lower())
        except ValueError:
            return cls.QUADRATIC


@dataclass(frozen=True, slots=True)
class MarketFees:
    """The fee terms of one market: its series' fee type and multiplier (1/10,000), after any
    event override."""

    fee_type: FeeType = FeeType.QUADRATIC
    multiplier: int = MULTIPLIER_SCALE

    @property
    def charges_makers(self) -> bool:
        """Whether maker fills pay a fee."""
        return self.fee_type is FeeType.QUADRATIC_WITH_MAKER_FEES


DEFAULT_MARKET_FEES = MarketFees()
"""A market without known series terms: quadratic, multiplier 1."""


def market_fees(
    series: SeriesRecord | None,
    fee_type_override: str = "",
    multiplier_override: int | None = None,
) -> MarketFees:
    """A market's fee terms from its series and its event's overrides (either may be absent)."""
    fee_type = fee_type_override or (series.fee_type if series is not None else "")
    multiplier = (
        multiplier_override
        if multiplier_override is not None
        else series.fee_multiplier_ten_thousandths
        if series is not None
        else MULTIPLIER_SCALE
    )
    return MarketFees(FeeType.parse(fee_type), multiplier)


@dataclass(frozen=True, slots=True)
class FeeModel:
    """A run's fee rules: the base taker and maker rates (1/10,000) and the rounding."""

    taker_rate: int = KALSHI_TAKER_FEE_RATE
    maker_rate: int = KALSHI_MAKER_FEE_RATE
    rounding: FeeRounding = FeeRounding.CENT

    def fee(self, terms: MarketFees, count: int, price: int, *, maker: bool = False) -> int:
        """The fee, in 1/10,000 USD, of a fill of ``count`` (1/100 contract) at ``price``
        (1/10,000 USD) in a market with ``terms``; a maker fill when ``maker``."""
        return self.fee_of(terms, count * price * (PRICE_SCALE - price), count, maker=maker)

    def fee_of(self, terms: MarketFees, numerator: int, count: int, *, maker: bool) -> int:
        """The fee of one order's fill over several price levels: ``numerator`` is
        Σ count × price × (10,000 − price) over the levels, ``count`` their total; the fee is
        rounded once for the whole fill."""
        if maker and not terms.charges_makers:
            return 0
        rate = self.maker_rate if maker else self.taker_rate
        if terms.fee_type is FeeType.FLAT:
            # Kalshi publishes no formula for flat series: charged at P = 0.50, the most.
            numerator = count * 5_000 * 5_000
        unit = self.rounding.unit
        total = rate * terms.multiplier * numerator
        return -(-total // (_FEE_DENOMINATOR * MULTIPLIER_SCALE * unit)) * unit


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
