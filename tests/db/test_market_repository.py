"""MarketRepository: upserts, lookups, filtered keyset listing."""

from __future__ import annotations

import dataclasses

from kfeed_server.db.repositories import Repositories
from kfeed_server.records import MarketResult, MarketStatus
from tests.support.factories import at, make_event, make_market, make_series


async def test_upserts_count_new_or_changed_rows(repositories: Repositories) -> None:
    markets = repositories.markets
    assert await markets.upsert_series([make_series("S1"), make_series("S2")]) == 2
    assert await markets.upsert_series([make_series("S1"), make_series("S2", title="x")]) == 1
    assert await markets.upsert_events([make_event("E1")]) == 1
    assert await markets.upsert_events([make_event("E1")]) == 0
    assert await markets.upsert_markets([make_market("A"), make_market("B")]) == 2
    assert await markets.upsert_markets([make_market("A")]) == 0
    assert await markets.upsert_series([]) == 0


async def test_get_market_round_trips_every_field(repositories: Repositories) -> None:
    market = make_market(
        "A",
        status=MarketStatus.FINALIZED,
        result=MarketResult.NO,
        settlement_time=at(100),
        settlement_value=0,
        fractional_trading_enabled=True,
        expiration_time=at(200),
    )
    await repositories.markets.upsert_markets([market])
    stored = await repositories.markets.get_market("A")
    assert stored is not None
    assert stored.update_time is not None
    assert stored == dataclasses.replace(market, update_time=stored.update_time)
    assert isinstance(stored.status, MarketStatus)
    assert isinstance(stored.result, MarketResult)
    assert await repositories.markets.get_market("missing") is None


async def test_list_markets_pages_and_filters(repositories: Repositories) -> None:
    await repositories.markets.upsert_markets(
        [
            make_market("A1", event_ticker="E1", status=MarketStatus.OPEN),
            make_market("A2", event_ticker="E1", status=MarketStatus.CLOSED),
            make_market("A3", event_ticker="E2", status=MarketStatus.OPEN),
            make_market("B1", event_ticker="E3", series_ticker="OTHER"),
        ]
    )
    first = await repositories.markets.list_markets(limit=2)
    assert [m.ticker for m in first.items] == ["A1", "A2"]
    assert first.next_cursor == ("A2",)
    second = await repositories.markets.list_markets(limit=2, after_ticker="A2")
    assert [m.ticker for m in second.items] == ["A3", "B1"]
    assert second.next_cursor is None

    by_event = await repositories.markets.list_markets(limit=10, event_ticker="E1")
    assert [m.ticker for m in by_event.items] == ["A1", "A2"]
    by_series = await repositories.markets.list_markets(limit=10, series_ticker="OTHER")
    assert [m.ticker for m in by_series.items] == ["B1"]
    open_ser = await repositories.markets.list_markets(
        limit=10, series_ticker="SER", statuses=[MarketStatus.OPEN]
    )
    assert [m.ticker for m in open_ser.items] == ["A1", "A3"]


async def test_existing_tickers_and_tickers_matching(repositories: Repositories) -> None:
    await repositories.markets.upsert_markets(
        [
            make_market("A1", event_ticker="E1"),
            make_market("A2", event_ticker="E1"),
            make_market("B1", event_ticker="E2", series_ticker="OTHER"),
        ]
    )
    assert await repositories.markets.existing_tickers(["A1", "B1", "ZZ", "A1"]) == {"A1", "B1"}
    assert await repositories.markets.existing_tickers([]) == set()
    markets = repositories.markets
    assert await markets.tickers_matching(event_ticker="E1", series_ticker=None) == ["A1", "A2"]
    assert await markets.tickers_matching(event_ticker=None, series_ticker="OTHER") == ["B1"]
    assert await markets.tickers_matching(event_ticker="E1", series_ticker="OTHER") == []
    assert await markets.tickers_matching(event_ticker=None, series_ticker=None) == [
        "A1",
        "A2",
        "B1",
    ]
