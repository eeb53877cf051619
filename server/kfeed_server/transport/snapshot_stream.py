"""MarketService.StreamSnapshots: a request becomes a feed (streaming.feed), the feed's items
become responses (stream_frames). The request checks, the per-peer cap and the serving loop are
shared with StreamTrades (trade_stream).

Streams per peer address are capped (``max_streams_per_peer``); a subscriber that reads too
slowly for its queue is handled by its overflow policy (streaming.feed), one that stops reading
by the server's bounded writes (stream_writer).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from kfeed.v1 import market_service_pb2 as pb
from kfeed_server.db.repositories.markets import MarketRepository
from kfeed_server.streaming.feed import (
    ColumnHistory,
    ColumnRun,
    Conflator,
    FeedItem,
    FeedRequest,
    OverflowPolicy,
    RowSource,
    SnapshotSource,
    StreamRow,
    SubscriberOverflowError,
    feed_items,
)
from kfeed_server.streaming.hub import MarketSelector, SnapshotHub, StreamKind
from kfeed_server.transport.errors import InvalidArgument, NotFound, ResourceExhausted
from kfeed_server.transport.requests import (
    RequestTokens,
    duration_seconds,
    optional_ticker,
    optional_time,
    ticker_list,
)
from kfeed_server.transport.stream_frames import MAX_BATCH_SIZE, SnapshotFrames

MAX_STREAM_TICKERS = 10_000

Context = grpc.aio.ServicerContext[Any, Any]
StreamRequest = pb.StreamSnapshotsRequest | pb.StreamTradesRequest | pb.StreamOrderBooksRequest
R = TypeVar("R", bound=StreamRow)
# A stream's encoder: a feed item and max_batch_size → responses, each with the id it resumes after.
Frames = Callable[[FeedItem[R], int], Iterator[tuple[bytes, int]]]


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Per-server limits on snapshot streams (``kfeed serve`` flags of the same names)."""

    # Open streams one peer address (IP, any port) may hold at once.
    max_streams_per_peer: int = 1_000


def peer_address(peer: str) -> str:
    """The address part of a gRPC peer string (``ipv4:127.0.0.1:5000`` → ``ipv4:127.0.0.1``)."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class SnapshotStreams:
    """Serves StreamSnapshots calls. Holds no SQL: reads go through the repositories."""

    def __init__(
        self,
        markets: MarketRepository,
        snapshots: SnapshotSource,
        hub: SnapshotHub,
        tokens: RequestTokens,
        limits: StreamLimits,
        columns: ColumnHistory | None = None,
    ) -> None:
        self._markets = markets
        self._snapshots = snapshots
        self._columns = columns
        self._hub = hub
        self._tokens = tokens
        self._limits = limits
        self._frames = SnapshotFrames(tokens)
        self._open_per_peer: Counter[str] = Counter()

    async def feed_request(self, request: StreamRequest) -> FeedRequest:
        """The request validated and resolved: INVALID_ARGUMENT / NOT_FOUND naming the field."""
        kind = (
            StreamKind.TRADES
            if isinstance(request, pb.StreamTradesRequest)
            else StreamKind.BOOKS
            if isinstance(request, pb.StreamOrderBooksRequest)
            else StreamKind.SNAPSHOTS
        )
        tickers = ticker_list(request.tickers, MAX_STREAM_TICKERS)
        if not 0 <= request.max_batch_size <= MAX_BATCH_SIZE:
            raise InvalidArgument.field("max_batch_size", f"must be between 0 and {MAX_BATCH_SIZE}")
        event_ticker = optional_ticker(request.event_ticker, "event_ticker")
        series_ticker = optional_ticker(request.series_ticker, "series_ticker")
        resume_after_id = (
            self._tokens.decode_resume_token(request.resume_token, stream=token_stream(kind))
            if request.resume_token
            else None
        )
        start_time = optional_time(request, "start_time")
        heartbeat = duration_seconds(
            request, "heartbeat_interval", default=5.0, minimum=0.1, maximum=60.0
        )
        conflation = None
        if isinstance(request, pb.StreamSnapshotsRequest | pb.StreamOrderBooksRequest):
            conflation = duration_seconds(
                request, "conflation_interval", default=None, minimum=0.01, maximum=60.0
            )
        policy = (
            OverflowPolicy.RESOURCE_EXHAUSTED
            if request.overflow_policy == pb.OVERFLOW_POLICY_RESOURCE_EXHAUSTED
            else OverflowPolicy.GAP_MARKER
        )
        known = await self._markets.existing_tickers(tickers)
        for ticker in tickers:
            if ticker not in known:
                raise NotFound("market", ticker)
        selected = set(tickers)
        if event_ticker or series_ticker:
            # Markets that exist now; ones created later match through the hub's directory.
            selected.update(
                await self._markets.tickers_matching(
                    event_ticker=event_ticker, series_ticker=series_ticker
                )
            )
        selector = MarketSelector(frozenset(selected), event_ticker, series_ticker)
        return FeedRequest(
            selector=selector,
            kind=kind,
            start_time=start_time,
            resume_after_id=resume_after_id,
            include_latest=isinstance(request, pb.StreamSnapshotsRequest)
            and request.include_latest,
            heartbeat_interval=heartbeat or 5.0,
            conflation_interval=conflation,
            overflow_policy=policy,
            history_tickers=None if selector.selects_all else sorted(selected),
        )

    def _admit(self, peer: str) -> None:
        limit = self._limits.max_streams_per_peer
        if self._open_per_peer[peer] >= limit:
            raise ResourceExhausted(
                f"this peer already has {limit} open streams (max_streams_per_peer)"
            )
        self._open_per_peer[peer] += 1

    def _release(self, peer: str) -> None:
        self._open_per_peer[peer] -= 1
        if self._open_per_peer[peer] <= 0:
            del self._open_per_peer[peer]

    async def responses(
        self, request: pb.StreamSnapshotsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        """The stream's responses, encoded, until it ends (shutdown, overflow or cancel)."""
        feed_request = await self.feed_request(request)
        responses = self.serve(
            feed_request, self._snapshots, self._frames.frames, request.max_batch_size, context,
            self._columns,
        )  # fmt: skip
        async for response in responses:
            yield response

    async def serve(
        self,
        feed_request: FeedRequest,
        source: RowSource[R],
        frames: Frames[R],
        max_batch_size: int,
        context: Context,
        columns: ColumnHistory | None = None,
        conflator: Conflator[R] | None = None,
    ) -> AsyncIterator[bytes]:
        """A validated stream's responses, encoded by ``frames``, until it ends (shutdown,
        overflow or cancel). ``columns``: long snapshot replays read as columns; ``conflator``:
        how live rows are conflated, when asked for (default: the latest row per market)."""
        peer = peer_address(context.peer())
        self._admit(peer)
        items = feed_items(feed_request, self._hub, source, columns, conflator)
        try:
            async with contextlib.aclosing(items) as feed:
                async for item in feed:
                    encoded = frames(item, max_batch_size)
                    if isinstance(item, ColumnRun):
                        # A chunk of history read as columns (up to a million rows) is encoded
                        # in a worker thread, by compiled code that releases the GIL: the loop
                        # keeps serving other streams meanwhile.
                        encoded = iter(await asyncio.to_thread(list, encoded))
                    for frame, _ in encoded:
                        if self._hub.storing:  # no coroutine per frame when nothing is stored
                            await self._hub.after_writes()
                        yield frame
        except SubscriberOverflowError as overflow:
            token = self._tokens.encode_resume_token(
                overflow.resume_after_id, token_stream(feed_request.kind)
            )
            raise ResourceExhausted(f"{overflow}; resume with resume_token {token!r}") from None
        finally:
            self._release(peer)


def token_stream(kind: StreamKind) -> str:
    """The resume-token stream name of ``kind`` (snapshot tokens keep their original domain)."""
    return "" if kind is StreamKind.SNAPSHOTS else kind.value
