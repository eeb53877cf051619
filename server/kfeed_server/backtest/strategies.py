"""The built-in strategies. Each trades every market it sees independently and keeps at most one
open position per market: four with taker orders of a fixed size, and a market maker
(``spread_maker``) with resting limit orders."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence

from kfeed_server.backtest.fees import PRICE_SCALE
from kfeed_server.backtest.orders import Cancel, Fill, Instruction
from kfeed_server.backtest.params import ConfigError, Parameters, ParameterSpec, ParameterType
from kfeed_server.backtest.strategy import (
    MarketView,
    Order,
    PortfolioView,
    Strategy,
    register_strategy,
)
from kfeed_server.records import OrderAction, Side, SnapshotRecord
from kfeed_server.records.backtest import ParamValue

_NO_ORDERS: tuple[Order, ...] = ()
# Enum members as module constants: attribute access on an Enum class is slow in Python 3.11, and
# on_snapshot runs for every snapshot.
_YES, _NO = Side.YES, Side.NO
_BUY, _SELL = OrderAction.BUY, OrderAction.SELL

COUNT_PARAMETER = ParameterSpec(
    "count",
    ParameterType.INTEGER,
    "Contracts per order, in 1/100 contract (100 = one contract).",
    default=100,
    minimum=1,
)


def _mid_doubled(snapshot: SnapshotRecord) -> int | None:
    """yes_bid + yes_ask (twice the YES mid, kept integral), None without both sides."""
    bid, ask = snapshot.yes_bid, snapshot.yes_ask
    if bid is None or ask is None:
        return None
    return bid + ask


def _require_below(values: Mapping[str, ParamValue], low: str, high: str) -> None:
    low_value, high_value = values[low], values[high]
    assert isinstance(low_value, int | float)
    assert isinstance(high_value, int | float)
    if not low_value < high_value:
        raise ConfigError(f"parameters.{high}", f"must be above {low} ({low_value!r})")


def _exit(ticker: str, side: Side, held: int) -> tuple[Order, ...]:
    return (Order(ticker, side, _SELL, held),)


@register_strategy
class ThresholdStrategy(Strategy):
    """Buys YES when the YES ask is at or below ``buy_below``; sells the whole position when the
    YES bid is at or above ``sell_above``."""

    name = "threshold"
    description = (
        "Buy YES at or below one price (the YES ask <= buy_below), sell at or above another "
        "(the YES bid >= sell_above); one position per market."
    )
    parameters = (
        ParameterSpec(
            "buy_below",
            ParameterType.DOLLARS,
            "Buy YES when the YES ask is at or below this price.",
            default=4_000,
            minimum=0,
            maximum=PRICE_SCALE,
        ),
        ParameterSpec(
            "sell_above",
            ParameterType.DOLLARS,
            "Sell the YES position when the YES bid is at or above this price.",
            default=6_000,
            minimum=0,
            maximum=PRICE_SCALE,
        ),
        COUNT_PARAMETER,
    )

    def __init__(self, params: Parameters) -> None:
        super().__init__(params)
        self.buy_below = params.dollars("buy_below")
        self.sell_above = params.dollars("sell_above")
        self.count = params.integer("count")

    @classmethod
    def check_parameters(cls, values: Mapping[str, ParamValue]) -> None:
        """``buy_below`` must be below ``sell_above``, or the rule would churn."""
        _require_below(values, "buy_below", "sell_above")

    def on_snapshot(
        self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Order]:
        """See the class docstring."""
        ticker = snapshot.ticker
        held = portfolio.position(ticker, _YES)
        if held:
            bid = snapshot.yes_bid
            if bid is not None and bid >= self.sell_above:
                return _exit(ticker, _YES, held)
        else:
            ask = snapshot.yes_ask
            if ask is not None and ask <= self.buy_below:
                return (Order(ticker, _YES, _BUY, self.count),)
        return _NO_ORDERS


@register_strategy
class MeanReversionStrategy(Strategy):
    """Bets that the YES mid returns to its rolling mean.

    z = (mid − mean) / standard deviation over the market's last ``window`` mids (population
    deviation, the current mid included; snapshots without both YES quotes are skipped). Flat: buy
    YES when z <= −entry_z, buy NO when z >= entry_z. Long YES: sell when z >= −exit_z. Long NO:
    sell when z <= exit_z. No signal until the window is full or while the deviation is 0.
    """

    name = "mean_reversion"
    description = "Trade the rolling z-score of the YES mid back towards its mean."
    parameters = (
        ParameterSpec(
            "window",
            ParameterType.INTEGER,
            "Snapshots in the rolling window, per market.",
            default=20,
            minimum=2,
            maximum=100_000,
        ),
        ParameterSpec(
            "entry_z",
            ParameterType.NUMBER,
            "Enter when |z| reaches this.",
            default=2.0,
            minimum=0.0,
        ),
        ParameterSpec(
            "exit_z",
            ParameterType.NUMBER,
            "Exit once z is back within this of the mean.",
            default=0.0,
            minimum=0.0,
        ),
        COUNT_PARAMETER,
    )

    def __init__(self, params: Parameters) -> None:
        super().__init__(params)
        self.window = params.integer("window")
        self.entry_z = params.number("entry_z")
        self.exit_z = params.number("exit_z")
        self.count = params.integer("count")
        # Per market: the window's doubled mids and their running sum and sum of squares (exact
        # integers, so the statistics do not drift).
        self._mids: dict[str, deque[int]] = {}
        self._sums: dict[str, list[int]] = {}

    @classmethod
    def check_parameters(cls, values: Mapping[str, ParamValue]) -> None:
        """``exit_z`` must be below ``entry_z``, or a new position would exit at once."""
        _require_below(values, "exit_z", "entry_z")

    def z_score(self, snapshot: SnapshotRecord) -> float | None:
        """Adds the snapshot's mid to its market's window; the z-score once the window is full."""
        mid = _mid_doubled(snapshot)
        if mid is None:
            return None
        ticker = snapshot.ticker
        mids = self._mids.get(ticker)
        if mids is None:
            mids = self._mids[ticker] = deque()
            self._sums[ticker] = [0, 0]
        sums = self._sums[ticker]
        mids.append(mid)
        sums[0] += mid
        sums[1] += mid * mid
        if len(mids) > self.window:
            gone = mids.popleft()
            sums[0] -= gone
            sums[1] -= gone * gone
        n = len(mids)
        if n < self.window:
            return None
        # n² × variance = n × Σx² − (Σx)², exact in integers.
        scaled_variance = n * sums[1] - sums[0] * sums[0]
        if scaled_variance <= 0:
            return None
        return (n * mid - sums[0]) / math.sqrt(scaled_variance)

    def on_snapshot(
        self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Order]:
        """See the class docstring."""
        z = self.z_score(snapshot)
        if z is None:
            return _NO_ORDERS
        ticker = snapshot.ticker
        long_yes = portfolio.position(ticker, _YES)
        if long_yes:
            return _exit(ticker, _YES, long_yes) if z >= -self.exit_z else _NO_ORDERS
        long_no = portfolio.position(ticker, _NO)
        if long_no:
            return _exit(ticker, _NO, long_no) if z <= self.exit_z else _NO_ORDERS
        if z <= -self.entry_z:
            return (Order(ticker, _YES, _BUY, self.count),)
        if z >= self.entry_z:
            return (Order(ticker, _NO, _BUY, self.count),)
        return _NO_ORDERS


@register_strategy
class MomentumStrategy(Strategy):
    """Follows the move of the YES mid over the market's last ``lookback`` mids.

    change = mid now − mid ``lookback`` mids ago. Flat: buy YES when change >= threshold, buy NO
    when change <= −threshold. Long YES: sell when change < 0. Long NO: sell when change > 0.
    """

    name = "momentum"
    description = "Buy the side the YES mid is moving towards; exit when the move reverses."
    parameters = (
        ParameterSpec(
            "lookback",
            ParameterType.INTEGER,
            "Mids back to measure the move against, per market.",
            default=10,
            minimum=1,
            maximum=100_000,
        ),
        ParameterSpec(
            "threshold",
            ParameterType.DOLLARS,
            "Smallest move of the mid that opens a position.",
            default=200,
            minimum=1,
            maximum=PRICE_SCALE,
        ),
        COUNT_PARAMETER,
    )

    def __init__(self, params: Parameters) -> None:
        super().__init__(params)
        self.lookback = params.integer("lookback")
        # Compared with doubled mids.
        self._threshold_doubled = 2 * params.dollars("threshold")
        self.count = params.integer("count")
        self._mids: dict[str, deque[int]] = {}

    def on_snapshot(
        self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Order]:
        """See the class docstring."""
        mid = _mid_doubled(snapshot)
        if mid is None:
            return _NO_ORDERS
        ticker = snapshot.ticker
        mids = self._mids.get(ticker)
        if mids is None:
            mids = self._mids[ticker] = deque(maxlen=self.lookback + 1)
        mids.append(mid)
        if len(mids) <= self.lookback:
            return _NO_ORDERS
        change = mid - mids[0]
        long_yes = portfolio.position(ticker, _YES)
        if long_yes:
            return _exit(ticker, _YES, long_yes) if change < 0 else _NO_ORDERS
        long_no = portfolio.position(ticker, _NO)
        if long_no:
            return _exit(ticker, _NO, long_no) if change > 0 else _NO_ORDERS
        if change >= self._threshold_doubled:
            return (Order(ticker, _YES, _BUY, self.count),)
        if change <= -self._threshold_doubled:
            return (Order(ticker, _NO, _BUY, self.count),)
        return _NO_ORDERS


@register_strategy
class FavouriteStrategy(Strategy):
    """Buys the favourite and holds it to settlement.

    While flat in a market, buys YES when the YES ask is within [min_price, max_price], else NO
    when the NO ask is; never sells. It states the price paid as its forecast (the YES
    probability: the ask for YES, one minus the NO ask for NO), so the Brier score measures how
    well the market's favourites were priced.
    """

    name = "favourite_hold"
    description = "Buy the side priced as the favourite and hold it to settlement."
    parameters = (
        ParameterSpec(
            "min_price",
            ParameterType.DOLLARS,
            "Lowest ask that counts as a favourite.",
            default=8_000,
            minimum=1,
            maximum=PRICE_SCALE,
        ),
        ParameterSpec(
            "max_price",
            ParameterType.DOLLARS,
            "Highest ask worth paying (above it the upside is too small).",
            default=9_500,
            minimum=1,
            maximum=PRICE_SCALE,
        ),
        COUNT_PARAMETER,
    )

    def __init__(self, params: Parameters) -> None:
        super().__init__(params)
        self.min_price = params.dollars("min_price")
        self.max_price = params.dollars("max_price")
        self.count = params.integer("count")

    @classmethod
    def check_parameters(cls, values: Mapping[str, ParamValue]) -> None:
        """``min_price`` must be below ``max_price``."""
        _require_below(values, "min_price", "max_price")

    def on_snapshot(
        self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Order]:
        """See the class docstring."""
        ticker = snapshot.ticker
        if portfolio.position(ticker, _YES) or portfolio.position(ticker, _NO):
            return _NO_ORDERS
        low, high = self.min_price, self.max_price
        yes_ask, no_ask = snapshot.yes_ask, snapshot.no_ask
        if yes_ask is not None and low <= yes_ask <= high:
            probability = yes_ask / PRICE_SCALE
            return (Order(ticker, _YES, _BUY, self.count, probability),)
        if no_ask is not None and low <= no_ask <= high:
            probability = 1.0 - no_ask / PRICE_SCALE
            return (Order(ticker, _NO, _BUY, self.count, probability),)
        return _NO_ORDERS


@register_strategy
class SpreadMakerStrategy(Strategy):
    """Captures the spread with resting limit orders: joins the YES bid while the spread is at
    least ``min_spread`` and inventory is under ``max_inventory``, and offers what it holds at the
    YES ask; quotes move (cancel, then place again) when the touch moves."""

    name = "spread_maker"
    description = (
        "Market maker: rest a YES bid at the bid while the spread is at least min_spread, offer "
        "the inventory at the ask; fills by the queue model as a maker."
    )
    parameters = (
        ParameterSpec(
            "min_spread",
            ParameterType.DOLLARS,
            "Quote only while the YES ask minus the YES bid is at least this.",
            default=200,
            minimum=1,
            maximum=PRICE_SCALE,
        ),
        ParameterSpec(
            "max_inventory",
            ParameterType.INTEGER,
            "Largest YES position to build, in 1/100 contract.",
            default=500,
            minimum=1,
        ),
        COUNT_PARAMETER,
    )

    _BID, _ASK = 1, 2  # client order ids of the two quotes

    def __init__(self, params: Parameters) -> None:
        super().__init__(params)
        self.min_spread = params.dollars("min_spread")
        self.max_inventory = params.integer("max_inventory")
        self.count = params.integer("count")
        self.quoted: dict[str, tuple[int | None, int | None]] = {}

    def on_snapshot(
        self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        """See the class docstring."""
        ticker = snapshot.ticker
        bid, ask = snapshot.yes_bid, snapshot.yes_ask
        held = portfolio.position(ticker, _YES)
        wide = bid is not None and ask is not None and ask - bid >= self.min_spread
        want_bid = bid if wide and held < self.max_inventory else None
        want_ask = ask if held and ask is not None else None
        if self.quoted.get(ticker) == (want_bid, want_ask):
            return _NO_ORDERS
        self.quoted[ticker] = (want_bid, want_ask)
        instructions: list[Instruction] = [Cancel(ticker)]
        if want_bid is not None:
            size = min(self.count, self.max_inventory - held)
            instructions.append(
                Order(ticker, _YES, _BUY, size, limit_price=want_bid, client_order_id=self._BID)
            )
        if want_ask is not None:
            instructions.append(
                Order(ticker, _YES, _SELL, held, limit_price=want_ask, client_order_id=self._ASK)
            )
        return instructions

    def on_fill(
        self, fill: Fill, market: MarketView, portfolio: PortfolioView
    ) -> Sequence[Instruction]:
        # The inventory changed: quote again at the next snapshot.
        self.quoted.pop(fill.ticker, None)
        return _NO_ORDERS
