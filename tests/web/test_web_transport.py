"""kfeed.v1 over Connect and gRPC-Web: a real `kfeed serve` web listener over real HTTP.

The client is connectrpc's generated one (the same runtime a Python service would use), speaking
either protocol to the same servicers the gRPC listener serves, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import h11
import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2

from kfeed.v1 import backtest_service_pb2 as bt
from kfeed.v1 import backtest_service_pb2_grpc, ingest_service_pb2, market_service_pb2_grpc
from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1.backtest_service_connect import BacktestServiceClient
from kfeed.v1.market_service_connect import MarketServiceClient
from kfeed.v1.types_pb2 import SIDE_NO
from kfeed_ingest.kalshi.books import START, BookChange, change_columns, checkpoint, micros
from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.security import AuthInterceptor, SecurityConfig
from kfeed_server.web import WebConfig, WebListener, build_web_app
from tests.server.test_stream_snapshots import snapshots
from tests.support.factories import make_market, make_snapshot
from tests.support.security import (
    INGEST_TOKEN,
    OTHER_READ_TOKEN,
    READ_TOKEN,
    CertificateAuthority,
    bearer,
    write_tokens_file,
)
from tests.support.servers import PublishSession, serving
from tests.support.waiting import eventually

PROTOCOLS = [ProtocolType.CONNECT, ProtocolType.GRPC_WEB]
MARKETS = [make_market(f"KXWEB-26DEC05-T{i}") for i in range(3)]


def _web(server: KfeedServer) -> str:
    assert server.web is not None
    return server.web.url.rstrip("/")


@pytest.fixture
async def web_server(database_url: str, tmp_path: Path) -> AsyncIterator[KfeedServer]:
    config = ServerConfig(
        listen="127.0.0.1:0",
        database_url=database_url,
        web=WebConfig("127.0.0.1:0", web_root=tmp_path / "no-dashboard"),
    )
    async with serving(config) as server:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
            PublishSession(channel) as publisher,
        ):
            await publisher.publish(
                markets=MARKETS, snapshots=[make_snapshot(MARKETS[0].ticker, i) for i in range(3)]
            )
        yield server


M = TypeVar("M", error_details_pb2.BadRequest, error_details_pb2.ResourceInfo)


def _detail(error: ConnectError, message_type: type[M]) -> M:
    for detail in error.details:
        if detail.type_name == message_type.DESCRIPTOR.full_name:
            return message_type.FromString(detail.message_bytes)
    raise AssertionError(f"no {message_type.__name__} in {error.details}")


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_unary_calls_answer_like_grpc(
    web_server: KfeedServer, protocol: ProtocolType
) -> None:
    async with MarketServiceClient(_web(web_server), protocol=protocol) as client:
        listed = await client.list_markets(pb.ListMarketsRequest())
        assert [m.ticker for m in listed.markets] == [m.ticker for m in MARKETS]

        latest = await client.get_latest_snapshot(
            pb.GetLatestSnapshotRequest(ticker=MARKETS[0].ticker)
        )
        newest = make_snapshot(MARKETS[0].ticker, 2)
        assert latest.snapshot.yes_bid.ten_thousandths == newest.yes_bid

        with pytest.raises(ConnectError) as missing:
            await client.get_market(pb.GetMarketRequest(ticker="KXNOPE-1"))
        assert missing.value.code == Code.NOT_FOUND
        info = _detail(missing.value, error_details_pb2.ResourceInfo)
        assert info.resource_name == "KXNOPE-1"

        with pytest.raises(ConnectError) as invalid:
            await client.list_markets(pb.ListMarketsRequest(page_size=-5, event_ticker="A\x00B"))
        assert invalid.value.code == Code.INVALID_ARGUMENT
        bad = _detail(invalid.value, error_details_pb2.BadRequest)
        assert {v.field for v in bad.field_violations} & {"page_size", "event_ticker"}

    async with BacktestServiceClient(_web(web_server), protocol=protocol) as backtests:
        strategies = await backtests.list_strategies(bt.ListStrategiesRequest())
        assert strategies.strategies, "the built-in strategies are listed"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_server_stream_replays_then_goes_live(
    web_server: KfeedServer, protocol: ProtocolType
) -> None:
    ticker = MARKETS[0].ticker
    received: list[pb.StreamSnapshotsResponse] = []
    caught_up = asyncio.Event()
    live_seen = asyncio.Event()

    async def read() -> None:
        async with MarketServiceClient(_web(web_server), protocol=protocol) as client:
            request = pb.StreamSnapshotsRequest(tickers=[ticker])
            request.start_time.FromDatetime(make_snapshot(ticker, 0).exchange_time)
            async for message in client.stream_snapshots(request):
                received.append(message)
                if message.HasField("caught_up"):
                    caught_up.set()
                if message.HasField("snapshot") and caught_up.is_set():
                    live_seen.set()
                    return

    reader = asyncio.create_task(read())
    await asyncio.wait_for(caught_up.wait(), 20)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{web_server.port}") as channel,
        PublishSession(channel) as publisher,
    ):
        await publisher.publish(snapshots=[make_snapshot(ticker, 10)])
    await asyncio.wait_for(reader, 20)
    kinds = [m.WhichOneof("event") for m in received]
    assert kinds == ["snapshot"] * 3 + ["caught_up", "snapshot"], kinds
    live = received[-1].snapshot.snapshot
    assert live.yes_bid.ten_thousandths == make_snapshot(ticker, 10).yes_bid
    assert all(m.resume_token for m in received)
    # The client hung up: the server notices the disconnect and frees the subscription.
    await eventually(lambda: web_server.hub.subscriber_count == 0, within=20)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_order_book_stream_starts_with_the_book_then_goes_live(
    web_server: KfeedServer, protocol: ProtocolType
) -> None:
    ticker = MARKETS[1].ticker
    start = make_snapshot(ticker, 0).exchange_time
    first = ingest_service_pb2.PublishRequest(producer="tests")
    first.book_checkpoints.append(checkpoint(ticker, START, start, start, 1, {4200: 500}, {}))
    live = ingest_service_pb2.PublishRequest(producer="tests")
    moment = micros(start) + 1_000_000
    live.book_changes.CopyFrom(
        change_columns([BookChange(ticker, moment, moment, 2, SIDE_NO, 5500, 300)])
    )
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{web_server.port}") as channel,
        PublishSession(channel) as publisher,
    ):
        await publisher.send(first)
        received: list[pb.StreamOrderBooksResponse] = []
        async with MarketServiceClient(_web(web_server), protocol=protocol) as client:
            messages = aiter(
                client.stream_order_books(pb.StreamOrderBooksRequest(tickers=[ticker]))
            )
            while not (received and received[-1].HasField("caught_up")):
                received.append(await asyncio.wait_for(anext(messages), 20))
            await publisher.send(live)
            received.append(await asyncio.wait_for(anext(messages), 20))
            await messages.aclose()  # type: ignore[attr-defined]
    assert [m.WhichOneof("event") for m in received] == ["book", "caught_up", "change"]
    assert received[0].book.yes_bids[0].price.ten_thousandths == 4200
    assert received[2].change.price.ten_thousandths == 5500
    assert all(m.resume_token for m in received)


async def test_unbuilt_rpcs_answer_unimplemented(tmp_path: Path) -> None:
    """An RPC the servicer leaves to the generated base class: UNIMPLEMENTED, as over gRPC."""
    app = build_web_app(
        WebConfig("127.0.0.1:0", web_root=tmp_path),
        # The generated base classes: every RPC is left unimplemented.
        market_service_pb2_grpc.MarketServiceServicer(),  # type: ignore[abstract]
        backtest_service_pb2_grpc.BacktestServiceServicer(),  # type: ignore[abstract]
        AuthInterceptor(None),
        subscriber_idle_timeout=60,
    )
    listener = WebListener(app, "127.0.0.1:0", None, grace=0)
    await listener.start()
    try:
        for protocol in PROTOCOLS:
            async with MarketServiceClient(listener.url.rstrip("/"), protocol=protocol) as client:
                with pytest.raises(ConnectError) as unary:
                    await client.list_candles(pb.ListCandlesRequest(ticker="KXA-1"))
                assert unary.value.code == Code.UNIMPLEMENTED
                with pytest.raises(ConnectError) as stream:
                    async for _ in client.stream_trades(pb.StreamTradesRequest()):
                        pass
                assert stream.value.code == Code.UNIMPLEMENTED
    finally:
        await listener.stop()


async def test_same_tokens_and_roles_as_grpc(sqlite_url: str, tmp_path: Path) -> None:
    security = SecurityConfig(auth_tokens_file=write_tokens_file(tmp_path))
    config = ServerConfig(
        listen="127.0.0.1:0",
        database_url=sqlite_url,
        migrate=False,
        security=security,
        web=WebConfig("127.0.0.1:0", web_root=tmp_path),
    )
    async with serving(config) as server:
        base = _web(server)
        async with MarketServiceClient(base) as client:
            with pytest.raises(ConnectError) as anonymous:
                await client.list_markets(pb.ListMarketsRequest())
            assert anonymous.value.code == Code.UNAUTHENTICATED
            with pytest.raises(ConnectError) as tampered:
                await client.list_markets(
                    pb.ListMarketsRequest(), headers={"authorization": f"Bearer {READ_TOKEN}x"}
                )
            assert tampered.value.code == Code.UNAUTHENTICATED
            assert "token" in tampered.value.message
            assert READ_TOKEN not in tampered.value.message
            listed = await client.list_markets(
                pb.ListMarketsRequest(), headers={"authorization": f"Bearer {READ_TOKEN}"}
            )
            assert list(listed.markets) == []
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{base}/metrics")).status_code == 401
            scraped = await http.get(
                f"{base}/metrics", headers={"authorization": f"Bearer {READ_TOKEN}"}
            )
            assert scraped.status_code == 200
            # Web calls count in the same metrics as gRPC ones.
            refused = [
                line
                for line in scraped.text.splitlines()
                if line.startswith("grpc_server_handled_total")
                and 'grpc_method="ListMarkets"' in line
                and 'grpc_code="UNAUTHENTICATED"' in line
            ]
            assert refused
            assert float(refused[0].rsplit(" ", 1)[1]) >= 2


async def test_dashboard_and_cors(sqlite_url: str, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>kfeed dashboard</title>")
    base_config = ServerConfig(
        listen="127.0.0.1:0",
        database_url=sqlite_url,
        migrate=False,
        web=WebConfig("127.0.0.1:0", web_root=tmp_path),
    )
    preflight = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,authorization,connect-protocol-version",
    }
    method_url = "/kfeed.v1.MarketService/ListMarkets"
    async with serving(base_config) as server, httpx.AsyncClient() as http:
        base = _web(server)
        page = await http.get(f"{base}/")
        assert page.status_code == 200
        assert "kfeed dashboard" in page.text
        local = await http.options(
            base + method_url, headers={**preflight, "origin": "http://127.0.0.1:5173"}
        )
        assert local.headers.get("access-control-allow-origin") == "http://127.0.0.1:5173"
        foreign = await http.options(
            base + method_url, headers={**preflight, "origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in foreign.headers

    listed = base_config.model_copy(
        update={"web": WebConfig("127.0.0.1:0", ("https://dash.example",), tmp_path / "missing")},
    )
    async with serving(listed) as server, httpx.AsyncClient() as http:
        base = _web(server)
        allowed = await http.options(
            base + method_url, headers={**preflight, "origin": "https://dash.example"}
        )
        assert allowed.headers.get("access-control-allow-origin") == "https://dash.example"
        loopback = await http.options(
            base + method_url, headers={**preflight, "origin": "http://127.0.0.1:5173"}
        )
        assert "access-control-allow-origin" not in loopback.headers
        not_built = await http.get(f"{base}/")
        assert "make web" in not_built.text


async def test_hostile_requests_get_clear_statuses(web_server: KfeedServer) -> None:
    method = f"{_web(web_server)}/kfeed.v1.MarketService/ListMarkets"
    json_body = {"content-type": "application/json"}
    async with httpx.AsyncClient() as http:
        corrupt = await http.post(
            method, content=b"\xff\xff\xff", headers={"content-type": "application/proto"}
        )
        assert (corrupt.status_code, corrupt.json()["code"]) == (400, "invalid_argument")
        malformed = await http.post(method, content=b"{nope", headers=json_body)
        assert (malformed.status_code, malformed.json()["code"]) == (400, "invalid_argument")
        huge_page = await http.post(method, json={"pageSize": 10**9})
        assert huge_page.json()["code"] == "invalid_argument"
        assert [d["type"] for d in huge_page.json()["details"]] == ["google.rpc.BadRequest"]
        oversized = await http.post(
            method, content=b'{"eventTicker":"' + b"A" * (5 * 1024 * 1024) + b'"}',
            headers=json_body,
        )  # fmt: skip
        assert oversized.json()["code"] == "resource_exhausted"
        assert (
            await http.post(method, content=b"hi", headers={"content-type": "text/plain"})
        ).status_code == 415
        assert (await http.post(method.replace("ListMarkets", "Nope"), json={})).status_code == 404
    # The server is still serving.
    async with MarketServiceClient(_web(web_server)) as client:
        assert len((await client.list_markets(pb.ListMarketsRequest())).markets) == len(MARKETS)


async def test_tls_configured_for_grpc_covers_the_web_listener(
    sqlite_url: str, tmp_path: Path
) -> None:
    authority = CertificateAuthority(tmp_path, "web")
    leaf = authority.issue("kfeed-web", server=True)
    config = ServerConfig(
        listen="127.0.0.1:0",
        database_url=sqlite_url,
        migrate=False,
        security=SecurityConfig(tls_cert_file=leaf.cert_file, tls_key_file=leaf.key_file),
        web=WebConfig("127.0.0.1:0", web_root=tmp_path),
    )
    async with serving(config) as server:
        assert server.web is not None
        assert server.web.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(authority.cert_file))
        async with httpx.AsyncClient(verify=trusted) as https:
            listed = await https.post(f"{_web(server)}/kfeed.v1.MarketService/ListMarkets", json={})
            assert listed.status_code == 200
            assert listed.json() == {}
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.post(
                    f"http://127.0.0.1:{server.web.port}/kfeed.v1.MarketService/ListMarkets",
                    json={},
                )


async def test_backtests_over_connect_belong_to_the_token_that_created_them(
    sqlite_url: str, tmp_path: Path
) -> None:
    config = ServerConfig(
        listen="127.0.0.1:0",
        database_url=sqlite_url,
        migrate=False,
        security=SecurityConfig(auth_tokens_file=write_tokens_file(tmp_path)),
        web=WebConfig("127.0.0.1:0", web_root=tmp_path),
    )
    ticker = "KXOWN-26DEC05-T1"
    async with serving(config) as server:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
            PublishSession(channel, metadata=bearer(INGEST_TOKEN)) as publisher,
        ):
            await publisher.publish(markets=[make_market(ticker)])
        async with BacktestServiceClient(_web(server), protocol=ProtocolType.GRPC_WEB) as client:
            created = await client.create_backtest(
                bt.CreateBacktestRequest(
                    config=bt.BacktestConfig(strategy="threshold", tickers=[ticker])
                ),
                headers={"authorization": f"Bearer {READ_TOKEN}"},
            )
            backtest_id = created.backtest.backtest_id
            stored = await server.repositories.backtests.get(backtest_id)
            assert stored is not None
            assert stored.created_by == "reader"
            with pytest.raises(ConnectError) as refused:
                await client.cancel_backtest(
                    bt.CancelBacktestRequest(backtest_id=backtest_id),
                    headers={"authorization": f"Bearer {OTHER_READ_TOKEN}"},
                )
            assert refused.value.code == Code.PERMISSION_DENIED
            await client.cancel_backtest(
                bt.CancelBacktestRequest(backtest_id=backtest_id),
                headers={"authorization": f"Bearer {READ_TOKEN}"},
            )


async def test_the_per_address_stream_cap_counts_browser_streams(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Each browser stream is its own HTTP connection; the cap is per address all the same."""
    config = ServerConfig(
        listen="127.0.0.1:0",
        database_url=sqlite_url,
        migrate=False,
        max_streams_per_peer=1,
        web=WebConfig("127.0.0.1:0", web_root=tmp_path),
    )
    async with (
        serving(config) as server,
        MarketServiceClient(_web(server)) as first,
        MarketServiceClient(_web(server)) as second,
    ):
        # Held open (unread) until the clients close at the end of the block.
        opened = aiter(first.stream_snapshots(pb.StreamSnapshotsRequest(include_latest=True)))
        caught_up = await anext(opened)
        assert caught_up.HasField("caught_up")
        with pytest.raises(ConnectError) as refused:
            async for _ in second.stream_snapshots(pb.StreamSnapshotsRequest()):
                pass
        assert refused.value.code == Code.RESOURCE_EXHAUSTED
        assert "max_streams_per_peer" in refused.value.message


class _StalledConnectStream:
    """A browser's Connect stream over HTTP/1.1 (h11 on a plain socket) that can stop reading.

    Its receive buffer is small, so the server's writes block after little data, as they do
    for a browser tab that has stopped reading."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._http = h11.Connection(h11.CLIENT)
        self._body = bytearray()

    @classmethod
    async def open(
        cls, url: str, method: str, request: pb.StreamSnapshotsRequest
    ) -> _StalledConnectStream:
        parsed = httpx.URL(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (parsed.host, parsed.port))
        stream = cls(*await asyncio.open_connection(sock=sock))
        payload = request.SerializeToString()
        body = struct.pack(">BI", 0, len(payload)) + payload
        for event in (
            h11.Request(
                method="POST",
                target=f"/{method}",
                headers=[
                    ("host", f"{parsed.host}:{parsed.port}"),
                    ("content-type", "application/connect+proto"),
                    ("connect-protocol-version", "1"),
                    ("content-length", str(len(body))),
                ],
            ),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            stream._writer.write(stream._http.send(event) or b"")
        await stream._writer.drain()
        return stream

    async def _next_event(self) -> h11.Event:
        while True:
            event = self._http.next_event()
            if event is not h11.NEED_DATA:
                return cast(h11.Event, event)
            self._http.receive_data(await self._reader.read(65536))

    async def first_message(self) -> bytes:
        """Reads the response headers and the first enveloped message."""
        response = await self._next_event()
        assert isinstance(response, h11.Response), response
        assert response.status_code == 200, response
        while len(self._body) < 5 or len(self._body) < 5 + struct.unpack(">I", self._body[1:5])[0]:
            data = await self._next_event()
            assert isinstance(data, h11.Data), data
            self._body += data.data
        return bytes(self._body[5 : 5 + struct.unpack(">I", self._body[1:5])[0]])

    async def end_of_stream(self) -> dict[str, Any]:
        """Reads to the end of the response: the end-of-stream message's JSON."""
        while not isinstance(event := await self._next_event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event
            self._body += event.data
        offset = 0
        while True:
            flags, size = struct.unpack(">BI", self._body[offset : offset + 5])
            if flags & 0x02:
                return cast(dict[str, Any], json.loads(self._body[offset + 5 : offset + 5 + size]))
            offset += 5 + size

    def close(self) -> None:
        self._writer.close()


async def test_a_browser_stream_that_stops_reading_is_ended_with_a_clear_status(
    sqlite_url: str, tmp_path: Path
) -> None:
    config = ServerConfig(
        listen="127.0.0.1:0",
        database_url=sqlite_url,
        subscriber_idle_timeout=0.5,
        web=WebConfig("127.0.0.1:0", web_root=tmp_path),
    )
    async with serving(config) as server:
        ticker = MARKETS[0].ticker
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
            PublishSession(channel) as publisher,
        ):
            await publisher.publish(markets=[MARKETS[0]])
            # ≈6 MB of history: more than the buffers between the two ends hold (the server's
            # kernel send buffer grows to 4 MB).
            for start in range(0, 40_000, 10_000):
                await publisher.publish(snapshots=snapshots(ticker, start, start + 10_000))
        stream = await _StalledConnectStream.open(
            _web(server),
            "kfeed.v1.MarketService/StreamSnapshots",
            pb.StreamSnapshotsRequest(tickers=[ticker], start_time=Timestamp(seconds=0)),
        )
        try:
            first = pb.StreamSnapshotsResponse.FromString(await stream.first_message())
            assert first.HasField("snapshot")
            # Then it reads nothing: the server ends the stream and frees its subscription.
            await eventually(
                lambda: server.hub.subscriber_count == 0, within=30, what="the stream ended"
            )
            ended = await stream.end_of_stream()
        finally:
            stream.close()
        assert ended["error"]["code"] == "resource_exhausted"
        assert "subscriber_idle_timeout" in ended["error"]["message"]
        assert "resume_token" in ended["error"]["message"]
