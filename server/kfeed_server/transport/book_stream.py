"""MarketService.StreamOrderBooks: each market's full book (at ``start_time``, or now), then every
change in commit order, one caught-up marker, then live changes; a full book again wherever the
recording restarts (START, RESYNC) and one flagged ``in_feed_gap`` where it stopped (LOST).

The request checks, the per-peer cap, the feed and the slow-consumer policy are StreamSnapshots'
(snapshot_stream, streaming.feed); order-book rows are a stream kind of their own in the hub,
with a stream id shared by changes and checkpoints (migration 0006_book_stream_ids), and their
resume tokens name the "books" stream. ``depth`` trims full books only: every change is sent,
so a client that applies them keeps the whole book.

With ``conflation_interval``, live rows are folded into each market's book
(books.conflation.BookConflator) and each interval's changed books go out whole, at ``depth``,
in one message (a ``batch`` when several), flagged by ``coalesced_count``: its token resumes
right after every row folded in. The stored history before the caught-up marker is sent as it
is; feed gaps as they come.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import grpc

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import types_pb2
from kfeed_server.books import BookAt, BookStream
from kfeed_server.books.conflation import BookConflator
from kfeed_server.db.repositories.markets import MarketRepository
from kfeed_server.records import (
    BookCheckpointRecord,
    BookStreamRow,
    CheckpointKind,
    StreamedBookChange,
)
from kfeed_server.streaming.feed import Delivery, FeedGapEvent, FeedItem, RowRun
from kfeed_server.streaming.hub import StreamKind
from kfeed_server.transport.convert import feed_gap_to_proto, timestamp
from kfeed_server.transport.errors import InvalidArgument
from kfeed_server.transport.order_books import book_depth, order_book_to_proto
from kfeed_server.transport.requests import RequestTokens
from kfeed_server.transport.snapshot_stream import SnapshotStreams, token_stream
from kfeed_server.transport.stream_frames import event_message

Context = grpc.aio.ServicerContext[Any, Any]


def book_change_to_proto(change: StreamedBookChange) -> types_pb2.OrderBookChange:
    record = change.change
    message = types_pb2.OrderBookChange(
        ticker=record.ticker,
        exchange_time=timestamp(record.exchange_time),
        receive_time=timestamp(record.receive_time),
        side=int(record.side),  # type: ignore[arg-type]
        price=types_pb2.Dollars(ten_thousandths=record.price),
        size=types_pb2.Contracts(hundredths=record.size),
    )
    if record.sequence:
        message.exchange_sequence = record.sequence
    return message


def full_book_to_proto(book: BookCheckpointRecord, depth: int) -> types_pb2.OrderBook:
    """A checkpoint (or a stream's starting book) as an OrderBook of ``depth`` levels a side."""
    return order_book_to_proto(
        BookAt(
            ticker=book.ticker,
            exchange_time=book.exchange_time,
            receive_time=book.receive_time,
            sequence=book.sequence or None,
            yes=book.yes[:depth] if depth else book.yes,
            no=book.no[:depth] if depth else book.no,
            in_feed_gap=book.kind is CheckpointKind.LOST,
        )
    )


class BookFrames:
    """Turns an order-book feed's items into StreamOrderBooksResponse bytes: ``max_batch_size``
    ≤ 1 one book or change a message, above 1 runs of them in ``batch`` messages of up to that
    many (the token resumes after the last of them)."""

    def __init__(self, tokens: RequestTokens, depth: int) -> None:
        self._tokens = tokens
        self._depth = depth

    def _token(self, resume_after_id: int) -> str:
        return self._tokens.encode_resume_token(resume_after_id, token_stream(StreamKind.BOOKS))

    def _update(self, row: BookStreamRow) -> pb.OrderBookUpdate:
        if isinstance(row, StreamedBookChange):
            return pb.OrderBookUpdate(change=book_change_to_proto(row))
        return pb.OrderBookUpdate(book=full_book_to_proto(row.book, self._depth))

    def frames(
        self, item: FeedItem[BookStreamRow], max_batch_size: int
    ) -> Iterator[tuple[bytes, int]]:
        if isinstance(item, Delivery):
            if isinstance(item.event, FeedGapEvent):
                message = pb.StreamOrderBooksResponse(
                    resume_token=self._token(item.resume_after_id),
                    feed_gap=feed_gap_to_proto(item.event.gap),
                )
            else:
                message = event_message(item, self._token, pb.StreamOrderBooksResponse)
            yield message.SerializeToString(), item.resume_after_id
            return
        assert isinstance(item, RowRun)  # order books are never replayed as columns
        if item.conflated:
            yield self._conflated(item), item.resume_after_id(len(item.rows) - 1)
            return
        for run, resume_after_id in item.batches(max_batch_size):
            response = pb.StreamOrderBooksResponse(resume_token=self._token(resume_after_id))
            if len(run) == 1:
                update = self._update(run[0])
                if update.HasField("change"):
                    response.change.CopyFrom(update.change)
                else:
                    response.book.CopyFrom(update.book)
            else:
                response.batch.updates.extend(self._update(row) for row in run)
            yield response.SerializeToString(), resume_after_id

    def _conflated(self, run: RowRun[BookStreamRow]) -> bytes:
        """One interval's conflated books, in one message: resuming after any but all of them
        would skip changes folded into the others."""
        response = pb.StreamOrderBooksResponse(
            resume_token=self._token(run.resume_after_id(len(run.rows) - 1))
        )
        if len(run.rows) == 1:
            response.book.CopyFrom(self._update(run.rows[0]).book)
            response.coalesced_count = run.coalesced_count(0)
        else:
            for index, row in enumerate(run.rows):
                update = self._update(row)
                update.coalesced_count = run.coalesced_count(index)
                response.batch.updates.append(update)
        return response.SerializeToString()


class BookStreams:
    """Serves StreamOrderBooks calls through the snapshot streams' machinery."""

    def __init__(
        self,
        streams: SnapshotStreams,
        markets: MarketRepository,
        books: BookStream,
        tokens: RequestTokens,
    ) -> None:
        self._streams = streams
        self._markets = markets
        self._books = books
        self._tokens = tokens

    async def _check_start(self, tickers: list[str], start_time: datetime | None) -> None:
        """A start before a named market existed is INVALID_ARGUMENT on ``start_time``."""
        if start_time is None:
            return
        for market in await self._markets.get_markets(sorted(set(tickers))):
            if market.open_time is not None and start_time < market.open_time:
                raise InvalidArgument.field(
                    "start_time",
                    f"before market {market.ticker} opened ({market.open_time.isoformat()})",
                )

    async def responses(
        self, request: pb.StreamOrderBooksRequest, context: Context
    ) -> AsyncIterator[bytes]:
        depth = book_depth(request.depth)
        feed_request = await self._streams.feed_request(request)
        if feed_request.resume_after_id is None:
            await self._check_start(list(request.tickers), feed_request.start_time)
        frames = BookFrames(self._tokens, depth)
        responses = self._streams.serve(
            feed_request, self._books, frames.frames, request.max_batch_size, context,
            conflator=BookConflator(),
        )  # fmt: skip
        async for response in responses:
            yield response
