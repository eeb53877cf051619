"""What the server has stored, as a starting ingest process needs it: the markets that are not
final yet (and those finalized lately), and where each one's stored trades end
(``IngestService.ListMarketWatermarks``); and the feed gaps an earlier process left unrecovered
(``MarketService.ListFeedGaps``, which the ``ingest`` role may call), for it to repair."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import grpc

from kfeed.v1 import (
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    market_service_pb2,
    market_service_pb2_grpc,
    types_pb2,
)

_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class StoredMarket:
    """A market the server holds, and where its stored trades end."""

    ticker: str
    final: bool
    event_ticker: str
    series_ticker: str
    open_time: datetime | None
    latest_trade_time: datetime | None  # None: no trade stored
    latest_snapshot_time: datetime | None  # None: no snapshot stored


class ServerState:
    """Reads the server's stored state over the ingest's own channel settings and token."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._credentials = credentials

    async def markets_to_resume(
        self, final_since: datetime, deadline: float = 30.0
    ) -> list[StoredMarket]:
        """Every stored market that is not finalized, and every finalized one whose newest stored
        trade is at or after ``final_since`` (its last trades may still need their exact times);
        each call waits at most ``deadline`` seconds (raises ``grpc.aio.AioRpcError``)."""
        found: list[StoredMarket] = []
        async with self._channel() as channel:
            stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
            token = ""
            while True:
                request = ingest_service_pb2.ListMarketWatermarksRequest(
                    page_size=_PAGE_SIZE, page_token=token
                )
                page = await stub.ListMarketWatermarks(
                    request, metadata=self._metadata, timeout=deadline
                )
                stored = (_stored(watermark) for watermark in page.watermarks)
                found += [
                    market
                    for market in stored
                    if not market.final
                    or (market.latest_trade_time is not None
                        and market.latest_trade_time >= final_since)
                ]  # fmt: skip
                token = page.next_page_token
                if not token:
                    return found

    async def open_feed_gaps(self, deadline: float = 30.0) -> list[types_pb2.FeedGap]:
        """Every stored feed gap not recovered, oldest first; each call waits at most
        ``deadline`` seconds (raises ``grpc.aio.AioRpcError``)."""
        found: list[types_pb2.FeedGap] = []
        async with self._channel() as channel:
            stub = market_service_pb2_grpc.MarketServiceStub(channel)
            request = market_service_pb2.ListFeedGapsRequest(page_size=_PAGE_SIZE)
            request.start_time.GetCurrentTime()  # gaps still open now (or recovered later)
            while True:
                page = await stub.ListFeedGaps(request, metadata=self._metadata, timeout=deadline)
                found += [gap for gap in page.feed_gaps if not gap.recovered]
                if not page.next_page_token:
                    return found[::-1]
                request.page_token = page.next_page_token

    def _channel(self) -> grpc.aio.Channel:
        return (
            grpc.aio.secure_channel(self.target, self._credentials)
            if self._credentials is not None
            else grpc.aio.insecure_channel(self.target)
        )


def _stored(watermark: ingest_service_pb2.MarketWatermark) -> StoredMarket:
    market = watermark.market
    return StoredMarket(
        ticker=market.ticker,
        final=market.status == types_pb2.MARKET_STATUS_FINALIZED,
        event_ticker=market.event_ticker,
        series_ticker=market.series_ticker,
        open_time=market.open_time.ToDatetime(UTC) if market.HasField("open_time") else None,
        latest_trade_time=(
            watermark.latest_trade_time.ToDatetime(UTC)
            if watermark.HasField("latest_trade_time")
            else None
        ),
        latest_snapshot_time=(
            watermark.latest_snapshot_time.ToDatetime(UTC)
            if watermark.HasField("latest_snapshot_time")
            else None
        ),
    )
