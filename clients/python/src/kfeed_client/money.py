"""Exact conversions between kfeed's fixed-point wire types and :class:`decimal.Decimal`.

Prices travel as integer ten-thousandths of a dollar (:class:`Dollars`) and contract counts as
integer hundredths of a contract (:class:`Contracts`), never as floats. These helpers convert
both ways without rounding: a value that does not fit the scale raises instead of being rounded.
"""

from __future__ import annotations

from decimal import Decimal

from kfeed.v1 import types_pb2

DOLLAR_SCALE = 10_000
"""Wire units per dollar: prices are integer ten-thousandths of a dollar."""
CONTRACT_SCALE = 100
"""Wire units per contract: counts are integer hundredths of a contract."""

_DOLLAR_QUANTUM = Decimal(1) / DOLLAR_SCALE
_CONTRACT_QUANTUM = Decimal(1) / CONTRACT_SCALE


def _to_units(value: Decimal | int | str, scale: int, what: str) -> int:
    amount = Decimal(value)
    if not amount.is_finite():
        raise ValueError(f"{what} must be finite, got {value!r}")
    units = amount * scale
    if units != units.to_integral_value():
        raise ValueError(f"{what} {value!r} is finer than 1/{scale}")
    return int(units)


def dollars_to_decimal(value: types_pb2.Dollars) -> Decimal:
    """The exact dollar amount of a :class:`Dollars` message, e.g. ``Decimal('0.4321')``."""
    return (Decimal(value.ten_thousandths) * _DOLLAR_QUANTUM).quantize(_DOLLAR_QUANTUM)


def decimal_to_dollars(value: Decimal | int | str) -> types_pb2.Dollars:
    """A :class:`Dollars` message for an amount with at most four decimals (else ValueError).

    Floats are refused by type on purpose: ``0.1`` as a float is not 1/10.
    """
    return types_pb2.Dollars(ten_thousandths=_to_units(value, DOLLAR_SCALE, "dollar amount"))


def contracts_to_decimal(value: types_pb2.Contracts) -> Decimal:
    """The exact number of contracts of a :class:`Contracts` message, e.g. ``Decimal('12.50')``."""
    return (Decimal(value.hundredths) * _CONTRACT_QUANTUM).quantize(_CONTRACT_QUANTUM)


def decimal_to_contracts(value: Decimal | int | str) -> types_pb2.Contracts:
    """A :class:`Contracts` message for a count with at most two decimals (else ValueError)."""
    return types_pb2.Contracts(hundredths=_to_units(value, CONTRACT_SCALE, "contract count"))
