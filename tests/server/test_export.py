"""ExportSnapshots and ExportTrades over a real server into pyarrow tables, on SQLite and
PostgreSQL: the exact stored values, the schema, the filters and the errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from itertools import groupby

import grpc
import pyarrow as pa
import pyarrow.ipc
import pytest
from google.protobuf import timestamp_pb2
from sqlalchemy import text

import kfeed_client
from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer
from kfeed_server.db.repositories.export import EXPORT_APPLICATION_NAME
from kfeed_server.records import (
    BookChangeRecord,
    DataSource,
    MarketStatus,
    Side,
    SnapshotRecord,
    TradeRecord,
)
from kfeed_server.transport.export import MESSAGE_TARGET_BYTES
from tests.support.factories import at, exported_row, make_market, make_snapshot, make_trade
from tests.support.servers import bad_request_fields
from tests.support.waiting import eventually

# A ticker that must survive SQL quoting on the way to the database.
HOSTILE = "KX'Q\\UOTE\";DROP/**/TABLE/**/markets;--"
MARKETS = [
    make_market("KXA-1", event_ticker="EV-A", series_ticker="SER-A"),
    make_market("KXA-2", event_ticker="EV-A", series_ticker="SER-A"),
    make_market("KXB-1", event_ticker="EV-B", series_ticker="SER-B"),
    make_market(HOSTILE, event_ticker="EV-B", series_ticker="SER-B"),
]
# Enough rows that a PostgreSQL batch is cut into several messages.
ROWS_PER_MARKET = 6_000


def _snapshots(ticker: str, offset: int) -> list[SnapshotRecord]:
    rows = []
    for i in range(ROWS_PER_MARKET):
        snapshot = make_snapshot(
            ticker, i, exchange_time=at(i + offset / 10), receive_time=at(i + offset / 10 + 0.5)
        )
        if i % 7 == 0:  # no bid, no sequence: nulls must stay nulls
            snapshot = snapshot._replace(yes_bid=None, exchange_sequence=None)
        if i % 5 == 0:
            snapshot = snapshot._replace(
                source=DataSource.POLL, status=MarketStatus.CLOSED, yes_ask=4_237
            )
        rows.append(snapshot)
    return rows


def _trades(ticker: str, offset: int) -> list[TradeRecord]:
    return [
        make_trade(
            ticker,
            i,
            create_time=at(i * 3 + offset / 10),
            yes_price=1 + i,
            no_price=9_999 - i,
            count=1 + 37 * i,
            taker_side=Side.NO if i % 3 else Side.YES,
        )
        for i in range(200)
    ]


@pytest.fixture
async def client(kfeed_server: KfeedServer) -> AsyncIterator[kfeed_client.KfeedClient]:
    snapshots = [s for i, m in enumerate(MARKETS) for s in _snapshots(m.ticker, i)]
    trades = [t for i, m in enumerate(MARKETS) for t in _trades(m.ticker, i)]
    await kfeed_server.repositories.ingest.write_batch(
        markets=MARKETS, snapshots=snapshots, trades=trades
    )
    async with kfeed_client.connect(f"127.0.0.1:{kfeed_server.port}") as connected:
        yield connected


async def _stored_snapshots(server: KfeedServer, ticker: str) -> list[SnapshotRecord]:
    page = await server.repositories.snapshots.list_range(
        ticker, start=None, end=None, limit=ROWS_PER_MARKET
    )
    return page.items


async def test_snapshots_export_every_stored_value_exactly(
    client: kfeed_client.KfeedClient, kfeed_server: KfeedServer
) -> None:
    received: list[int] = []
    table = await client.export_snapshots(on_rows=received.append)
    stored = [s for m in MARKETS for s in await _stored_snapshots(kfeed_server, m.ticker)]
    assert table.num_rows == len(stored) == sum(received) == len(MARKETS) * ROWS_PER_MARKET
    assert len(received) > 1  # cut into several messages
    stored.sort(key=lambda s: s.snapshot_id)  # the order they were stored in
    rows = table.to_pylist()
    assert rows == [exported_row(s) for s in stored]
    assert table.schema.field("exchange_time").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("yes_bid").type == pa.int64()
    assert table.schema.field("yes_bid").metadata == {b"unit": b"USD/10000"}
    assert table.schema.field("volume").metadata == {b"unit": b"contracts/100"}
    assert table.column("yes_bid").null_count == len(MARKETS) * len(range(0, ROWS_PER_MARKET, 7))
    assert rows[0]["exchange_time"].tzinfo is not None


async def test_filters_by_tickers_event_series_and_a_half_open_window(
    client: kfeed_client.KfeedClient,
) -> None:
    hostile = await client.export_snapshots([HOSTILE])
    assert set(hostile.column("ticker").to_pylist()) == {HOSTILE}
    assert hostile.num_rows == ROWS_PER_MARKET

    event_a = await client.export_snapshots(event_ticker="EV-A")
    assert set(event_a.column("ticker").to_pylist()) == {"KXA-1", "KXA-2"}
    series_b = await client.export_snapshots(series_ticker="SER-B")
    assert set(series_b.column("ticker").to_pylist()) == {"KXB-1", HOSTILE}
    both = await client.export_snapshots(["KXA-1"], series_ticker="SER-B")
    assert both.num_rows == 0  # the filters combine: in neither

    start, end = at(100), at(110)  # KXA-1's snapshots are at at(i), exactly on the bounds
    window = await client.export_snapshots(["KXA-1"], start=start, end=end)
    times = window.column("exchange_time").to_pylist()
    assert times == [at(i) for i in range(100, 110)]


async def test_trades_export_in_time_order(
    client: kfeed_client.KfeedClient, kfeed_server: KfeedServer
) -> None:
    table = await client.export_trades(["KXA-2", "KXB-1"], start=at(30))
    expected = sorted(
        (t for i, m in enumerate(MARKETS) for t in _trades(m.ticker, i)),
        key=lambda t: (t.create_time, t.trade_id),
    )
    expected = [t for t in expected if t.ticker in ("KXA-2", "KXB-1") and t.create_time >= at(30)]
    rows = table.to_pylist()
    assert rows == [
        {
            "trade_id": t.trade_id,
            "ticker": t.ticker,
            "create_time": t.create_time,
            "yes_price": t.yes_price,
            "no_price": t.no_price,
            "count": t.count,
            "taker_side": t.taker_side.name.lower(),
        }
        for t in expected
    ]
    assert table.schema.field("create_time").type == pa.timestamp("us", tz="UTC")


async def test_an_empty_export_still_has_its_schema(client: kfeed_client.KfeedClient) -> None:
    table = await client.export_trades(start=at(10**6))
    assert table.num_rows == 0
    assert table.schema.names[:3] == ["trade_id", "ticker", "create_time"]


async def test_messages_are_the_schema_then_self_contained_batches(
    kfeed_server: KfeedServer, client: kfeed_client.KfeedClient, channel: grpc.aio.Channel
) -> None:
    """What a client in another language relies on: message 1 holds the IPC schema only; each
    later message one IPC record batch of it, under the 4 MiB default receive limit."""
    stub = pb_grpc.MarketServiceStub(channel)
    messages = [m async for m in stub.ExportSnapshots(pb.ExportSnapshotsRequest())]
    schema = pa.ipc.read_schema(pa.py_buffer(messages[0].arrow_schema))
    assert messages[0].row_count == 0
    assert not messages[0].arrow_record_batch
    assert all(not m.arrow_schema for m in messages[1:])
    total = 0
    for message in messages[1:]:
        assert message.ByteSize() < MESSAGE_TARGET_BYTES + 64 * 1024
        batch = pa.ipc.read_record_batch(pa.py_buffer(message.arrow_record_batch), schema)
        assert batch.num_rows == message.row_count
        total += batch.num_rows
    assert total == len(MARKETS) * ROWS_PER_MARKET


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (pb.ExportSnapshotsRequest(tickers=["KXA-1", ""]), "tickers[1]"),
        (pb.ExportSnapshotsRequest(tickers=["KXA-1", "A\x00B"]), "tickers[1]"),
        (pb.ExportSnapshotsRequest(tickers=["T"] * 10_001), "tickers"),
        (pb.ExportSnapshotsRequest(event_ticker="\t"), "event_ticker"),
        (pb.ExportSnapshotsRequest(series_ticker="x" * 500), "series_ticker"),
        (
            pb.ExportSnapshotsRequest(start_time=timestamp_pb2.Timestamp(seconds=-(10**13))),
            "start_time",
        ),
        (pb.ExportSnapshotsRequest(end_time=timestamp_pb2.Timestamp(nanos=-1)), "end_time"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    channel: grpc.aio.Channel,
    client: kfeed_client.KfeedClient,
    request_message: pb.ExportSnapshotsRequest,
    field: str,
) -> None:
    stub = pb_grpc.MarketServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.ExportSnapshots(request_message):
            pass
    assert bad_request_fields(caught.value) == [field]


async def test_a_window_that_ends_before_it_starts_is_refused(
    client: kfeed_client.KfeedClient,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.export_trades(start=at(10), end=at(10) - timedelta(microseconds=1))
    assert bad_request_fields(caught.value) == ["end_time"]


async def test_unknown_ticker_is_not_found(client: kfeed_client.KfeedClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.export_snapshots(["KXA-1", "KXNOPE-1"])
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "KXNOPE-1" in (caught.value.details() or "")


def test_a_naive_time_is_refused_by_the_client() -> None:
    naive = at(0).astimezone(UTC).replace(tzinfo=None)
    with pytest.raises(ValueError, match="timezone-aware"):
        kfeed_client.arrow.export_request(pb.ExportTradesRequest, (), None, None, naive, None)


async def test_a_cancelled_export_frees_its_database_connection(
    kfeed_server: KfeedServer, client: kfeed_client.KfeedClient, channel: grpc.aio.Channel
) -> None:
    stub = pb_grpc.MarketServiceStub(channel)
    for _ in range(3):
        call = stub.ExportSnapshots(pb.ExportSnapshotsRequest())
        first, second = await call.read(), await call.read()  # the schema, then rows: mid-stream
        assert isinstance(first, pb.ExportSnapshotsResponse)
        assert isinstance(second, pb.ExportSnapshotsResponse)
        assert second.row_count > 0
        call.cancel()
    table = await client.export_snapshots()  # the server goes on serving
    assert table.num_rows == len(MARKETS) * ROWS_PER_MARKET
    engine = kfeed_server.repositories.engine
    if engine.dialect.name == "postgresql":

        async def no_export_connection() -> bool:
            async with engine.connect() as connection:
                count = await connection.scalar(
                    text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                    {"name": EXPORT_APPLICATION_NAME},
                )
            return int(count or 0) == 0

        await eventually(no_export_connection, within=20, what="export connections closed")


async def test_order_book_changes_export_in_the_order_they_apply(
    kfeed_server: KfeedServer, client: kfeed_client.KfeedClient
) -> None:
    changes = [
        BookChangeRecord(
            ticker,
            at(i // 3 + offset / 10),
            at(i // 3 + offset / 10 + 0.001),
            100 + i // 3,  # three changes a frame
            Side.YES if i % 2 else Side.NO,
            4_000 + 37 * i,  # sub-penny levels
            0 if i % 5 == 0 else 150 * i,  # 0: the level is gone
        )
        for offset, ticker in enumerate(("KXA-1", HOSTILE))
        for i in range(60)
    ]
    await kfeed_server.repositories.ingest.write_batch(book_changes=changes[::-1])
    table = await client.export_order_book_changes([HOSTILE, "KXA-1"], end=at(15))
    rows = table.to_pylist()
    for ticker in ("KXA-1", HOSTILE):  # each market's in order (markets in collation order)
        expected = sorted(
            (c for c in changes if c.ticker == ticker and c.exchange_time < at(15)),
            key=lambda c: (c.exchange_time, c.sequence, c.side, c.price),
        )
        assert [r for r in rows if r["ticker"] == ticker] == [
            {**c._asdict(), "side": c.side.name.lower()} for c in expected
        ]
    assert len(rows) == 2 * 45
    assert len(list(groupby(r["ticker"] for r in rows))) == 2  # one market's, then the other's
    assert table.schema.field("price").metadata == {b"unit": b"USD/10000"}
    assert table.schema.field("size").metadata == {b"unit": b"contracts/100"}
