"""IngestService.ListMarketWatermarks: stored markets with where their stored trades end.

A starting ``kfeed ingest`` reads this to follow the markets that are not final yet and to read
back, per market, the trades it missed (from the newest stored trade's time on).
"""

from __future__ import annotations

from kfeed.v1 import ingest_service_pb2 as pb
from kfeed_server.db.repositories.markets import MarketRepository
from kfeed_server.db.repositories.snapshots import SnapshotRepository
from kfeed_server.db.repositories.trades import TradeRepository
from kfeed_server.records import MarketStatus
from kfeed_server.transport.convert import market_to_proto, timestamp
from kfeed_server.transport.requests import PageSizeLimits, RequestTokens, enum_values

WATERMARKS_PAGE = PageSizeLimits(default=1000, maximum=1000)


async def list_market_watermarks(
    request: pb.ListMarketWatermarksRequest,
    markets: MarketRepository,
    trades: TradeRepository,
    snapshots: SnapshotRepository,
    tokens: RequestTokens,
) -> pb.ListMarketWatermarksResponse:
    """One page of markets (by ticker) with the times of each one's newest stored trade and
    snapshot."""
    limit = WATERMARKS_PAGE.resolve(request.page_size)
    statuses = enum_values(request.statuses, MarketStatus, "statuses")
    query = ("ListMarketWatermarks", tuple(sorted(statuses)))
    cursor = tokens.decode_page_token(request.page_token, query, shape=(str,))
    page = await markets.list_markets(
        limit=limit, after_ticker=str(cursor[0]) if cursor else None, statuses=statuses
    )
    tickers = [m.ticker for m in page.items]
    latest = await trades.latest_times(tickers) if tickers else {}
    newest_snapshots = await snapshots.latest_per_market(tickers) if tickers else []
    shown = {s.ticker: s.exchange_time for s in newest_snapshots}
    watermarks = []
    for market in page.items:
        watermark = pb.MarketWatermark(market=market_to_proto(market))
        if (trade_time := latest.get(market.ticker)) is not None:
            watermark.latest_trade_time.CopyFrom(timestamp(trade_time))
        if (snapshot_time := shown.get(market.ticker)) is not None:
            watermark.latest_snapshot_time.CopyFrom(timestamp(snapshot_time))
        watermarks.append(watermark)
    return pb.ListMarketWatermarksResponse(
        watermarks=watermarks, next_page_token=tokens.encode_page_token(page.next_cursor, query)
    )
