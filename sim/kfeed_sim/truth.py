"""Ground truth as JSON: every state and trade the sim published, in kfeed's own units.

Prices are integers in 1/10,000 USD and counts integers in 1/100 contract (exactly what kfeed
stores), times are RFC 3339 plus integer microseconds, so an end-to-end test compares what kfeed
stored with this without any rounding.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from kfeed_sim.fixed_point import rfc3339
from kfeed_sim.market_model import Exchange, MarketState, MarketTruth, Trade

UNITS = {
    "price": "integer 1/10000 USD",
    "count": "integer 1/100 contract",
    "ts_us": "integer microseconds since the epoch, UTC",
}


def state_json(state: MarketState) -> dict[str, Any]:
    """One published state."""
    body = asdict(state)
    body["status"] = state.status.value
    body["ts"] = rfc3339(state.ts_us)
    return body


def trade_json(trade: Trade) -> dict[str, Any]:
    """One published trade (``seq`` is the sim's own ordering, not a Kalshi field)."""
    body = asdict(trade)
    body["no_price"] = trade.no_price
    body["created_time"] = rfc3339(trade.ts_us)
    return body


def market_truth_json(truth: MarketTruth, books: bool = False) -> dict[str, Any]:
    """A market's states and trades (and with ``books`` every change of its book, as
    ``[ts_us, side, price, new size]``: replayed up to an instant they give the book then)."""
    body: dict[str, Any] = {
        "ticker": truth.ticker,
        "event_ticker": truth.event_ticker,
        "series_ticker": truth.series_ticker,
        "states": [state_json(s) for s in truth.states],
        "trades": [trade_json(t) for t in truth.trades],
    }
    if books:
        body["book_changes"] = [list(change) for change in truth.book_changes]
    return body


def truth_json(
    exchange: Exchange, tickers: set[str] | None = None, books: bool = False
) -> dict[str, Any]:
    """The whole truth document (optionally for some tickers only, optionally with books)."""
    markets = exchange.truth(books)
    return {
        "seed": exchange.config.seed,
        "step": exchange.current_step,
        "now": rfc3339(exchange.now_us),
        "historical_cutoff": rfc3339(exchange.historical_cutoff_us),
        "units": UNITS,
        "markets": [
            market_truth_json(truth, books)
            for ticker, truth in markets.items()
            if tickers is None or ticker in tickers
        ],
    }
