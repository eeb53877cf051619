"""Kalshi's JSON shapes, rendered from the model.

Money is written as ``*_dollars`` strings (4 decimals) and counts as ``*_fp`` strings
(2 decimals); with ``legacy`` the removed integer fields (cents, whole contracts) are added beside
them, as Kalshi sent them before 2026-03-12.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from kfeed_sim.fixed_point import (
    COUNT_SCALE,
    count_fp,
    dollars,
    legacy_cents,
    legacy_count,
    rfc3339,
)
from kfeed_sim.market_model import (
    BookDelta,
    Event,
    Exchange,
    LifecycleEvent,
    Market,
    MarketState,
    MarketStatus,
    PriceRange,
    SeriesSpec,
    Trade,
)

JSON = dict[str, Any]


@dataclass(frozen=True)
class Renderer:
    """Renders model objects; ``legacy`` adds the pre-2026 integer fields."""

    legacy: bool

    def _prices(self, body: JSON, **prices: int | None) -> None:
        for name, value in prices.items():
            body[f"{name}_dollars"] = None if value is None else dollars(value)
            if self.legacy:
                body[name] = None if value is None else legacy_cents(value)

    def _counts(self, body: JSON, **counts: int) -> None:
        for name, value in counts.items():
            body[f"{name}_fp"] = count_fp(value)
            if self.legacy:
                body[name] = legacy_count(value)

    def series(self, spec: SeriesSpec) -> JSON:
        """``/series/{ticker}`` → ``series``."""
        return {
            "ticker": spec.ticker,
            "title": spec.title,
            "category": spec.category,
            "frequency": spec.frequency,
            "tags": list(spec.tags),
            "settlement_sources": [{"name": "Sim City Bureau", "url": "https://example.invalid"}],
            "contract_url": "",
            "contract_terms_url": "",
            "fee_type": "quadratic",
            "fee_multiplier": 1,
            "additional_prohibitions": [],
        }

    def event(self, event: Event, exchange: Exchange, nested: bool = False) -> JSON:
        """An event object; with ``nested`` its markets are inside it."""
        body: JSON = {
            "event_ticker": event.event_ticker,
            "series_ticker": event.series_ticker,
            "title": event.title,
            "sub_title": event.sub_title,
            "category": event.category,
            "mutually_exclusive": False,
            "strike_date": rfc3339(event.strike_date_us),
            "strike_period": "",
            "collateral_return_type": "",
        }
        if nested:
            body["markets"] = [self.market(exchange.markets[t]) for t in event.market_tickers]
        return body

    def market(self, market: Market) -> JSON:
        """A market object as ``/markets`` and ``/markets/{ticker}`` return it."""
        state = market.state
        body: JSON = {
            "ticker": market.ticker,
            "event_ticker": market.event_ticker,
            "market_type": "binary",
            "title": market.title,
            "subtitle": "",
            "yes_sub_title": market.yes_sub_title,
            "no_sub_title": market.no_sub_title,
            "created_time": rfc3339(market.created_us),
            "updated_time": rfc3339(state.ts_us),
            "open_time": rfc3339(market.open_us),
            "close_time": rfc3339(market.close_us),
            "expected_expiration_time": rfc3339(market.determine_us),
            "expiration_time": rfc3339(market.settle_us),
            "latest_expiration_time": rfc3339(market.settle_us),
            "settlement_timer_seconds": 0,
            "status": state.status.value,
            "result": state.result,
            "can_close_early": False,
            "fractional_trading_enabled": True,
            "tick_size": 1,
            "price_level_structure": market.price_level_structure,
            "price_ranges": [price_range(band) for band in market.price_ranges],
            "strike_type": "greater",
            "floor_strike": market.floor_strike,
            "rules_primary": f"If the outcome is {market.yes_sub_title.lower()}, "
            "the market resolves to Yes.",
            "rules_secondary": "Simulated market; no real-world outcome.",
            "response_price_units": "usd_cent",
        }
        self._prices(
            body,
            yes_bid=state.yes_bid,
            yes_ask=state.yes_ask,
            no_bid=state.no_bid,
            no_ask=state.no_ask,
            last_price=state.last_price,
            previous_yes_bid=state.previous_yes_bid,
            previous_yes_ask=state.previous_yes_ask,
            previous_price=state.previous_price,
            notional_value=10_000,
            liquidity=state.liquidity,
            settlement_value=state.settlement_value,
        )
        self._counts(
            body,
            volume=state.volume,
            volume_24h=state.volume_24h,
            open_interest=state.open_interest,
            yes_bid_size=state.yes_bid_size,
            yes_ask_size=state.yes_ask_size,
        )
        if state.status is MarketStatus.FINALIZED:
            body["settlement_ts"] = rfc3339(state.ts_us)
        return body

    def trade(self, trade: Trade) -> JSON:
        """A trade object of ``/markets/trades``."""
        body: JSON = {
            "trade_id": trade.trade_id,
            "ticker": trade.ticker,
            "taker_outcome_side": trade.taker_outcome_side,
            "taker_book_side": trade.taker_book_side,
            "is_block_trade": False,
            "created_time": rfc3339(trade.ts_us),
        }
        self._counts(body, count=trade.count)
        self._prices(body, yes_price=trade.yes_price, no_price=trade.no_price)
        if self.legacy:
            body["taker_side"] = trade.taker_outcome_side
        return body

    def orderbook(self, market: Market, depth: int | None) -> JSON:
        """``/markets/{ticker}/orderbook``: bids only, ascending by price, the best ``depth``."""
        yes_bids, no_bids = market.orderbook()
        if depth:
            yes_bids, no_bids = yes_bids[-depth:], no_bids[-depth:]
        body: JSON = {
            "orderbook_fp": {"yes_dollars": levels_fp(yes_bids), "no_dollars": levels_fp(no_bids)}
        }
        if self.legacy:
            body["orderbook"] = {"yes": legacy_levels(yes_bids), "no": legacy_levels(no_bids)}
        return body

    def candle(
        self,
        end_s: int,
        quotes: Sequence[MarketState],
        trades: Sequence[Trade],
        previous_price: int | None,
    ) -> JSON:
        """One candlestick: quotes from the states in force, prices from the trades."""
        yes_bid: JSON = {}
        yes_ask: JSON = {}
        for quote, values in (
            (yes_bid, [state.yes_bid for state in quotes]),
            (yes_ask, [state.yes_ask for state in quotes]),
        ):
            self._prices(quote, open=values[0], high=max(values), low=min(values), close=values[-1])
        prices = [trade.yes_price for trade in trades]
        traded = sum(trade.count for trade in trades)
        price: JSON = {}
        self._prices(
            price,
            open=prices[0] if prices else None,
            high=max(prices) if prices else None,
            low=min(prices) if prices else None,
            close=prices[-1] if prices else None,
            mean=sum(t.yes_price * t.count for t in trades) // traded if traded else None,
            previous=previous_price,
            min=min(prices) if prices else None,
            max=max(prices) if prices else None,
        )
        body: JSON = {
            "end_period_ts": end_s,
            "yes_bid": yes_bid,
            "yes_ask": yes_ask,
            "price": price,
        }
        self._counts(body, volume=traded, open_interest=quotes[-1].open_interest)
        return body

    # -- WebSocket message bodies -------------------------------------------------------------

    def ticker_msg(self, ticker: str, state: MarketState) -> JSON:
        """``ticker`` channel ``msg``."""
        body: JSON = {
            "market_ticker": ticker,
            "price_dollars": dollars(state.last_price),
            "yes_bid_dollars": dollars(state.yes_bid),
            "yes_ask_dollars": dollars(state.yes_ask),
            "yes_bid_size_fp": count_fp(state.yes_bid_size),
            "yes_ask_size_fp": count_fp(state.yes_ask_size),
            "last_trade_size_fp": count_fp(state.last_trade_size),
            "volume_fp": count_fp(state.volume),
            "open_interest_fp": count_fp(state.open_interest),
            "dollar_volume": state.dollar_volume,
            "dollar_open_interest": state.open_interest // COUNT_SCALE,
            "ts_ms": state.ts_us // 1_000,
        }
        if self.legacy:
            body |= {
                "price": legacy_cents(state.last_price),
                "yes_bid": legacy_cents(state.yes_bid),
                "yes_ask": legacy_cents(state.yes_ask),
                "volume": legacy_count(state.volume),
                "open_interest": legacy_count(state.open_interest),
                "ts": state.ts_us // 1_000_000,
            }
        return body

    def trade_msg(self, trade: Trade) -> JSON:
        """``trade`` channel ``msg``."""
        body: JSON = {
            "trade_id": trade.trade_id,
            "market_ticker": trade.ticker,
            "count_fp": count_fp(trade.count),
            "yes_price_dollars": dollars(trade.yes_price),
            "no_price_dollars": dollars(trade.no_price),
            "taker_outcome_side": trade.taker_outcome_side,
            "taker_book_side": trade.taker_book_side,
            "ts": trade.ts_us // 1_000_000,
        }
        if self.legacy:
            body |= {
                "count": legacy_count(trade.count),
                "yes_price": legacy_cents(trade.yes_price),
                "no_price": legacy_cents(trade.no_price),
                "taker_side": trade.taker_outcome_side,
            }
        return body

    def orderbook_snapshot_msg(self, market: Market) -> JSON:
        """``orderbook_snapshot`` ``msg``: the whole book, bids only."""
        yes_bids, no_bids = market.orderbook()
        body: JSON = {
            "market_ticker": market.ticker,
            "yes_dollars_fp": levels_fp(yes_bids),
            "no_dollars_fp": levels_fp(no_bids),
        }
        if self.legacy:
            body |= {"yes": legacy_levels(yes_bids), "no": legacy_levels(no_bids)}
        return body

    def orderbook_delta_msg(self, delta: BookDelta) -> JSON:
        """``orderbook_delta`` ``msg``: one level changed by a signed amount."""
        body: JSON = {
            "market_ticker": delta.ticker,
            "price_dollars": dollars(delta.price),
            "delta_fp": count_fp(delta.delta),
            "side": delta.side,
            "ts_ms": delta.ts_us // 1_000,
        }
        if self.legacy:
            body |= {"price": legacy_cents(delta.price), "delta": legacy_count(delta.delta)}
        return body

    def orderbook_delta_text(self, delta: BookDelta) -> str:
        """:meth:`orderbook_delta_msg` as compact JSON, written directly: the same text as
        ``json.dumps`` of it, several times cheaper (the firehose sends one per book change)."""
        legacy = (
            f',"price":{legacy_cents(delta.price)},"delta":{legacy_count(delta.delta)}'
            if self.legacy
            else ""
        )
        return (
            f'{_quoted(delta.ticker)},"price_dollars":"{dollars(delta.price)}"'
            f',"delta_fp":"{count_fp(delta.delta)}","side":"{delta.side}"'
            f',"ts_ms":{delta.ts_us // 1_000}{legacy}}}'
        )

    def lifecycle_msg(self, event: LifecycleEvent, market: Market) -> JSON:
        """``market_lifecycle_v2`` ``msg``."""
        body: JSON = {
            "market_ticker": event.ticker,
            "event_type": event.event_type,
            "open_ts": market.open_us // 1_000_000,
            "close_ts": market.close_us // 1_000_000,
        }
        if event.event_type == "created":
            body["price_level_structure"] = market.price_level_structure
            body["price_ranges"] = [price_range(band) for band in market.price_ranges]
        if event.event_type == "activated":
            body["is_deactivated"] = False
        if event.event_type in ("determined", "settled"):
            state = market.state
            body["result"] = state.result
            body["determination_ts"] = market.determine_us // 1_000_000
            body["settlement_value"] = dollars(state.settlement_value or 0)
        if event.event_type == "settled":
            body["settled_ts"] = event.ts_us // 1_000_000
        return body


@lru_cache(maxsize=1 << 14)
def _quoted(ticker: str) -> str:
    """``{"market_ticker":"TICKER"`` (the start of a delta ``msg``), once a market."""
    return f'{{"market_ticker":{json.dumps(ticker)}'


def price_range(band: PriceRange) -> JSON:
    """One ``price_ranges`` entry, bounds and step as dollar strings."""
    return {"start": dollars(band.start), "end": dollars(band.end), "step": dollars(band.step)}


def levels_fp(levels: list[tuple[int, int]]) -> list[list[str]]:
    """``[[price_dollars, count_fp], …]``."""
    return [[dollars(price), count_fp(count)] for price, count in levels]


def legacy_levels(levels: list[tuple[int, int]]) -> list[list[int]]:
    """``[[cents, contracts], …]`` as the removed ``orderbook`` key had them."""
    return [[legacy_cents(price), legacy_count(count)] for price, count in levels]


def candlesticks(
    renderer: Renderer, market: Market, start_s: int, end_s: int, period_minutes: int, now_us: int
) -> list[JSON]:
    """Candles ending in ``[start_s, end_s]`` over the market's trading life (at most 5,000)."""
    period_s = period_minutes * 60
    last_us = min(market.close_us, now_us)
    first_end = max(-(-market.open_us // 1_000_000 // period_s) * period_s, start_s)
    first_end = -(-first_end // period_s) * period_s
    last_end = min(end_s, -(-last_us // 1_000_000 // period_s) * period_s)
    state_times = [state.ts_us for state in market.states]
    trade_times = [trade.ts_us for trade in market.trades]
    candles: list[JSON] = []
    for end in range(first_end, last_end + 1, period_s):
        if len(candles) == 5_000:
            break
        low_us, high_us = (end - period_s) * 1_000_000, end * 1_000_000
        first_state = max(bisect_right(state_times, low_us) - 1, 0)
        quotes = market.states[first_state : bisect_right(state_times, high_us)]
        trade_from = bisect_right(trade_times, low_us)
        trades = market.trades[trade_from : bisect_right(trade_times, high_us)]
        before = market.trades[trade_from - 1].yes_price if trade_from else None
        candles.append(renderer.candle(end, quotes, trades, before))
    return candles
