"""Fixed-point wire values ↔ Decimal: exact both ways, refusing what does not fit."""

from __future__ import annotations

from decimal import Decimal

import pytest

from kfeed.v1 import types_pb2
from kfeed_client import (
    contracts_to_decimal,
    decimal_to_contracts,
    decimal_to_dollars,
    dollars_to_decimal,
)


@pytest.mark.parametrize(
    ("units", "amount"),
    [(0, "0.0000"), (1, "0.0001"), (4_321, "0.4321"), (10_000, "1.0000"), (-2_500, "-0.2500")],
)
def test_dollars_round_trip_exactly(units: int, amount: str) -> None:
    assert dollars_to_decimal(types_pb2.Dollars(ten_thousandths=units)) == Decimal(amount)
    assert str(dollars_to_decimal(types_pb2.Dollars(ten_thousandths=units))) == amount
    assert decimal_to_dollars(Decimal(amount)).ten_thousandths == units


def test_contracts_round_trip_exactly() -> None:
    assert str(contracts_to_decimal(types_pb2.Contracts(hundredths=1_250))) == "12.50"
    assert decimal_to_contracts("12.5").hundredths == 1_250
    assert decimal_to_contracts(3).hundredths == 300


@pytest.mark.parametrize("too_fine", ["0.00001", "0.12345"])
def test_dollar_amounts_finer_than_the_wire_are_refused(too_fine: str) -> None:
    with pytest.raises(ValueError, match="finer than 1/10000"):
        decimal_to_dollars(too_fine)


def test_non_finite_and_too_fine_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        decimal_to_dollars(Decimal("NaN"))
    with pytest.raises(ValueError, match="finer than 1/100"):
        decimal_to_contracts("0.001")
