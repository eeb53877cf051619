"""MarketService.ListFeedGaps over a real server and the generated stubs, on SQLite and
PostgreSQL: newest first, by market and window, paged with authenticated tokens."""

from __future__ import annotations

import grpc
import pytest

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer
from kfeed_server.records import FeedGapRecord
from kfeed_server.transport.convert import timestamp
from tests.support.factories import at, make_gap, make_market
from tests.support.servers import bad_request_fields, status_details

A, B = make_market("KXGAP-26DEC05-A"), make_market("KXGAP-26DEC05-B")


@pytest.fixture
async def stored(kfeed_server: KfeedServer) -> list[FeedGapRecord]:
    """Nine gaps, one a second: of A, of B, and of a whole subscription (no ticker) in turn;
    the first three recovered at second 4. Newest first."""
    gaps = [
        make_gap(
            i,
            ticker=(A.ticker, B.ticker, "")[i % 3],
            recovered=i < 3,
            recover_time=at(4) if i < 3 else None,
        )
        for i in range(9)
    ]
    written = await kfeed_server.repositories.ingest.write_batch(markets=[A, B], feed_gaps=gaps)
    return sorted(written.stored_gaps, key=lambda g: g.detect_time, reverse=True)


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.MarketServiceAsyncStub:
    return pb_grpc.MarketServiceStub(channel)


def _ids(response: pb.ListFeedGapsResponse) -> list[int]:
    return [g.gap_id for g in response.feed_gaps]


async def test_pages_through_every_gap_newest_first(
    stub: pb_grpc.MarketServiceAsyncStub, stored: list[FeedGapRecord]
) -> None:
    seen: list[int] = []
    token = ""
    while True:
        page = await stub.ListFeedGaps(pb.ListFeedGapsRequest(page_size=4, page_token=token))
        seen.extend(_ids(page))
        token = page.next_page_token
        if not token:
            break
    assert seen == [g.gap_id for g in stored]
    newest = (await stub.ListFeedGaps(pb.ListFeedGapsRequest(page_size=1))).feed_gaps[0]
    assert newest.ticker == stored[0].ticker
    assert newest.detect_time.ToDatetime() == stored[0].detect_time.replace(tzinfo=None)
    assert newest.expected_sequence == stored[0].expected_sequence


async def test_a_markets_gaps_in_a_window(
    stub: pb_grpc.MarketServiceAsyncStub, stored: list[FeedGapRecord]
) -> None:
    of_a = await stub.ListFeedGaps(pb.ListFeedGapsRequest(tickers=[A.ticker]))
    assert _ids(of_a) == [g.gap_id for g in stored if g.ticker in (A.ticker, "")]
    # Open at second 4 (the first three recovered then), detected before second 7.
    window = await stub.ListFeedGaps(
        pb.ListFeedGapsRequest(
            tickers=[A.ticker], start_time=timestamp(at(4)), end_time=timestamp(at(7))
        )
    )
    assert _ids(window) == [
        g.gap_id for g in stored if g.ticker in (A.ticker, "") and at(3) <= g.detect_time < at(7)
    ]


async def test_bad_requests_name_the_field(
    stub: pb_grpc.MarketServiceAsyncStub, stored: list[FeedGapRecord]
) -> None:
    first = await stub.ListFeedGaps(pb.ListFeedGapsRequest(page_size=2))
    for request, field in [
        (pb.ListFeedGapsRequest(page_size=1001), "page_size"),
        (pb.ListFeedGapsRequest(tickers=[A.ticker, ""]), "tickers[1]"),
        (
            pb.ListFeedGapsRequest(start_time=timestamp(at(2)), end_time=timestamp(at(1))),
            "end_time",
        ),
        # A token made for another query, and one the server never made.
        (
            pb.ListFeedGapsRequest(tickers=[A.ticker], page_token=first.next_page_token),
            "page_token",
        ),
        (pb.ListFeedGapsRequest(page_token="bm90IGEgdG9rZW4"), "page_token"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListFeedGaps(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(refused.value) == [field]
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.ListFeedGaps(pb.ListFeedGapsRequest(tickers=["KXNOPE-1"]))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "KXNOPE-1" in str(status_details(missing.value))
