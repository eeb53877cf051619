"""StreamTrades: stored trades, one caught-up marker, then live trades as Publish commits them;
resume exactly; batching; bad input. A real server fed by real Publish batches, on both
databases."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from google.protobuf import duration_pb2

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.records import TradeRecord
from kfeed_server.transport.convert import timestamp
from tests.support.factories import at, make_market, make_snapshot, make_trade
from tests.support.servers import PublishSession, bad_request_fields, serving

A = make_market("KXTAPE-A")
B = make_market("KXTAPE-B", event_ticker="EV-TAPE-B", series_ticker="SER-TAPE-B")
Messages = list[pb.StreamTradesResponse]
Stream = grpc.aio.UnaryStreamCall[pb.StreamTradesRequest, pb.StreamTradesResponse]


def trades(ticker: str, start: int, stop: int) -> list[TradeRecord]:
    return [make_trade(ticker, i) for i in range(start, stop)]


async def read(stream: Stream) -> pb.StreamTradesResponse:
    message = await asyncio.wait_for(stream.read(), timeout=10)
    assert isinstance(message, pb.StreamTradesResponse), message
    return message


async def read_until(stream: Stream, done: Callable[[Messages], bool]) -> Messages:
    messages: Messages = []
    while not done(messages):
        messages.append(await read(stream))
    return messages


def trade_ids(messages: Messages) -> list[str]:
    ids: list[str] = []
    for message in messages:
        if message.HasField("trade"):
            ids.append(message.trade.trade_id)
        elif message.HasField("trade_batch"):
            ids += [t.trade_id for t in message.trade_batch.trades]
    return ids


def caught_up(messages: Messages) -> bool:
    return bool(messages) and messages[-1].HasField("caught_up")


def has_trades(n: int) -> Callable[[Messages], bool]:
    return lambda messages: len(trade_ids(messages)) >= n


@pytest.fixture
async def stub(channel: grpc.aio.Channel) -> pb_grpc.MarketServiceAsyncStub:
    return pb_grpc.MarketServiceStub(channel)


@pytest.fixture
async def stored(publisher: PublishSession) -> None:
    """Ten trades of A and five of B, in two batches."""
    await publisher.publish(markets=[A, B], trades=trades(A.ticker, 0, 10))
    await publisher.publish(trades=trades(B.ticker, 0, 5))


async def test_replay_then_caught_up_then_live(
    stub: pb_grpc.MarketServiceAsyncStub, publisher: PublishSession, stored: None
) -> None:
    stream = stub.StreamTrades(
        pb.StreamTradesRequest(tickers=[A.ticker], start_time=timestamp(at(3)))
    )
    history = await read_until(stream, caught_up)
    assert trade_ids(history) == [t.trade_id for t in trades(A.ticker, 3, 10)]
    assert history[-1].caught_up.replayed_count == 7
    # A resent trade is stored once and not streamed again; snapshots never reach the tape.
    await publisher.publish(
        trades=[*trades(A.ticker, 9, 13), *trades(B.ticker, 5, 7)],
        snapshots=[make_snapshot(A.ticker, 1)],
    )
    live = await read_until(stream, has_trades(3))
    assert trade_ids(live) == [t.trade_id for t in trades(A.ticker, 10, 13)]
    assert live[0].trade.yes_price.ten_thousandths == 4010
    assert all(m.resume_token for m in [*history, *live])
    stream.cancel()


async def test_resume_token_continues_exactly_after_the_message(
    stub: pb_grpc.MarketServiceAsyncStub, publisher: PublishSession, stored: None
) -> None:
    first = stub.StreamTrades(pb.StreamTradesRequest(start_time=timestamp(at(0))))
    received = await read_until(first, has_trades(6))
    first.cancel()
    await publisher.publish(trades=trades(A.ticker, 10, 12))
    second = stub.StreamTrades(pb.StreamTradesRequest(resume_token=received[-1].resume_token))
    rest = await read_until(second, caught_up)
    second.cancel()
    everything = [*trades(A.ticker, 0, 10), *trades(B.ticker, 0, 5), *trades(A.ticker, 10, 12)]
    assert trade_ids(received) + trade_ids(rest) == [t.trade_id for t in everything]


async def test_batches_of_max_batch_size_resume_after_their_last_trade(
    stub: pb_grpc.MarketServiceAsyncStub, publisher: PublishSession, stored: None
) -> None:
    stream = stub.StreamTrades(
        pb.StreamTradesRequest(series_ticker=A.series_ticker, start_time=timestamp(at(0)),
                               max_batch_size=4)
    )  # fmt: skip
    history = await read_until(stream, caught_up)
    # Ten trades of A replayed in one run: batches of 4, 4 and 2, then the marker.
    assert [len(m.trade_batch.trades) for m in history[:-1]] == [4, 4, 2]
    await publisher.publish(trades=trades(A.ticker, 10, 15))
    live = await read_until(stream, has_trades(5))
    stream.cancel()
    assert trade_ids(live) == [t.trade_id for t in trades(A.ticker, 10, 15)]
    resumed = stub.StreamTrades(pb.StreamTradesRequest(resume_token=history[0].resume_token))
    rest = await read_until(resumed, caught_up)
    resumed.cancel()
    assert trade_ids(rest)[0] == trades(A.ticker, 4, 5)[0].trade_id


async def test_a_snapshot_token_does_not_resume_trades(
    stub: pb_grpc.MarketServiceAsyncStub, publisher: PublishSession, stored: None
) -> None:
    await publisher.publish(snapshots=[make_snapshot(A.ticker, 1)])
    snapshots = stub.StreamSnapshots(pb.StreamSnapshotsRequest(start_time=timestamp(at(0))))
    first = await asyncio.wait_for(snapshots.read(), timeout=10)
    snapshots.cancel()
    assert isinstance(first, pb.StreamSnapshotsResponse)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await read(stub.StreamTrades(pb.StreamTradesRequest(resume_token=first.resume_token)))
    assert bad_request_fields(error.value) == ["resume_token"]


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (pb.StreamTradesRequest(tickers=["bad ticker\x00"]), "tickers[0]"),
        (pb.StreamTradesRequest(event_ticker="\x01"), "event_ticker"),
        (pb.StreamTradesRequest(resume_token="garbage!"), "resume_token"),
        (pb.StreamTradesRequest(max_batch_size=-1), "max_batch_size"),
        (pb.StreamTradesRequest(max_batch_size=10**9), "max_batch_size"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    stub: pb_grpc.MarketServiceAsyncStub, request_message: pb.StreamTradesRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await read(stub.StreamTrades(request_message))
    assert bad_request_fields(error.value) == [field]


async def test_out_of_range_start_time_and_unknown_ticker(
    stub: pb_grpc.MarketServiceAsyncStub, stored: None
) -> None:
    request = pb.StreamTradesRequest()
    request.start_time.seconds = 10**12
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await read(stub.StreamTrades(request))
    assert bad_request_fields(error.value) == ["start_time"]
    with pytest.raises(grpc.aio.AioRpcError) as not_found:
        await read(stub.StreamTrades(pb.StreamTradesRequest(tickers=["KXNOPE"])))
    assert not_found.value.code() == grpc.StatusCode.NOT_FOUND


async def test_heartbeats_carry_the_last_position(
    stub: pb_grpc.MarketServiceAsyncStub, stored: None
) -> None:
    stream = stub.StreamTrades(
        pb.StreamTradesRequest(start_time=timestamp(at(0)), heartbeat_interval=millis(100))
    )
    history = await read_until(stream, caught_up)
    beats = await read_until(stream, lambda m: len(m) >= 3)
    stream.cancel()
    assert [m.WhichOneof("event") for m in beats] == ["heartbeat"] * 3
    assert {b.resume_token for b in beats} == {history[-1].resume_token}


def millis(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


@pytest.fixture
async def small_queue_server(database_url: str) -> AsyncIterator[KfeedServer]:
    config = ServerConfig(
        listen="127.0.0.1:0", database_url=database_url, subscriber_queue_capacity=100
    )
    async with serving(config) as server:
        yield server


async def test_a_stalled_subscriber_choosing_resource_exhausted_resumes_from_its_token(
    small_queue_server: KfeedServer,
) -> None:
    address = f"127.0.0.1:{small_queue_server.port}"
    # Without BDP probing a client that stops reading lets the server write only ~100 KB.
    stalled_channel = grpc.aio.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
    stalled = pb_grpc.MarketServiceStub(stalled_channel).StreamTrades(
        pb.StreamTradesRequest(overflow_policy=pb.OVERFLOW_POLICY_RESOURCE_EXHAUSTED)
    )
    await read_until(stalled, caught_up)
    total = 4_000
    async with grpc.aio.insecure_channel(address) as channel:
        publisher = PublishSession(channel)
        await publisher.publish(markets=[A])
        for start in range(0, total, 250):
            await publisher.publish(trades=trades(A.ticker, start, start + 250))
        await publisher.close()
        received: Messages = []

        async def read_to_the_end() -> None:
            while True:
                received.append(await read(stalled))

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_to_the_end()
        await stalled_channel.close()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        token = re.search(r"resume_token '([^']+)'", caught.value.details() or "")
        assert token is not None
        resumed = pb_grpc.MarketServiceStub(channel).StreamTrades(
            pb.StreamTradesRequest(resume_token=token.group(1))
        )
        rest = await read_until(resumed, caught_up)
        resumed.cancel()
    assert trade_ids(received) + trade_ids(rest) == [t.trade_id for t in trades(A.ticker, 0, total)]
