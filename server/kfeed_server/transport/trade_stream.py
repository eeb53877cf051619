"""MarketService.StreamTrades: the public tape — stored trades (from ``start_time`` or after a
resume token), one caught-up marker, then live trades as they commit.

The request checks, the per-peer cap, the feed and the slow-consumer policy are StreamSnapshots'
(snapshot_stream, streaming.feed); trades are rows of their own stream kind in the same hub, and
their resume tokens name the "trades" stream, so a snapshot token never resumes trades.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from kfeed.v1 import market_service_pb2 as pb
from kfeed_server.records import StreamedTrade
from kfeed_server.streaming.feed import Delivery, FeedItem, RowRun, RowSource
from kfeed_server.streaming.hub import StreamKind
from kfeed_server.transport.convert import trade_to_proto
from kfeed_server.transport.requests import RequestTokens
from kfeed_server.transport.snapshot_stream import SnapshotStreams, token_stream
from kfeed_server.transport.stream_frames import event_message

Context = grpc.aio.ServicerContext[Any, Any]


class TradeFrames:
    """Turns a trade feed's items into StreamTradesResponse bytes: ``max_batch_size`` ≤ 1 one
    trade a message, above 1 runs of ready trades in ``trade_batch`` messages of up to that many
    (the token resumes after the last of them)."""

    def __init__(self, tokens: RequestTokens) -> None:
        self._tokens = tokens

    def _token(self, resume_after_id: int) -> str:
        return self._tokens.encode_resume_token(resume_after_id, token_stream(StreamKind.TRADES))

    def frames(
        self, item: FeedItem[StreamedTrade], max_batch_size: int
    ) -> Iterator[tuple[bytes, int]]:
        if isinstance(item, Delivery):
            message = event_message(item, self._token, pb.StreamTradesResponse)
            yield message.SerializeToString(), item.resume_after_id
            return
        assert isinstance(item, RowRun)  # trades are never replayed as columns
        for run, resume_after_id in item.batches(max_batch_size):
            response = pb.StreamTradesResponse(resume_token=self._token(resume_after_id))
            if len(run) == 1:
                response.trade.CopyFrom(trade_to_proto(run[0].trade))
            else:
                response.trade_batch.trades.extend(trade_to_proto(row.trade) for row in run)
            yield response.SerializeToString(), resume_after_id


class TradeStreams:
    """Serves StreamTrades calls through the snapshot streams' machinery."""

    def __init__(
        self, streams: SnapshotStreams, trades: RowSource[StreamedTrade], tokens: RequestTokens
    ) -> None:
        self._streams = streams
        self._trades = trades
        self._frames = TradeFrames(tokens)

    async def responses(
        self, request: pb.StreamTradesRequest, context: Context
    ) -> AsyncIterator[bytes]:
        feed_request = await self._streams.feed_request(request)
        responses = self._streams.serve(
            feed_request, self._trades, self._frames.frames, request.max_batch_size, context
        )
        async for response in responses:
            yield response
