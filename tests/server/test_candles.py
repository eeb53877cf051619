"""ListCandles against an independent, straightforward computation from the same stored rows,
on SQLite and PostgreSQL, over a real server.

The reference evaluates the definition in docs/CANDLES.md literally for each candle: the state in
force at an instant is the last snapshot at or before it in (exchange_time, id) order; a candle's
book values are the states at its start and at each distinct snapshot instant inside it; its
trades are those in [start, end); the mean is an exact fraction rounded half up."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Literal

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed.v1 import types_pb2
from kfeed_server.app import KfeedServer
from kfeed_server.records import SnapshotRecord, TradeRecord
from tests.support.factories import make_market, make_snapshot, make_trade
from tests.support.servers import bad_request_fields

TICKER = "KXCANDLE-26NOV01-T50"
# A whole hour: candle boundaries of 1 s … 1 h fall on whole seconds of this clock.
ORIGIN = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)
SPAN = timedelta(hours=3)


def _ts(value: datetime) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(
        seconds=(value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(seconds=1),
        nanos=value.microsecond * 1000,
    )


def _seconds(value: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=value)


def _sub_penny(rng: random.Random) -> int:
    """A price in 1/10,000 USD that is not a whole cent most of the time."""
    return rng.randrange(1, 10_000)


def _history(seed: int) -> tuple[list[SnapshotRecord], list[TradeRecord]]:
    """Snapshots and trades over SPAN after ORIGIN + 10 min (nothing before: candles there have
    no book), with a quiet hour in the middle, snapshots and trades on candle boundaries, several
    snapshots at one instant, sides without a level and sub-penny prices."""
    rng = random.Random(seed)
    snapshots: list[SnapshotRecord] = []
    trades: list[TradeRecord] = []
    t = ORIGIN + timedelta(minutes=10, microseconds=250)
    quiet_from, quiet_to = ORIGIN + timedelta(minutes=70), ORIGIN + timedelta(minutes=130)
    i = 0
    while t < ORIGIN + SPAN:
        if not quiet_from <= t < quiet_to:
            instant = t
            if rng.random() < 0.25:  # exactly on a minute: a 1 s, 1 min candle edge
                instant = instant.replace(second=0, microsecond=0)
            for _ in range(2 if rng.random() < 0.15 else 1):  # same instant, two snapshots
                snapshots.append(
                    make_snapshot(
                        TICKER,
                        i,
                        exchange_time=instant,
                        receive_time=instant + timedelta(microseconds=i + 1),
                        yes_bid=None if rng.random() < 0.1 else _sub_penny(rng),
                        yes_ask=None if rng.random() < 0.1 else _sub_penny(rng),
                        open_interest=None if rng.random() < 0.1 else rng.randrange(0, 10**7),
                        volume=i,
                    )
                )
                i += 1
            for _ in range(rng.choice((0, 0, 1, 3))):
                on_edge = rng.random() < 0.2
                trades.append(
                    make_trade(
                        TICKER,
                        len(trades),
                        create_time=instant.replace(second=0, microsecond=0) if on_edge else t,
                        yes_price=_sub_penny(rng),
                        count=rng.randrange(1, 50_000),
                    )
                )
        t += timedelta(seconds=rng.randrange(1, 90), microseconds=rng.randrange(0, 1_000_000))
    return snapshots, trades


@dataclass(frozen=True)
class Expected:
    start: datetime
    end: datetime
    yes_bid: tuple[int, int, int, int] | None
    yes_ask: tuple[int, int, int, int] | None
    price: tuple[int, int, int, int] | None
    mean_price: int | None
    volume: int
    trade_count: int
    open_interest: int | None


def _ohlc(values: list[int]) -> tuple[int, int, int, int] | None:
    return (values[0], max(values), min(values), values[-1]) if values else None


def reference_candles(
    snapshots: list[SnapshotRecord],
    trades: list[TradeRecord],
    first: datetime,
    interval: timedelta,
    count: int,
) -> list[Expected]:
    def state_at(instant: datetime) -> SnapshotRecord | None:
        earlier = [s for s in snapshots if s.exchange_time <= instant]
        return max(earlier, key=lambda s: (s.exchange_time, s.snapshot_id), default=None)

    candles = []
    for k in range(count):
        a, b = first + k * interval, first + (k + 1) * interval
        instants = [a, *sorted({s.exchange_time for s in snapshots if a < s.exchange_time < b})]
        states = [s for s in map(state_at, instants) if s is not None]
        inside = sorted(
            (t for t in trades if a <= t.create_time < b), key=lambda t: (t.create_time, t.trade_id)
        )
        volume = sum(t.count for t in inside)
        mean = (
            math.floor(
                Fraction(sum(t.yes_price * t.count for t in inside), volume) + Fraction(1, 2)
            )
            if inside
            else None
        )
        candles.append(
            Expected(
                start=a,
                end=b,
                yes_bid=_ohlc([s.yes_bid for s in states if s.yes_bid is not None]),
                yes_ask=_ohlc([s.yes_ask for s in states if s.yes_ask is not None]),
                price=_ohlc([t.yes_price for t in inside]),
                mean_price=mean,
                volume=volume,
                trade_count=len(inside),
                open_interest=states[-1].open_interest if states else None,
            )
        )
    return candles


def _ohlc_of(
    message: types_pb2.Candle, field: Literal["yes_bid", "yes_ask", "price"]
) -> tuple[int, int, int, int] | None:
    if not message.HasField(field):
        return None
    ohlc = getattr(message, field)
    return (
        ohlc.open.ten_thousandths,
        ohlc.high.ten_thousandths,
        ohlc.low.ten_thousandths,
        ohlc.close.ten_thousandths,
    )


def as_expected(message: types_pb2.Candle) -> Expected:
    return Expected(
        start=message.start_time.ToDatetime(tzinfo=UTC),
        end=message.end_time.ToDatetime(tzinfo=UTC),
        yes_bid=_ohlc_of(message, "yes_bid"),
        yes_ask=_ohlc_of(message, "yes_ask"),
        price=_ohlc_of(message, "price"),
        mean_price=message.mean_price.ten_thousandths if message.HasField("mean_price") else None,
        volume=message.volume.hundredths,
        trade_count=message.trade_count,
        open_interest=(
            message.open_interest.hundredths if message.HasField("open_interest") else None
        ),
    )


@dataclass
class Stored:
    stub: pb_grpc.MarketServiceAsyncStub
    snapshots: list[SnapshotRecord]
    trades: list[TradeRecord]


@pytest.fixture
async def stored(kfeed_server: KfeedServer, channel: grpc.aio.Channel) -> Stored:
    snapshots, trades = _history(seed=12)
    repositories = kfeed_server.repositories
    await repositories.ingest.write_batch(
        markets=[make_market(TICKER)], snapshots=snapshots, trades=trades
    )
    # The rows as stored (ids assigned, repeated states left out): what both sides compute from.
    rows = await repositories.snapshots.list_range(TICKER, start=None, end=None, limit=100_000)
    stored_trades = await repositories.trades.list_range(
        TICKER, start=None, end=None, limit=100_000
    )
    assert len(rows.items) > 150
    assert len(stored_trades.items) > 100
    return Stored(pb_grpc.MarketServiceStub(channel), rows.items, stored_trades.items)


async def _all_candles(
    stub: pb_grpc.MarketServiceAsyncStub,
    interval: int,
    start: datetime,
    end: datetime,
    page_size: int = 0,
) -> list[types_pb2.Candle]:
    candles: list[types_pb2.Candle] = []
    token = ""
    while True:
        response = await stub.ListCandles(
            pb.ListCandlesRequest(
                ticker=TICKER,
                start_time=_ts(start),
                end_time=_ts(end),
                interval=_seconds(interval),
                page_size=page_size,
                page_token=token,
            )
        )
        candles += response.candles
        token = response.next_page_token
        if not token:
            return candles


@pytest.mark.parametrize("interval", [60, 7, 3600, 86_400])
async def test_candles_equal_the_reference(stored: Stored, interval: int) -> None:
    start, end = ORIGIN - timedelta(minutes=5), ORIGIN + SPAN + timedelta(minutes=5)
    candles = await _all_candles(stored.stub, interval, start, end)
    step = timedelta(seconds=interval)
    first = (
        datetime(1970, 1, 1, tzinfo=UTC) + (start - datetime(1970, 1, 1, tzinfo=UTC)) // step * step
    )
    count = -((first - end) // step)
    expected = reference_candles(stored.snapshots, stored.trades, first, step, count)
    assert [as_expected(c) for c in candles] == expected
    # The data exercises what the definition is about.
    assert any(c.price is not None for c in expected)
    if interval < 3600:
        assert any(c.price is None and c.yes_bid is not None for c in expected)
    if interval < 86_400:
        assert any(c.yes_bid is None for c in expected)  # before the first snapshot


async def test_one_second_candles_and_pages_equal_the_reference(stored: Stored) -> None:
    start = ORIGIN + timedelta(minutes=9, seconds=58, microseconds=1)  # aligned down to :58
    end = ORIGIN + timedelta(minutes=25)
    candles = await _all_candles(stored.stub, 1, start, end, page_size=97)
    first = ORIGIN + timedelta(minutes=9, seconds=58)
    step = timedelta(seconds=1)
    expected = reference_candles(stored.snapshots, stored.trades, first, step, 15 * 60 + 2)
    assert [as_expected(c) for c in candles] == expected


async def test_boundaries_are_half_open_and_the_state_at_the_start_opens(stored: Stored) -> None:
    """A snapshot exactly at a candle's start opens that candle and is absent from the one
    before; a trade exactly at a start belongs to the candle it starts."""
    on_edge = next(
        s
        for s in stored.snapshots
        if s.exchange_time.second == 0 and s.exchange_time.microsecond == 0
    )
    edge = on_edge.exchange_time
    candles = await _all_candles(
        stored.stub, 60, edge - timedelta(minutes=1), edge + timedelta(minutes=1)
    )
    before, at_edge = (as_expected(c) for c in candles)
    state = max(
        (s for s in stored.snapshots if s.exchange_time == edge), key=lambda s: s.snapshot_id
    )
    if state.yes_bid is not None:
        assert at_edge.yes_bid is not None
        assert at_edge.yes_bid[0] == state.yes_bid
    assert before.end == at_edge.start == edge


async def test_no_trade_intervals_have_no_price_but_keep_the_book(stored: Stored) -> None:
    quiet = await _all_candles(
        stored.stub, 600, ORIGIN + timedelta(minutes=80), ORIGIN + timedelta(minutes=120)
    )
    assert len(quiet) == 4
    for candle in quiet:
        assert not candle.HasField("price")
        assert not candle.HasField("mean_price")
        assert candle.trade_count == 0
        assert candle.volume.hundredths == 0
    # The book in force before the quiet hour holds, flat, through it.
    held = [_ohlc_of(c, "yes_ask") for c in quiet]
    assert held[0] is not None
    assert all(h == held[0] for h in held)
    assert held[0][0] == held[0][1] == held[0][2] == held[0][3]


async def test_a_window_without_end_runs_to_now_and_pages(stored: Stored) -> None:
    start = datetime.now(UTC) - timedelta(minutes=30)
    response = await stored.stub.ListCandles(
        pb.ListCandlesRequest(
            ticker=TICKER, start_time=_ts(start), interval=_seconds(60), page_size=10
        )
    )
    assert len(response.candles) == 10
    assert response.next_page_token
    following = await stored.stub.ListCandles(
        pb.ListCandlesRequest(
            ticker=TICKER,
            start_time=_ts(start),
            interval=_seconds(60),
            page_size=10,
            page_token=response.next_page_token,
        )
    )
    assert following.candles[0].start_time == response.candles[-1].end_time


def _request(**overrides: object) -> pb.ListCandlesRequest:
    fields: dict[str, object] = {
        "ticker": TICKER,
        "start_time": _ts(ORIGIN),
        "end_time": _ts(ORIGIN + timedelta(hours=1)),
        "interval": _seconds(60),
    }
    fields.update(overrides)
    return pb.ListCandlesRequest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (_request(interval=None), "interval"),
        (_request(interval=_seconds(0)), "interval"),
        (_request(interval=_seconds(-60)), "interval"),
        (_request(interval=duration_pb2.Duration(seconds=1, nanos=500_000_000)), "interval"),
        (_request(interval=duration_pb2.Duration(nanos=1)), "interval"),
        (_request(interval=_seconds(86_401)), "interval"),
        (_request(interval=_seconds(2**62)), "interval"),
        (_request(ticker=""), "ticker"),
        (_request(ticker="A\x00"), "ticker"),
        (_request(start_time=None), "start_time"),
        (_request(end_time=_ts(ORIGIN - timedelta(seconds=1))), "end_time"),
        (_request(page_size=10_001), "page_size"),
        (_request(page_size=-1), "page_size"),
        (_request(page_token="not-a-token"), "page_token"),
        (_request(start_time=timestamp_pb2.Timestamp(seconds=-(10**12))), "start_time"),
        (_request(end_time=timestamp_pb2.Timestamp(seconds=10**12)), "end_time"),
        # The first candle would start before 0001-01-01 / the last end after 9999-12-31.
        (
            _request(start_time=_ts(datetime.min.replace(tzinfo=UTC)), interval=_seconds(7)),
            "start_time",
        ),
        (
            _request(
                start_time=_ts(datetime(9999, 12, 30, tzinfo=UTC)),
                end_time=_ts(datetime.max.replace(tzinfo=UTC)),
                interval=_seconds(86_400),
            ),
            "end_time",
        ),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    stored: Stored, request_message: pb.ListCandlesRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stored.stub.ListCandles(request_message)
    assert bad_request_fields(caught.value) == [field]


async def test_a_page_token_of_another_interval_is_refused(stored: Stored) -> None:
    first = await stored.stub.ListCandles(_request(page_size=5))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stored.stub.ListCandles(
            _request(page_size=5, interval=_seconds(30), page_token=first.next_page_token)
        )
    assert bad_request_fields(caught.value) == ["page_token"]


async def test_unknown_ticker_is_not_found(stored: Stored) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stored.stub.ListCandles(_request(ticker="KXNOPE-1"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "KXNOPE-1" in (caught.value.details() or "")
