"""WebSocket: commands and replies, snapshot then deltas, per-sid seq, lifecycle to settlement."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from kfeed_sim.fixed_point import parse_dollars
from kfeed_sim.market_model import BookDelta, MarketStatus
from kfeed_sim.server import SimHandle
from kfeed_sim.shapes import Renderer
from kfeed_sim.ws import data_frame, encode
from tests.support.sim import SimFactory
from tests.support.wsclient import sim_socket


def active_tickers(sim: SimHandle, count: int) -> list[str]:
    return [t for t, m in sim.exchange.markets.items() if m.status is MarketStatus.ACTIVE][:count]


def assert_seq_counts_up_by_one(frames: list[dict[str, Any]]) -> None:
    last: dict[int, int] = {}
    for frame in frames:
        if "seq" in frame:
            assert frame["seq"] == last.get(frame["sid"], 0) + 1, frame
            last[frame["sid"]] = frame["seq"]


def apply_book(frames: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, int]]]:
    """Rebuild every book from a snapshot and the deltas after it (counts in 1/100)."""
    books: dict[str, dict[str, dict[int, int]]] = defaultdict(lambda: {"yes": {}, "no": {}})
    for frame in frames:
        msg = frame.get("msg", {})
        if frame["type"] == "orderbook_snapshot":
            books[msg["market_ticker"]] = {
                side: {
                    parse_dollars(p): round(float(c) * 100) for p, c in msg[f"{side}_dollars_fp"]
                }
                for side in ("yes", "no")
            }
        elif frame["type"] == "orderbook_delta":
            side = books[msg["market_ticker"]][msg["side"]]
            price = parse_dollars(msg["price_dollars"])
            side[price] = side.get(price, 0) + round(float(msg["delta_fp"]) * 100)
            if side[price] == 0:
                del side[price]
    return books


async def test_orderbook_snapshot_then_deltas_rebuild_the_book(
    make_sim: SimFactory, private_key: rsa.RSAPrivateKey
) -> None:
    async with make_sim() as sim, sim_socket(sim.ws_url, private_key) as socket:
        sim.advance(10)
        tickers = active_tickers(sim, 2)
        await socket.command("subscribe", channels=["orderbook_delta"], market_tickers=tickers)
        reply = await socket.frame()
        assert reply == {
            "id": 1,
            "type": "subscribed",
            "msg": {"channel": "orderbook_delta", "sid": 1},
        }
        snapshots = [await socket.frame() for _ in tickers]
        assert [f["type"] for f in snapshots] == ["orderbook_snapshot"] * 2
        assert snapshots[0]["msg"].keys() >= {"market_ticker", "yes_dollars_fp", "no_dollars_fp"}
        sim.advance(15)
        frames = snapshots + await socket.frames_until_quiet()
        assert_seq_counts_up_by_one(frames)
        deltas = [f for f in frames if f["type"] == "orderbook_delta"]
        assert deltas
        assert deltas[0]["msg"].keys() >= {
            "market_ticker",
            "price_dollars",
            "delta_fp",
            "side",
            "ts_ms",
        }
        books = apply_book(frames)
        for ticker in tickers:
            yes, no = sim.exchange.markets[ticker].orderbook()
            assert sorted(books[ticker]["yes"].items()) == yes
            assert sorted(books[ticker]["no"].items()) == no


async def test_ticker_and_trade_channels_match_the_truth(
    make_sim: SimFactory, private_key: rsa.RSAPrivateKey
) -> None:
    async with make_sim() as sim, sim_socket(sim.ws_url, private_key) as socket:
        sim.advance(10)
        await socket.command("subscribe", channels=["ticker", "trade"])
        replies = [await socket.frame(), await socket.frame()]
        assert [r["msg"]["sid"] for r in replies] == [1, 2]
        sim.advance(10)
        frames = await socket.frames_until_quiet()
        assert_seq_counts_up_by_one(frames)
        truth = sim.truth()
        tickers = [f["msg"] for f in frames if f["type"] == "ticker"]
        trades = [f["msg"] for f in frames if f["type"] == "trade"]
        assert tickers
        assert trades
        for msg in tickers:
            state = next(
                s for s in truth[msg["market_ticker"]].states if s.ts_us // 1000 == msg["ts_ms"]
            )
            assert parse_dollars(msg["yes_bid_dollars"]) == state.yes_bid
            assert parse_dollars(msg["yes_ask_dollars"]) == state.yes_ask
            assert parse_dollars(msg["price_dollars"]) == state.last_price
        for msg in trades:
            trade = next(
                t for t in truth[msg["market_ticker"]].trades if t.trade_id == msg["trade_id"]
            )
            assert parse_dollars(msg["yes_price_dollars"]) == trade.yes_price
            assert msg["taker_outcome_side"] == trade.taker_outcome_side


async def test_unsubscribe_and_update_subscription(
    make_sim: SimFactory, private_key: rsa.RSAPrivateKey
) -> None:
    async with make_sim() as sim, sim_socket(sim.ws_url, private_key) as socket:
        sim.advance(10)
        first, second = active_tickers(sim, 2)
        await socket.command("subscribe", channels=["orderbook_delta"], market_tickers=[first])
        await socket.frames_until_quiet()
        await socket.command(
            "update_subscription", sids=[1], market_tickers=[second], action="add_markets"
        )
        frames = await socket.frames_until_quiet()
        assert frames[0] == {
            "id": 2,
            "sid": 1,
            "type": "ok",
            "msg": {"market_tickers": sorted([first, second])},
        }
        assert frames[1]["type"] == "orderbook_snapshot"
        assert frames[1]["msg"]["market_ticker"] == second
        assert frames[1]["seq"] == 2
        await socket.command(
            "update_subscription", sids=[1], market_tickers=[first], action="get_snapshot"
        )
        frames = await socket.frames_until_quiet()
        assert [f["type"] for f in frames] == ["ok", "orderbook_snapshot"]
        assert frames[1]["seq"] == 3
        await socket.command(
            "update_subscription", sids=[1], market_tickers=[first], action="delete_markets"
        )
        await socket.frames_until_quiet()
        sim.advance(5)
        assert {f["msg"]["market_ticker"] for f in await socket.frames_until_quiet()} == {second}
        await socket.command("unsubscribe", sids=[1])
        assert await socket.frame() == {"id": 5, "sid": 1, "type": "unsubscribed"}
        sim.advance(5)
        assert await socket.frames_until_quiet() == []


async def test_command_errors_use_kalshi_codes(
    sim: SimHandle, private_key: rsa.RSAPrivateKey
) -> None:
    async with sim_socket(sim.ws_url, private_key) as socket:
        cases: list[tuple[str, dict[str, Any], int]] = [
            ("subscribe", {"channels": []}, 3),
            ("subscribe", {"channels": ["ticker_v2"]}, 8),
            ("subscribe", {"channels": ["orderbook_delta"]}, 14),
            ("subscribe", {"channels": ["ticker"], "market_tickers": ["KXNOPE"]}, 16),
            ("unsubscribe", {"sids": [99]}, 7),
            ("dance", {}, 5),
        ]
        for cmd, params, code in cases:
            command_id = await socket.command(cmd, **params)
            reply = await socket.frame()
            assert reply["id"] == command_id
            assert reply["type"] == "error"
            assert reply["msg"]["code"] == code, (cmd, params, reply)
        await socket.command(
            "update_subscription", sids=[1], market_tickers=[], action="get_snapshot"
        )
        assert (await socket.frame())["msg"]["code"] == 7  # no subscription yet
        await socket.command("subscribe", channels=["ticker"])
        await socket.frame()
        # subscribing again is a no-op since 2025-10-01 (error 6 is no longer sent)
        command_id = await socket.command("subscribe", channels=["ticker"])
        assert await socket.frame() == {
            "id": command_id,
            "sid": 1,
            "type": "ok",
            "msg": {"market_tickers": []},
        }


async def test_lifecycle_channel_follows_a_market_to_settlement(
    make_sim: SimFactory, private_key: rsa.RSAPrivateKey
) -> None:
    async with make_sim(history_steps=0) as sim, sim_socket(sim.ws_url, private_key) as socket:
        await socket.command("subscribe", channels=["market_lifecycle_v2"])
        await socket.frame()
        sim.advance(140)  # longer than the longest live market life
        frames = await socket.frames_until_quiet()
        assert_seq_counts_up_by_one(frames)
        by_market: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for frame in frames:
            by_market[frame["msg"]["market_ticker"]].append(frame["msg"])
        settled = [msgs for msgs in by_market.values() if msgs[-1]["event_type"] == "settled"]
        assert settled
        for msgs in settled:
            assert [m["event_type"] for m in msgs] == [
                "created",
                "activated",
                "determined",
                "settled",
            ]
            assert msgs[-1]["result"] in ("yes", "no")
            assert msgs[-1].keys() >= {
                "open_ts",
                "close_ts",
                "determination_ts",
                "settled_ts",
                "settlement_value",
            }
            assert sim.exchange.markets[msgs[-1]["market_ticker"]].status is MarketStatus.FINALIZED


async def test_every_socket_gets_the_same_messages_under_its_own_sid_and_seq(
    make_sim: SimFactory, private_key: rsa.RSAPrivateKey
) -> None:
    async with (
        make_sim() as sim,
        sim_socket(sim.ws_url, private_key) as first,
        sim_socket(sim.ws_url, private_key) as second,
    ):
        sim.advance(10)
        await first.command("subscribe", channels=["trade", "ticker"])
        await second.command("subscribe", channels=["ticker"])
        assert [(await first.frame())["msg"]["sid"] for _ in range(2)] == [1, 2]
        assert (await second.frame())["msg"] == {"channel": "ticker", "sid": 1}
        sim.advance(5)
        first_frames = await first.frames_until_quiet()
        second_frames = await second.frames_until_quiet()
        assert_seq_counts_up_by_one(first_frames)
        assert_seq_counts_up_by_one(second_frames)
        first_tickers = [f for f in first_frames if f["type"] == "ticker"]
        assert {f["sid"] for f in first_tickers} == {2}
        assert {f["sid"] for f in second_frames} == {1}
        assert [f["seq"] for f in second_frames] == [f["seq"] for f in first_tickers]
        assert [f["msg"] for f in second_frames] == [f["msg"] for f in first_tickers]
        assert any(f["type"] == "trade" for f in first_frames)


def test_a_data_frame_is_the_compact_json_of_the_whole_frame() -> None:
    msg = {"market_ticker": "KXSIM-T1", "price_dollars": "0.5600", "ts_ms": 1}
    assert data_frame("ticker", 3, 17, encode(msg)) == encode(
        {"type": "ticker", "sid": 3, "seq": 17, "msg": msg}
    )
    assert encode(msg) == json.dumps(msg, separators=(",", ":"))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_delta_written_directly_is_the_compact_json_of_its_msg(legacy: bool) -> None:
    render = Renderer(legacy=legacy)
    for delta in (
        BookDelta("KXA-1", "yes", 4_217, -1_250, 1_765_000_000_123_456),
        BookDelta('KX"B\\-2', "no", 10, 7, 0),
    ):
        assert render.orderbook_delta_text(delta) == encode(render.orderbook_delta_msg(delta))


async def test_get_snapshot_names_markets_and_resubscribing_sends_no_book(
    make_sim: SimFactory, private_key: rsa.RSAPrivateKey
) -> None:
    """get_snapshot needs market_tickers (one sid); subscribing again only adds new markets."""
    async with make_sim() as sim, sim_socket(sim.ws_url, private_key) as socket:
        sim.advance(10)
        first, second = active_tickers(sim, 2)
        await socket.command("subscribe", channels=["orderbook_delta"], market_tickers=[first])
        await socket.frames_until_quiet()
        await socket.command("update_subscription", sids=[1], action="get_snapshot")
        assert (await socket.frame())["msg"]["code"] == 14
        await socket.command(
            "update_subscription", sids=[1], market_tickers=[second], action="get_snapshot"
        )
        assert (await socket.frame())["msg"]["code"] == 11  # not a market of this sid
        command_id = await socket.command(
            "subscribe", channels=["orderbook_delta"], market_tickers=[first, second]
        )
        frames = await socket.frames_until_quiet()
        assert frames[0] == {
            "id": command_id,
            "sid": 1,
            "type": "ok",
            "msg": {"market_tickers": sorted([first, second])},
        }
        # only the newly added market's book: the subscribed one is not refreshed
        assert [(f["type"], f["msg"]["market_ticker"]) for f in frames[1:]] == [
            ("orderbook_snapshot", second)
        ]


async def test_truth_endpoint_serves_every_book_change(
    make_sim: SimFactory, private_key: rsa.RSAPrivateKey
) -> None:
    """``/_sim/truth?books=1``: the changes replayed to a delta's time give the book the
    snapshot and deltas on the socket rebuild at that time."""
    async with make_sim() as sim, sim_socket(sim.ws_url, private_key) as socket:
        sim.advance(10)
        tickers = active_tickers(sim, 2)
        await socket.command("subscribe", channels=["orderbook_delta"], market_tickers=tickers)
        frames = await socket.frames_until_quiet()
        sim.advance(8)
        frames += await socket.frames_until_quiet()
        async with httpx.AsyncClient() as http:
            body = (
                await http.get(
                    f"{sim.base_url}/_sim/truth", params={"tickers": ",".join(tickers), "books": 1}
                )
            ).json()
        changes = {m["ticker"]: m["book_changes"] for m in body["markets"]}
        data = [f for f in frames if "seq" in f]
        checked = 0
        for index, frame in enumerate(data):
            if frame["type"] != "orderbook_delta":
                continue
            ts_us = frame["msg"]["ts_ms"] * 1_000
            if index + 1 < len(data) and data[index + 1]["msg"].get("ts_ms") == ts_ms_of(frame):
                continue  # not the instant's last change
            ticker = frame["msg"]["market_ticker"]
            rebuilt = apply_book(data[: index + 1])[ticker]
            truth: dict[str, dict[int, int]] = {"yes": {}, "no": {}}
            for t, side, price, size in changes[ticker]:
                if t <= ts_us:
                    truth[side][price] = size
            assert rebuilt == {s: {p: c for p, c in b.items() if c} for s, b in truth.items()}
            checked += 1
        assert checked


def ts_ms_of(frame: dict[str, Any]) -> int:
    return int(frame["msg"]["ts_ms"])
