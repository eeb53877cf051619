"""The candle definition (docs/CANDLES.md) on hand-made rows: the aggregation alone, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kfeed_server.candles import BookAggregator, CandleGrid, TradeAggregator, rounded_mean
from kfeed_server.records import BookPoint, PriceOhlc, TradePoint

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)  # a multiple of 60 s since the epoch
GRID = CandleGrid(T0, timedelta(seconds=60), 3)


def _s(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_book_state_in_force_at_the_start_same_instant_and_missing_levels() -> None:
    opening = BookPoint(_s(-10), 1, 4_000, 4_100, 500)  # in force at T0: candle 0's open
    book = BookAggregator(GRID, opening)
    book.add(
        [
            BookPoint(_s(30), 2, 4_100, 4_150, 510),
            # Exactly at candle 1's start: its open, not part of candle 0. Of two at one
            # instant only the last was ever in force.
            BookPoint(_s(60), 3, 4_500, 4_600, 520),
            BookPoint(_s(60), 4, 4_600, None, 530),
        ]
    )
    book.add([BookPoint(_s(70), 5, None, 4_700, None), BookPoint(_s(80), 6, 4_400, 4_650, 540)])
    candle_0, candle_1, candle_2 = book.finish()
    assert candle_0.yes_bid == PriceOhlc(4_000, 4_100, 4_000, 4_100)
    assert candle_0.yes_ask == PriceOhlc(4_100, 4_150, 4_100, 4_150)
    assert candle_0.open_interest == 510
    assert candle_1.yes_bid == PriceOhlc(4_600, 4_600, 4_400, 4_400)  # 4,500 never counted
    assert candle_1.yes_ask == PriceOhlc(4_700, 4_700, 4_650, 4_650)  # no ask at the open
    assert candle_1.open_interest == 540
    assert candle_2.yes_bid == PriceOhlc(4_400, 4_400, 4_400, 4_400)  # no snapshot: held
    assert candle_2.open_interest == 540


def test_no_state_yet_means_no_book() -> None:
    book = BookAggregator(GRID, None)
    book.add([BookPoint(_s(125), 1, 4_200, None, None)])
    candle_0, candle_1, candle_2 = book.finish()
    assert candle_0.yes_bid is None
    assert candle_1.yes_bid is None
    assert candle_2.yes_bid == PriceOhlc(4_200, 4_200, 4_200, 4_200)
    assert candle_2.yes_ask is None
    assert candle_2.open_interest is None


def test_trades_half_open_and_the_mean_rounds_half_up() -> None:
    trades = TradeAggregator(GRID)
    trades.add(
        [
            TradePoint(_s(59.999999), "a", 4_100, 100),  # the last instant of candle 0
            TradePoint(_s(60), "b", 4_300, 100),  # exactly at candle 1's start
            TradePoint(_s(61), "c", 4_201, 100),
        ]
    )
    candle_0, candle_1, candle_2 = trades.finish()
    assert candle_0.price == PriceOhlc(4_100, 4_100, 4_100, 4_100)
    assert candle_1.price == PriceOhlc(4_300, 4_300, 4_201, 4_201)
    assert candle_1.mean_price == 4_251  # (4,300 + 4,201) / 2 = 4,250.5, half up
    assert (candle_1.volume, candle_1.trade_count) == (200, 2)
    assert candle_2.price is None
    assert candle_2.mean_price is None
    assert (candle_2.volume, candle_2.trade_count) == (0, 0)


def test_rounded_mean() -> None:
    assert rounded_mean(7, 2) == 4  # 3.5 → 4
    assert rounded_mean(5, 2) == 3  # 2.5 → 3 (half up, not to even)
    assert rounded_mean(4_225_75, 100) == 4_226
    assert rounded_mean(10, 3) == 3
