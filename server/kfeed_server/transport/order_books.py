"""GetOrderBook: request checks and the answer; the books come from kfeed_server.books."""

from __future__ import annotations

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import types_pb2
from kfeed_server.books import (
    LATEST,
    BeforeMarketError,
    BookAt,
    NotRecordedError,
    OrderBooks,
    UnknownMarketError,
)
from kfeed_server.transport.convert import timestamp
from kfeed_server.transport.errors import InvalidArgument, NotFound
from kfeed_server.transport.requests import optional_time, require_ticker

MAX_DEPTH = 10_000


def book_depth(depth: int) -> int:
    """Levels a side: 0 (all) up to MAX_DEPTH."""
    if not 0 <= depth <= MAX_DEPTH:
        raise InvalidArgument.field("depth", f"must be from 0 (all levels) to {MAX_DEPTH}")
    return depth


def order_book_to_proto(book: BookAt) -> types_pb2.OrderBook:
    message = types_pb2.OrderBook(
        ticker=book.ticker,
        exchange_time=timestamp(book.exchange_time),
        receive_time=timestamp(book.receive_time),
        in_feed_gap=book.in_feed_gap,
    )
    # Built in place from nested dicts: cheaper than a sub-message per price and size
    # (a book can hold hundreds of levels).
    for levels, side in ((book.yes, message.yes_bids), (book.no, message.no_bids)):
        add = side.add
        for price, size in levels:
            add(price={"ten_thousandths": price}, size={"hundredths": size})
    if book.sequence is not None:
        message.exchange_sequence = book.sequence
    return message


async def get_order_book(
    books: OrderBooks, request: pb.GetOrderBookRequest
) -> pb.GetOrderBookResponse:
    ticker = require_ticker(request.ticker)
    depth = book_depth(request.depth)
    time = optional_time(request, "time") or LATEST
    try:
        book = await books.book_at(ticker, time, depth)
    except UnknownMarketError:
        raise NotFound("market", ticker) from None
    except BeforeMarketError as error:
        raise InvalidArgument.field("time", str(error)) from None
    except NotRecordedError:
        at = "" if time is LATEST else f" at {time.isoformat()}"
        raise NotFound("order book", ticker + at) from None
    return pb.GetOrderBookResponse(book=order_book_to_proto(book))
