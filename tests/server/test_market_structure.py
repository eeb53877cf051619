"""ListEvents, GetEvent, ListSeries, GetSeries over a real server, on SQLite and PostgreSQL.

Events and series arrive the way ingest sends them: in IngestService.Publish batches."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from kfeed.v1 import ingest_service_pb2
from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_server.transport.convert import event_to_proto, market_to_proto, series_to_proto
from tests.support.factories import BASE_TIME, make_event, make_market, make_series
from tests.support.servers import PublishSession, bad_request_fields

SERIES = [
    make_series("KXHIGHNY", title="NYC high", category="Climate", tags=("weather", "nyc")),
    make_series("KXCPI", title="CPI", category="Economics", fee_multiplier_ten_thousandths=5_000),
    make_series("KXRAIN", title="Rain", category="Climate"),
]
EVENTS = [
    make_event(
        f"KXHIGHNY-26NOV0{day}",
        series_ticker="KXHIGHNY",
        title=f"High on Nov {day}",
        mutually_exclusive=True,
        strike_time=BASE_TIME + timedelta(days=day),
    )
    for day in range(1, 6)
] + [make_event("KXCPI-26NOV", series_ticker="KXCPI", sub_title="October CPI")]
MARKETS = [
    make_market(f"KXHIGHNY-26NOV01-T{t}", event_ticker="KXHIGHNY-26NOV01", series_ticker="KXHIGHNY")
    for t in (52, 50, 51)
] + [make_market("KXCPI-26NOV-T0.3", event_ticker="KXCPI-26NOV", series_ticker="KXCPI")]


@pytest.fixture
async def stub(
    publisher: PublishSession, channel: grpc.aio.Channel
) -> pb_grpc.MarketServiceAsyncStub:
    ack = await publisher.send(
        ingest_service_pb2.PublishRequest(
            batch_id=1,
            producer="tests",
            series=[series_to_proto(s) for s in SERIES],
            events=[event_to_proto(e) for e in EVENTS],
            markets=[market_to_proto(m) for m in MARKETS],
        )
    )
    assert ack.code == 0, ack.message
    return pb_grpc.MarketServiceStub(channel)


async def test_get_event_returns_the_event_and_its_markets_in_ticker_order(
    stub: pb_grpc.MarketServiceAsyncStub,
) -> None:
    response = await stub.GetEvent(pb.GetEventRequest(event_ticker="KXHIGHNY-26NOV01"))
    assert response.event == event_to_proto(EVENTS[0])
    assert response.event.strike_time.ToDatetime().replace(tzinfo=BASE_TIME.tzinfo) == (
        BASE_TIME + timedelta(days=1)
    )
    assert [m.ticker for m in response.markets] == [
        "KXHIGHNY-26NOV01-T50",
        "KXHIGHNY-26NOV01-T51",
        "KXHIGHNY-26NOV01-T52",
    ]
    empty = await stub.GetEvent(pb.GetEventRequest(event_ticker="KXHIGHNY-26NOV02"))
    assert empty.event.title == "High on Nov 2"
    assert list(empty.markets) == []


async def test_list_events_pages_in_ticker_order_and_filters_by_series(
    stub: pb_grpc.MarketServiceAsyncStub,
) -> None:
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListEvents(pb.ListEventsRequest(page_size=2, page_token=token))
        assert len(page.events) <= 2
        seen += [e.event_ticker for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(e.event_ticker for e in EVENTS)

    of_cpi = await stub.ListEvents(pb.ListEventsRequest(series_ticker="KXCPI"))
    assert [e.event_ticker for e in of_cpi.events] == ["KXCPI-26NOV"]
    assert of_cpi.events[0].sub_title == "October CPI"
    assert of_cpi.next_page_token == ""


async def test_get_and_list_series(stub: pb_grpc.MarketServiceAsyncStub) -> None:
    got = await stub.GetSeries(pb.GetSeriesRequest(series_ticker="KXHIGHNY"))
    assert got.series == series_to_proto(SERIES[0])
    assert list(got.series.tags) == ["weather", "nyc"]

    listed = await stub.ListSeries(pb.ListSeriesRequest())
    assert [s.ticker for s in listed.series] == ["KXCPI", "KXHIGHNY", "KXRAIN"]
    assert listed.series[0].fee_multiplier_ten_thousandths == 5_000

    first = await stub.ListSeries(pb.ListSeriesRequest(category="Climate", page_size=1))
    assert [s.ticker for s in first.series] == ["KXHIGHNY"]
    second = await stub.ListSeries(
        pb.ListSeriesRequest(category="Climate", page_size=1, page_token=first.next_page_token)
    )
    assert [s.ticker for s in second.series] == ["KXRAIN"]
    assert second.next_page_token == ""


async def test_a_republished_event_is_updated_not_duplicated(
    stub: pb_grpc.MarketServiceAsyncStub, publisher: PublishSession
) -> None:
    changed = make_event("KXCPI-26NOV", series_ticker="KXCPI", title="CPI, revised")
    await publisher.send(
        ingest_service_pb2.PublishRequest(
            batch_id=2, producer="tests", events=[event_to_proto(changed)]
        )
    )
    response = await stub.ListEvents(pb.ListEventsRequest(series_ticker="KXCPI"))
    assert [e.title for e in response.events] == ["CPI, revised"]


@pytest.mark.parametrize(
    ("call", "resource"),
    [
        (lambda s: s.GetEvent(pb.GetEventRequest(event_ticker="KXNOPE-1")), "KXNOPE-1"),
        (lambda s: s.GetSeries(pb.GetSeriesRequest(series_ticker="KXNOPE")), "KXNOPE"),
    ],
    ids=["GetEvent", "GetSeries"],
)
async def test_unknown_event_or_series_is_not_found(
    stub: pb_grpc.MarketServiceAsyncStub, call: object, resource: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(stub)  # type: ignore[operator]
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert resource in (caught.value.details() or "")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.GetEvent(pb.GetEventRequest()), "event_ticker"),
        (lambda s: s.GetEvent(pb.GetEventRequest(event_ticker="A\x00B")), "event_ticker"),
        (lambda s: s.GetSeries(pb.GetSeriesRequest(series_ticker=" X")), "series_ticker"),
        (lambda s: s.ListEvents(pb.ListEventsRequest(page_size=-1)), "page_size"),
        (lambda s: s.ListEvents(pb.ListEventsRequest(page_size=1001)), "page_size"),
        (lambda s: s.ListEvents(pb.ListEventsRequest(series_ticker="\n")), "series_ticker"),
        (lambda s: s.ListEvents(pb.ListEventsRequest(page_token="garbage!")), "page_token"),
        (lambda s: s.ListSeries(pb.ListSeriesRequest(category="x" * 500)), "category"),
        (lambda s: s.ListSeries(pb.ListSeriesRequest(category="a\x07")), "category"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    stub: pb_grpc.MarketServiceAsyncStub, call: object, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(stub)  # type: ignore[operator]
    assert bad_request_fields(caught.value) == [field]


async def test_a_page_token_of_another_filter_is_refused(
    stub: pb_grpc.MarketServiceAsyncStub,
) -> None:
    first = await stub.ListEvents(pb.ListEventsRequest(page_size=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListEvents(
            pb.ListEventsRequest(
                page_size=1, series_ticker="KXCPI", page_token=first.next_page_token
            )
        )
    assert bad_request_fields(caught.value) == ["page_token"]
