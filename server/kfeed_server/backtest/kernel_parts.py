"""What both compiled kernels (``backtest.fast``, ``backtest.maker_kernel``) share."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def kernel_fee(count: int, price: int, rate: int, multiplier: int, flat: bool, unit: int) -> int:
    """``FeeModel.fee_of`` of one price in compiled code (both kernels): ``rate`` × multiplier
    × count × P(1 − P) (P = 0.50 in a flat series), rounded up to ``unit``."""
    spread = 5_000 * 5_000 if flat else price * (10_000 - price)
    total = rate * multiplier * count * spread
    denominator = 10_000 * 100 * 10_000 * 10_000 * unit
    return -(-total // denominator) * unit


@njit(cache=True, boundscheck=True)
def write_execution(
    ex: np.ndarray,
    row: int,
    time: int,
    market: int,
    snapshot_id: int,
    action: int,
    count: int,
    price: int,
    fee: int,
    cash: int,
    position_after: int,
    realized: int,
    yes: int,
) -> int:
    """Writes one execution (the columns ``fast._result`` reads) at ``row``; returns the next
    row."""
    for column, value in enumerate(
        (time, market, snapshot_id, action, count, price, fee, cash, position_after, realized, yes)
    ):
        ex[row, column] = value
    return row + 1
