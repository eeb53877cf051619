"""Hostile requests get INVALID_ARGUMENT naming the field, before anything reaches a query.

Real server over loopback, on SQLite and PostgreSQL (PostgreSQL refuses NUL in text, so a NUL
that got through would surface there as INTERNAL).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from kfeed.v1 import backtest_service_pb2 as bpb
from kfeed.v1 import backtest_service_pb2_grpc as bpb_grpc
from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.security import SecurityConfig
from kfeed_server.transport.convert import MAX_TIMESTAMP_SECONDS, MIN_TIMESTAMP_SECONDS
from kfeed_server.transport.errors import InvalidArgument
from kfeed_server.transport.requests import RequestTokens, new_token_key
from tests.support.factories import make_market, make_snapshot
from tests.support.servers import PublishSession, bad_request_fields, serving, status_details

TICKER = "KXHOSTILE-26DEC05-T1"

BAD_TIMESTAMPS = [
    pytest.param(timestamp_pb2.Timestamp(seconds=MAX_TIMESTAMP_SECONDS + 1), id="year-10000"),
    pytest.param(timestamp_pb2.Timestamp(seconds=MIN_TIMESTAMP_SECONDS - 1), id="before-year-1"),
    pytest.param(timestamp_pb2.Timestamp(seconds=0, nanos=-1), id="nanos-negative"),
    pytest.param(timestamp_pb2.Timestamp(seconds=0, nanos=1_000_000_000), id="nanos-1e9"),
    pytest.param(timestamp_pb2.Timestamp(seconds=2**63 - 1), id="int64-max"),
]


@pytest.fixture
async def published(publisher: PublishSession) -> None:
    ack = await publisher.publish(
        markets=[make_market(TICKER)], snapshots=[make_snapshot(TICKER, i) for i in range(3)]
    )
    assert ack.code == 0, ack


@pytest.fixture
def market_stub(channel: grpc.aio.Channel) -> pb_grpc.MarketServiceAsyncStub:
    return pb_grpc.MarketServiceStub(channel)


@pytest.fixture
def backtest_stub(channel: grpc.aio.Channel) -> bpb_grpc.BacktestServiceAsyncStub:
    return bpb_grpc.BacktestServiceStub(channel)


async def _refused_fields(call: Any) -> list[str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return bad_request_fields(caught.value)


async def _first_stream_error(stream: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stream:
            pass
    return caught.value


@pytest.mark.parametrize("stamp", BAD_TIMESTAMPS)
async def test_out_of_range_timestamps_are_invalid_argument(
    market_stub: pb_grpc.MarketServiceAsyncStub,
    backtest_stub: bpb_grpc.BacktestServiceAsyncStub,
    published: None,
    stamp: timestamp_pb2.Timestamp,
) -> None:
    request = pb.ListSnapshotsRequest(ticker=TICKER, start_time=stamp)
    assert await _refused_fields(market_stub.ListSnapshots(request)) == ["start_time"]
    trades = pb.ListTradesRequest(ticker=TICKER, end_time=stamp)
    assert await _refused_fields(market_stub.ListTrades(trades)) == ["end_time"]
    stream = market_stub.StreamSnapshots(pb.StreamSnapshotsRequest(start_time=stamp))
    assert bad_request_fields(await _first_stream_error(stream)) == ["start_time"]
    config = bpb.BacktestConfig(strategy="threshold", tickers=[TICKER], end_time=stamp)
    create = backtest_stub.CreateBacktest(bpb.CreateBacktestRequest(config=config))
    assert await _refused_fields(create) == ["config.end_time"]


@pytest.mark.parametrize(
    "hostile",
    ["A\x00B", "\x00", "A\nB", " LEADING", "TRAILING ", "A\x7fB", "A\u0085B", "X" * 1_000_000],
)
async def test_hostile_strings_are_invalid_argument(
    market_stub: pb_grpc.MarketServiceAsyncStub,
    backtest_stub: bpb_grpc.BacktestServiceAsyncStub,
    hostile: str,
) -> None:
    assert await _refused_fields(market_stub.GetMarket(pb.GetMarketRequest(ticker=hostile))) == [
        "ticker"
    ]
    listing = pb.ListMarketsRequest(event_ticker=hostile)
    assert await _refused_fields(market_stub.ListMarkets(listing)) == ["event_ticker"]
    stream = market_stub.StreamSnapshots(pb.StreamSnapshotsRequest(tickers=["OK", hostile]))
    assert bad_request_fields(await _first_stream_error(stream)) == ["tickers[1]"]
    for call, field in (
        (backtest_stub.GetBacktest(bpb.GetBacktestRequest(backtest_id=hostile)), "backtest_id"),
        (
            backtest_stub.CancelBacktest(bpb.CancelBacktestRequest(backtest_id=hostile)),
            "backtest_id",
        ),
        (backtest_stub.ListBacktests(bpb.ListBacktestsRequest(strategy=hostile)), "strategy"),
        (
            backtest_stub.CreateBacktest(
                bpb.CreateBacktestRequest(config=bpb.BacktestConfig(strategy=hostile))
            ),
            "config.strategy",
        ),
        (
            backtest_stub.CreateBacktest(
                bpb.CreateBacktestRequest(
                    config=bpb.BacktestConfig(strategy="threshold", tickers=[hostile])
                )
            ),
            "config.tickers[0]",
        ),
    ):
        assert await _refused_fields(call) == [field]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _nested(depth: int) -> bytes:
    return b'{"c":' + b"[" * depth + b"]" * depth + b',"q":"x"}'


TAMPERED_PAGE_TOKENS = [
    _b64(json.dumps({"c": [{"t": "2026-01-01T00:00:00"}, 1], "q": "x"}).encode()),  # naive
    _b64(json.dumps({"c": [{"t": "2026-01-01T00:00:00+00:00"}, 2**70], "q": "x"}).encode()),
    _b64(json.dumps({"c": ["A\x00B"], "q": "x"}).encode()),
    _b64(_nested(100_000)),
    _b64(b"\x00" * 16 + b'{"c":[1],"q":"x"}'),  # shaped like a signed token, bad MAC
    "%%%not-base64",
    "A" * 100_000,
    "é",
]


@pytest.mark.parametrize("token", TAMPERED_PAGE_TOKENS)
async def test_tampered_page_tokens_are_invalid_argument(
    market_stub: pb_grpc.MarketServiceAsyncStub,
    backtest_stub: bpb_grpc.BacktestServiceAsyncStub,
    published: None,
    token: str,
) -> None:
    for call in (
        market_stub.ListSnapshots(pb.ListSnapshotsRequest(ticker=TICKER, page_token=token)),
        market_stub.ListTrades(pb.ListTradesRequest(ticker=TICKER, page_token=token)),
        market_stub.ListMarkets(pb.ListMarketsRequest(page_token=token)),
        backtest_stub.ListBacktests(bpb.ListBacktestsRequest(page_token=token)),
        backtest_stub.ListExecutions(
            bpb.ListExecutionsRequest(backtest_id="bt-1", page_token=token)
        ),
    ):
        assert await _refused_fields(call) == ["page_token"]


async def test_a_page_token_with_one_byte_changed_is_refused(
    market_stub: pb_grpc.MarketServiceAsyncStub, published: None
) -> None:
    first = await market_stub.ListSnapshots(pb.ListSnapshotsRequest(ticker=TICKER, page_size=1))
    token = first.next_page_token
    assert token
    second = await market_stub.ListSnapshots(
        pb.ListSnapshotsRequest(ticker=TICKER, page_size=1, page_token=token)
    )
    assert len(second.snapshots) == 1
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    refused = market_stub.ListSnapshots(
        pb.ListSnapshotsRequest(ticker=TICKER, page_size=1, page_token=flipped)
    )
    assert await _refused_fields(refused) == ["page_token"]


@pytest.mark.parametrize(
    "token",
    [
        _b64(b"kfeed.snapshot:9223372036854775808"),  # the old unsigned format, id 2^63
        _b64(b"kfeed.snapshot:1"),
        # A validly signed id ≥ 2^63 under another key: refused by the MAC, like any forgery.
        RequestTokens(new_token_key()).encode_resume_token(2**64 - 1),
        "A" * 10_000,
        "",
    ],
    # Stable ids: the signed token differs per process, and xdist workers must collect alike.
    ids=["unsigned-2^63", "unsigned-1", "other-key-2^64-1", "10000-chars", "empty"],
)
async def test_forged_resume_tokens_are_invalid_argument(
    market_stub: pb_grpc.MarketServiceAsyncStub, published: None, token: str
) -> None:
    stream = market_stub.StreamSnapshots(pb.StreamSnapshotsRequest(resume_token=token or "="))
    assert bad_request_fields(await _first_stream_error(stream)) == ["resume_token"]


async def test_a_resume_token_id_beyond_int64_is_refused_even_when_signed(
    kfeed_server: KfeedServer, market_stub: pb_grpc.MarketServiceAsyncStub, published: None
) -> None:
    forged = kfeed_server.tokens.encode_resume_token(2**63)
    stream = market_stub.StreamSnapshots(pb.StreamSnapshotsRequest(resume_token=forged))
    assert bad_request_fields(await _first_stream_error(stream)) == ["resume_token"]


def _channel(server: KfeedServer) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")


@pytest.fixture
async def raw_channel(kfeed_server: KfeedServer) -> AsyncIterator[grpc.aio.Channel]:
    async with _channel(kfeed_server) as channel:
        yield channel


UNDECODABLE = [b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12" + b"\x80" * 20]


@pytest.mark.parametrize("body", UNDECODABLE)
async def test_undecodable_request_bodies_are_invalid_argument_without_internals(
    raw_channel: grpc.aio.Channel, body: bytes
) -> None:
    unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = raw_channel.unary_unary(
        "/kfeed.v1.MarketService/GetMarket"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(body)
    assert bad_request_fields(caught.value) == ["request"]
    _assert_no_internals(caught.value)

    server_stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = raw_channel.unary_stream(
        "/kfeed.v1.MarketService/StreamSnapshots"
    )
    error = await _first_stream_error(server_stream(body))
    assert bad_request_fields(error) == ["request"]
    _assert_no_internals(error)

    bidi: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = raw_channel.stream_stream(
        "/kfeed.v1.IngestService/Publish"
    )
    call = bidi()
    await call.write(body)
    await call.done_writing()
    error = await _first_stream_error(call)
    assert bad_request_fields(error) == ["request"]
    _assert_no_internals(error)


def _assert_no_internals(error: grpc.aio.AioRpcError) -> None:
    for text in (error.details() or "", status_details(error).message):
        for leak in ("Error", "Traceback", "Exception", "parsing", "<class"):
            assert leak not in text, text


async def test_page_and_resume_tokens_survive_a_restart(database_url: str) -> None:
    """The token key lives in the database: a restarted server (or a replica) accepts the
    tokens an earlier one issued."""
    config = ServerConfig(listen="127.0.0.1:0", database_url=database_url)
    async with serving(config) as first, _channel(first) as channel:
        async with PublishSession(channel) as session:
            ack = await session.publish(
                markets=[make_market(TICKER)],
                snapshots=[make_snapshot(TICKER, i) for i in range(3)],
            )
            assert ack.code == 0
        stub = pb_grpc.MarketServiceStub(channel)
        page = await stub.ListSnapshots(pb.ListSnapshotsRequest(ticker=TICKER, page_size=1))
        resume_token = first.tokens.encode_resume_token(page.snapshots[0].snapshot_id)
    async with serving(config) as second, _channel(second) as channel:
        stub = pb_grpc.MarketServiceStub(channel)
        rest = await stub.ListSnapshots(
            pb.ListSnapshotsRequest(ticker=TICKER, page_size=10, page_token=page.next_page_token)
        )
        first_id = page.snapshots[0].snapshot_id
        assert [s.snapshot_id for s in rest.snapshots] == [first_id + 1, first_id + 2]
        stream = stub.StreamSnapshots(pb.StreamSnapshotsRequest(resume_token=resume_token))
        first_message = await stream.read()
        assert isinstance(first_message, pb.StreamSnapshotsResponse)
        assert first_message.snapshot.snapshot.snapshot_id == first_id + 1
        stream.cancel()


async def test_a_configured_token_key_is_used(database_url: str, tmp_path: Path) -> None:
    key_file = tmp_path / "token.key"
    key_file.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    config = ServerConfig(
        listen="127.0.0.1:0",
        database_url=database_url,
        security=SecurityConfig(token_key_file=key_file),
    )
    outside = RequestTokens(b"0123456789abcdef0123456789abcdef")
    async with serving(config) as server:
        assert server.tokens.encode_resume_token(7) == outside.encode_resume_token(7)


def test_a_resume_token_of_one_stream_never_resumes_another() -> None:
    tokens = RequestTokens(new_token_key())
    trades_token = tokens.encode_resume_token(42, stream="trades")
    assert tokens.decode_resume_token(trades_token, stream="trades") == 42
    for other in ("", "order_books"):
        with pytest.raises(InvalidArgument):
            tokens.decode_resume_token(trades_token, stream=other)
    with pytest.raises(InvalidArgument):
        tokens.decode_resume_token(tokens.encode_resume_token(42), stream="trades")
