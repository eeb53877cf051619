"""Fuzz every RPC of the kfeed services with hostile values, against a real server on SQLite
and PostgreSQL: never INTERNAL or UNKNOWN, never exception text in a status, the server stays
SERVING, and nothing invalid is stored.

The RPCs and their request fields come from the service descriptors, so an RPC or field added
later is fuzzed without touching this file. Requests are built field by field from hostile
pools (NUL and control characters, huge strings, out-of-range Timestamps and Durations, edge
integers, unknown enum numbers, NaN) mixed with valid-looking values (a stored market, a real
strategy) so the checks past the first are reached too; some bodies are random bytes. RPCs not
built yet may answer UNIMPLEMENTED.

Hypothesis runs in a worker thread with a blocking channel while the server serves on the
test's event loop.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kfeed.v1 import backtest_service_pb2, ingest_service_pb2, market_service_pb2
from kfeed_server.app import KfeedServer
from kfeed_server.records import Side
from kfeed_server.transport.requests import text_problem, ticker_problem
from tests.support.factories import make_market, make_snapshot, make_trade
from tests.support.servers import PublishSession

SERVICES = [
    service
    for module in (market_service_pb2, backtest_service_pb2, ingest_service_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
]
METHODS = [(service, method) for service in SERVICES for method in service.methods]
# Modest for CI (both databases in ≈15 s); KFEED_FUZZ_EXAMPLES=500 for a long local run.
EXAMPLES_PER_RPC = int(os.environ.get("KFEED_FUZZ_EXAMPLES", "25"))
RAW_BODIES_PER_RPC = max(1, EXAMPLES_PER_RPC // 5)
CALL_TIMEOUT = 5.0
STREAM_TIMEOUT = 0.5

TICKER = "KXFUZZ-26DEC05-T1"
ACCEPTABLE = frozenset(grpc.StatusCode) - {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# What an exception's text looks like when grpc or Python leaks it into a status.
LEAK = re.compile(r"Traceback|Unexpected <class|Exception (calling|iterating)|File \"|Error\(")

HOSTILE_STRINGS = [
    "",
    "\x00",
    "KX\x00NUL",
    "A\nB",
    " KXLEAD",
    "KXTRAIL ",
    "\x7f\x85\u2028",
    "é🙂",
    "%s%n{}",
    "'; DROP TABLE markets; --",
    "x" * 200_000,
    TICKER,
    "threshold",
    "ticker",
    "total_pnl",
]
INT32 = [0, 1, -1, 2**31 - 1, -(2**31)]
UINT32 = [0, 1, 2**32 - 1]
INT64 = [0, 1, -1, 10_000, 10_001, 2**53 + 1, 2**63 - 1, -(2**63)]
UINT64 = [0, 1, 2**63, 2**64 - 1]
DOUBLES = [0.0, -1.0, 0.5, math.nan, math.inf, -math.inf, 1e308, 5e-324]
ENUMS = [0, 1, 2, 3, 99, -1, 2**31 - 1]
TIMESTAMP_SECONDS = [0, 1_764_892_800, -62_135_596_801, 253_402_300_800, 2**63 - 1, -(2**63)]
NANOS = [0, 999_999_999, 1_000_000_000, -1, 2**31 - 1]


def _scalar(field: pb_descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=12))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from(ENUMS)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(st.sampled_from(DOUBLES), st.floats(-1e6, 1e6))
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.one_of(st.sampled_from(UINT32), st.integers(0, 1000))
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.sampled_from(UINT64), st.integers(0, 10**6))
    if kind in (
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SFIXED32,
    ):
        return st.one_of(st.sampled_from(INT32), st.integers(-1000, 1000))
    return st.one_of(st.sampled_from(INT64), st.integers(-(10**6), 10**6))


def _message(descriptor: pb_descriptor.Descriptor, depth: int) -> st.SearchStrategy[Message]:
    """Requests (or sub-messages) of ``descriptor``'s type with any subset of fields set."""
    cls = GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Timestamp":
        return st.builds(
            cls, seconds=st.sampled_from(TIMESTAMP_SECONDS), nanos=st.sampled_from(NANOS)
        )
    if descriptor.full_name == "google.protobuf.Duration":
        return st.builds(
            cls, seconds=st.sampled_from([0, 1, -1, 86_400, 86_401, 2**63 - 1]),
            nanos=st.sampled_from([0, 1, -1, 999_999_999, 10**9]),
        )  # fmt: skip
    fields: dict[str, tuple[pb_descriptor.FieldDescriptor, st.SearchStrategy[Any]]] = {}
    for field in descriptor.fields:
        value = _field_value(field, depth)
        if value is not None:
            fields[field.name] = (field, value)

    @st.composite
    def build(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Message:
        message = cls()
        names = draw(st.lists(st.sampled_from(sorted(fields)), unique=True)) if fields else []
        for name in names:
            field, value = fields[name]
            _set(message, field, draw(value))
        return message

    return build()


def _field_value(field: pb_descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any] | None:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = (
            field.message_type.fields_by_name["key"],
            field.message_type.fields_by_name["value"],
        )
        value_strategy = _field_value(value, depth)
        if value_strategy is None:
            return None
        return st.dictionaries(_scalar(key), value_strategy, max_size=3)
    if field.message_type is not None:
        if depth >= 3:
            return None
        single: st.SearchStrategy[Any] = _message(field.message_type, depth + 1)
    else:
        single = _scalar(field)
    return st.lists(single, max_size=3) if field.is_repeated else single


def _set(message: Message, field: pb_descriptor.FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        for key, item in value.items():
            if isinstance(item, Message):
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        if field.message_type is not None:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.message_type is not None:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _outcome(call: Callable[[], Any], streaming: bool) -> grpc.RpcError | None:
    """Run a call; the error it ended with, if any (a stream's deadline is not an error)."""
    try:
        result = call()
        if streaming:
            for count, _ in enumerate(result):
                if count >= 3:
                    result.cancel()
                    break
    except grpc.RpcError as error:
        if streaming and error.code() in (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.CANCELLED,
        ):
            return None
        return error
    return None


def _check(error: grpc.RpcError | None, what: str) -> None:
    if error is None:
        return
    code, details = error.code(), error.details() or ""
    assert code in ACCEPTABLE, f"{what}: {code.name} {details!r}"
    assert not LEAK.search(details), f"{what}: internals in {details!r}"


def _call(
    channel: grpc.Channel,
    method: pb_descriptor.MethodDescriptor,
    body: bytes,
) -> grpc.RpcError | None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    if method.client_streaming:
        assert method.server_streaming, f"{path}: client-streaming unary RPCs are not fuzzed yet"
        stream: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(path)
        return _outcome(lambda: stream(iter([body]), timeout=CALL_TIMEOUT), streaming=True)
    if method.server_streaming:
        server_stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
        return _outcome(lambda: server_stream(body, timeout=STREAM_TIMEOUT), streaming=True)
    unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
    return _outcome(lambda: unary(body, timeout=CALL_TIMEOUT), streaming=False)


def _fuzz_method(port: int, method: pb_descriptor.MethodDescriptor) -> None:
    """Run hypothesis over one RPC (blocking: call it in a thread)."""
    requests = _message(method.input_type, depth=0)
    fuzz_settings = settings(
        max_examples=EXAMPLES_PER_RPC,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:

        @fuzz_settings
        @given(request=requests)
        def hostile_request(request: Message) -> None:
            _check(
                _call(channel, method, request.SerializeToString()),
                f"{method.name}({request})"[:300],
            )

        @settings(fuzz_settings, max_examples=RAW_BODIES_PER_RPC)
        @given(body=st.binary(min_size=1, max_size=64))
        def raw_body(body: bytes) -> None:
            _check(_call(channel, method, body), f"{method.name} raw {body!r}")

        hostile_request()
        raw_body()


async def _publish_valid_data(server: KfeedServer) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    async with channel, PublishSession(channel) as session:
        ack = await session.publish(
            markets=[make_market(TICKER)],
            snapshots=[make_snapshot(TICKER, i) for i in range(5)],
            trades=[make_trade(TICKER, i) for i in range(3)],
        )
        assert ack.code == 0


async def _assert_nothing_invalid_stored(server: KfeedServer) -> None:
    repositories = server.repositories
    markets = await repositories.markets.list_markets(limit=10_000)
    for market in markets.items:
        assert ticker_problem(market.ticker) is None, market.ticker
        for text in (market.title, market.subtitle, market.rules_primary, market.event_ticker):
            assert text_problem(text) is None, (market.ticker, text[:50])
        value = market.settlement_value
        assert value is None or 0 <= value <= 10_000, market
        trades = await repositories.trades.list_range(
            market.ticker, start=None, end=None, limit=10_000
        )
        for trade in trades.items:
            assert trade.yes_price + trade.no_price == 10_000, trade
            assert trade.count >= 0, trade
            assert trade.taker_side in set(Side), trade
        snapshots = await repositories.snapshots.list_range(
            market.ticker, start=None, end=None, limit=10_000
        )
        for snapshot in snapshots.items:
            prices = (snapshot.yes_bid, snapshot.yes_ask, snapshot.no_bid, snapshot.no_ask)
            assert all(p is None or 0 <= p <= 10_000 for p in prices), snapshot


@pytest.mark.timeout(120)
async def test_every_rpc_survives_hostile_requests(kfeed_server: KfeedServer) -> None:
    assert len(METHODS) >= 20, [m.name for _, m in METHODS]
    await _publish_valid_data(kfeed_server)
    for _, method in METHODS:
        await asyncio.to_thread(_fuzz_method, kfeed_server.port, method)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{kfeed_server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    await _assert_nothing_invalid_stored(kfeed_server)
