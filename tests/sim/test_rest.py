"""REST: Kalshi's paths and shapes, fixed-point strings, filters, pagination and errors."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import httpx
import pytest

from kfeed_sim.fixed_point import parse_dollars
from kfeed_sim.market_model import MarketStatus
from kfeed_sim.server import SimHandle
from tests.support.sim import SimFactory

DOLLARS = re.compile(r"^-?\d+\.\d{4}$")
FP = re.compile(r"^-?\d+\.\d{2}$")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def assert_fixed_point_fields(body: dict[str, Any]) -> None:
    """Every ``*_dollars`` has four decimals and every ``*_fp`` two, and legacy ints agree."""
    for key, value in body.items():
        if key.endswith("_dollars") and value is not None:
            assert DOLLARS.match(value), (key, value)
            legacy = key.removesuffix("_dollars")
            if legacy in body and not legacy.startswith("notional"):
                assert body[legacy] == parse_dollars(value) // 100
        if key.endswith("_fp"):
            assert FP.match(value), (key, value)


async def all_pages(client: httpx.AsyncClient, path: str, key: str, **params: Any) -> list[Any]:
    items: list[Any] = []
    cursor = ""
    while True:
        response = await client.get(path, params={**params, "cursor": cursor})
        assert response.status_code == 200, response.text
        items += response.json()[key]
        cursor = response.json()["cursor"]
        if not cursor:
            return items


async def test_exchange_status_and_schedule(rest: httpx.AsyncClient) -> None:
    status = (await rest.get("/exchange/status")).json()
    assert status == {"exchange_active": True, "trading_active": True}
    schedule = (await rest.get("/exchange/schedule")).json()["schedule"]
    assert schedule["maintenance_windows"] == []


async def test_market_shape(rest: httpx.AsyncClient, sim: SimHandle) -> None:
    page = (await rest.get("/markets", params={"status": "open", "limit": 1})).json()
    market = page["markets"][0]
    assert market["status"] == "active"
    assert market["market_type"] == "binary"
    assert "series_ticker" not in market  # Kalshi's market object has none
    for key in ("open_time", "close_time", "created_time", "updated_time", "expiration_time"):
        assert RFC3339.match(market[key]), key
    assert_fixed_point_fields(market)
    assert market["price_ranges"][0].keys() == {"start", "end", "step"}
    assert market["result"] == ""
    model = sim.exchange.markets[market["ticker"]].state
    assert parse_dollars(market["yes_bid_dollars"]) == model.yes_bid
    assert Decimal(market["volume_fp"]) * 100 == model.volume
    single = (await rest.get(f"/markets/{market['ticker']}")).json()
    assert single == {"market": market}


async def test_settled_market_carries_result_and_settlement_value(rest: httpx.AsyncClient) -> None:
    market = (await rest.get("/markets", params={"status": "settled", "limit": 1})).json()
    market = market["markets"][0]
    assert market["status"] == "finalized"
    assert market["result"] in ("yes", "no")
    assert market["settlement_value_dollars"] == (
        "1.0000" if market["result"] == "yes" else "0.0000"
    )


async def test_pagination_walks_every_market_once(rest: httpx.AsyncClient, sim: SimHandle) -> None:
    markets = await all_pages(rest, "/markets", "markets", limit=3)
    tickers = [m["ticker"] for m in markets]
    assert len(tickers) == len(set(tickers))
    live = [t for t, m in sim.exchange.markets.items() if not sim.exchange.is_historical_market(m)]
    assert sorted(tickers) == sorted(live)


async def test_limit_is_capped_server_side(make_sim: SimFactory) -> None:
    async with (
        make_sim(markets=150, history_steps=300) as sim,
        httpx.AsyncClient(base_url=sim.rest_url) as client,
    ):
        trades = (await client.get("/markets/trades", params={"limit": 5000})).json()
        assert len(trades["trades"]) == 1000
        assert trades["cursor"]
        events = (await client.get("/events", params={"limit": 5000})).json()
        assert len(events["events"]) == 200
        assert events["cursor"]


async def test_market_filters(rest: httpx.AsyncClient, sim: SimHandle) -> None:
    some = next(m for m in sim.exchange.markets.values() if m.status is MarketStatus.ACTIVE)
    by_event = await all_pages(rest, "/markets", "markets", event_ticker=some.event_ticker)
    assert {m["event_ticker"] for m in by_event} == {some.event_ticker}
    by_series = await all_pages(rest, "/markets", "markets", series_ticker=some.series_ticker)
    assert all(m["event_ticker"].startswith(some.series_ticker + "-") for m in by_series)
    by_ticker = await all_pages(rest, "/markets", "markets", tickers=f"{some.ticker},NOPE")
    assert [m["ticker"] for m in by_ticker] == [some.ticker]
    close_s = some.close_us // 1_000_000
    window = await all_pages(
        rest, "/markets", "markets", min_close_ts=close_s, max_close_ts=close_s
    )
    assert some.ticker in {m["ticker"] for m in window}
    unopened = await all_pages(rest, "/markets", "markets", status="unopened,open")
    assert {m["status"] for m in unopened} <= {"initialized", "active"}
    bad = await rest.get("/markets", params={"status": "active"})  # field value, not filter
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "bad_request"


async def test_unknown_things_are_404_in_kalshi_shape(rest: httpx.AsyncClient) -> None:
    for path in ("/markets/KXNOPE-1", "/events/KXNOPE", "/series/KXNOPE", "/nowhere"):
        response = await rest.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


async def test_orderbook_is_bids_only_and_matches_the_quote(
    rest: httpx.AsyncClient, sim: SimHandle
) -> None:
    for market in sim.exchange.markets.values():
        if market.status is not MarketStatus.ACTIVE:
            continue
        body = (await rest.get(f"/markets/{market.ticker}/orderbook")).json()
        book = body["orderbook_fp"]
        assert book.keys() == {"yes_dollars", "no_dollars"}
        yes = [parse_dollars(price) for price, _ in book["yes_dollars"]]
        no = [parse_dollars(price) for price, _ in book["no_dollars"]]
        assert yes == sorted(yes)
        assert no == sorted(no)
        quote = (await rest.get(f"/markets/{market.ticker}")).json()["market"]
        assert parse_dollars(quote["yes_ask_dollars"]) == 10_000 - max(no)
        assert parse_dollars(quote["yes_bid_dollars"]) == max(yes)
        assert max(yes) < 10_000 - max(no)
        top = (await rest.get(f"/markets/{market.ticker}/orderbook", params={"depth": 1})).json()
        assert top["orderbook_fp"]["yes_dollars"] == book["yes_dollars"][-1:]


async def test_trades_newest_first_with_time_window(
    rest: httpx.AsyncClient, sim: SimHandle
) -> None:
    cutoff = sim.exchange.historical_cutoff_us
    market = max(
        sim.exchange.markets.values(), key=lambda m: sum(t.ts_us >= cutoff for t in m.trades)
    )
    trades = await all_pages(rest, "/markets/trades", "trades", ticker=market.ticker, limit=7)
    expected = [t.trade_id for t in reversed(market.trades) if t.ts_us >= cutoff]
    assert [t["trade_id"] for t in trades] == expected
    first = trades[0]
    assert first.keys() >= {
        "trade_id", "ticker", "count_fp", "yes_price_dollars", "no_price_dollars",
        "taker_outcome_side", "taker_book_side", "is_block_trade", "created_time",
    }  # fmt: skip
    assert (
        parse_dollars(first["yes_price_dollars"]) + parse_dollars(first["no_price_dollars"])
        == 10_000
    )
    middle = market.trades[len(market.trades) // 2].ts_us // 1_000_000
    windowed = await all_pages(
        rest, "/markets/trades", "trades", ticker=market.ticker, min_ts=middle, max_ts=middle
    )
    in_window = [t for t in market.trades if t.ts_us // 1_000_000 == middle and t.ts_us >= cutoff]
    assert [t["trade_id"] for t in windowed] == [t.trade_id for t in reversed(in_window)]


async def test_historical_tier_splits_at_the_cutoff(
    rest: httpx.AsyncClient, sim: SimHandle
) -> None:
    cutoff = (await rest.get("/historical/cutoff")).json()
    assert cutoff.keys() == {"market_settled_ts", "trades_created_ts", "orders_updated_ts"}
    old = await all_pages(rest, "/historical/markets", "markets", limit=2)
    assert old
    assert all(m["status"] == "finalized" for m in old)
    live = {m["ticker"] for m in await all_pages(rest, "/markets", "markets")}
    assert live.isdisjoint(m["ticker"] for m in old)
    ticker = old[0]["ticker"]
    assert (await rest.get(f"/markets/{ticker}")).status_code == 404
    assert (await rest.get(f"/historical/markets/{ticker}")).json()["market"] == old[0]
    old_trades = await all_pages(rest, "/historical/trades", "trades", limit=1000)
    new_trades = await all_pages(rest, "/markets/trades", "trades", limit=1000)
    assert len(old_trades) + len(new_trades) == sim.exchange.trade_seq


async def test_events_series_and_nested_markets(rest: httpx.AsyncClient, sim: SimHandle) -> None:
    events = await all_pages(rest, "/events", "events", with_nested_markets="true", limit=2)
    assert len(events) == len(sim.exchange.events)
    event = events[0]
    assert event.keys() >= {
        "event_ticker", "series_ticker", "title", "sub_title", "category",
        "mutually_exclusive", "strike_date", "strike_period", "markets",
    }  # fmt: skip
    single = (await rest.get(f"/events/{event['event_ticker']}")).json()
    assert [m["ticker"] for m in single["markets"]] == [m["ticker"] for m in event["markets"]]
    series = (await rest.get(f"/series/{event['series_ticker']}")).json()["series"]
    assert series["ticker"] == event["series_ticker"]
    assert "fee_type" in series
    open_events = await all_pages(rest, "/events", "events", status="open")
    assert open_events
    assert len(open_events) < len(events)


@pytest.mark.parametrize("historical", [False, True])
async def test_candlesticks(rest: httpx.AsyncClient, sim: SimHandle, historical: bool) -> None:
    market = next(
        m for m in sim.exchange.markets.values()
        if m.trades and sim.exchange.is_historical_market(m) == historical
    )  # fmt: skip
    path = (
        f"/historical/markets/{market.ticker}/candlesticks"
        if historical
        else f"/series/{market.series_ticker}/markets/{market.ticker}/candlesticks"
    )
    span = {
        "start_ts": market.created_us // 1_000_000 - 3600,
        "end_ts": market.settle_us // 1_000_000 + 3600,
    }
    body = (await rest.get(path, params={**span, "period_interval": 1})).json()
    assert body["market_ticker"] == market.ticker
    candles = body["candlesticks"]
    ends = [c["end_period_ts"] for c in candles]
    assert ends == sorted(ends)
    assert all(end % 60 == 0 for end in ends)
    assert sum(Decimal(c["volume_fp"]) for c in candles) * 100 == sum(
        t.count for t in market.trades if t.ts_us <= market.close_us
    )
    candle = next(c for c in candles if c["price"]["open_dollars"] is not None)
    assert candle["price"].keys() >= {
        "open_dollars",
        "high_dollars",
        "low_dollars",
        "close_dollars",
        "mean_dollars",
        "previous_dollars",
    }
    assert candle["yes_bid"].keys() >= {
        "open_dollars",
        "high_dollars",
        "low_dollars",
        "close_dollars",
    }
    bad = await rest.get(path, params={**span, "period_interval": 5})
    assert bad.status_code == 400


async def test_legacy_integer_fields_can_be_switched_off(make_sim: SimFactory) -> None:
    async with (
        make_sim(legacy_integer_fields=False) as sim,
        httpx.AsyncClient(base_url=sim.rest_url) as client,
    ):
        market = (await client.get("/markets", params={"limit": 1})).json()["markets"][0]
        assert "yes_bid_dollars" in market
        assert "yes_bid" not in market
        assert "volume" not in market
        book = (await client.get(f"/markets/{market['ticker']}/orderbook")).json()
        assert book.keys() == {"orderbook_fp"}


async def test_bad_cursor_is_a_400(rest: httpx.AsyncClient) -> None:
    response = await rest.get("/markets", params={"cursor": "not-a-cursor"})
    assert response.status_code == 400
