"""Compare what kfeed stored with the simulator's ground truth, exactly."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed.v1 import types_pb2

# The simulator's lifecycle `status` values → kfeed.v1.MarketStatus (an independent oracle of
# the ingest's own mapping).
STATUS = {
    "initialized": types_pb2.MARKET_STATUS_UNOPENED,
    "inactive": types_pb2.MARKET_STATUS_PAUSED,
    "active": types_pb2.MARKET_STATUS_OPEN,
    "closed": types_pb2.MARKET_STATUS_CLOSED,
    "determined": types_pb2.MARKET_STATUS_DETERMINED,
    "finalized": types_pb2.MARKET_STATUS_FINALIZED,
}
RESULT = {"yes": types_pb2.MARKET_RESULT_YES, "no": types_pb2.MARKET_RESULT_NO}
NO_BID, NO_ASK = 0, 10_000  # how the truth writes an empty side; kfeed leaves it unset
ONE_DOLLAR = 10_000


def _micros(stamp: Any) -> int:
    return int(stamp.seconds) * 1_000_000 + int(stamp.nanos) // 1000


def _price(message: Message, field: str, empty: int) -> int:
    return getattr(message, field).ten_thousandths if message.HasField(field) else empty


def _count(message: Message, field: str) -> int:
    return getattr(message, field).hundredths if message.HasField(field) else 0


def snapshot_view(snapshot: types_pb2.MarketSnapshot) -> dict[str, int]:
    """A stored snapshot in the truth's terms."""
    return {
        "ts_us": _micros(snapshot.exchange_time),
        "status": int(snapshot.status),
        "yes_bid": _price(snapshot, "yes_bid", NO_BID),
        "yes_ask": _price(snapshot, "yes_ask", NO_ASK),
        "no_bid": _price(snapshot, "no_bid", NO_BID),
        "no_ask": _price(snapshot, "no_ask", NO_ASK),
        "last_price": _price(snapshot, "last_price", 0),
        "volume": _count(snapshot, "volume"),
        "open_interest": _count(snapshot, "open_interest"),
    }


def state_view(state: dict[str, Any]) -> dict[str, int]:
    """A truth state in the same terms."""
    return {
        "ts_us": state["ts_us"],
        "status": STATUS[state["status"]],
        **{k: state[k] for k in ("yes_bid", "yes_ask", "no_bid", "no_ask", "last_price")},
        "volume": state["volume"],
        "open_interest": state["open_interest"],
    }


@dataclass
class Stored:
    markets: dict[str, types_pb2.Market]
    snapshots: dict[str, list[types_pb2.MarketSnapshot]]


async def read_everything(address: str) -> Stored:
    """Every market and every snapshot the server holds, through MarketService."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.MarketServiceStub(channel)
        markets: dict[str, types_pb2.Market] = {}
        token = ""
        while True:
            page = await stub.ListMarkets(pb.ListMarketsRequest(page_size=1000, page_token=token))
            markets.update((m.ticker, m) for m in page.markets)
            token = page.next_page_token
            if not token:
                break
        snapshots: dict[str, list[types_pb2.MarketSnapshot]] = {}
        for ticker in markets:
            listed = await stub.ListSnapshots(
                pb.ListSnapshotsRequest(ticker=ticker, page_size=10_000)
            )
            snapshots[ticker] = list(listed.snapshots)
    return Stored(markets, snapshots)


def truth_by_ticker(truth: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {market["ticker"]: market for market in truth["markets"]}


def assert_snapshots_match_truth(stored: Stored, truth: dict[str, Any]) -> int:
    """Every stored snapshot equals the truth state of its market at its exchange time, and no
    market has two snapshots of one instant. Returns how many snapshots were checked."""
    markets = truth_by_ticker(truth)
    checked = 0
    for ticker, snapshots in stored.snapshots.items():
        states = {s["ts_us"]: state_view(s) for s in markets[ticker]["states"]}
        times = [_micros(s.exchange_time) for s in snapshots]
        assert len(times) == len(set(times)), f"duplicate snapshots of {ticker}"
        for snapshot in snapshots:
            view = snapshot_view(snapshot)
            assert view == states.get(view["ts_us"]), (ticker, view)
            checked += 1
    return checked


def assert_markets_match_truth(stored: Stored, truth: dict[str, Any]) -> None:
    markets = truth_by_ticker(truth)
    for ticker, market in stored.markets.items():
        expected = markets[ticker]
        assert market.event_ticker == expected["event_ticker"], ticker
        assert market.series_ticker == expected["series_ticker"], ticker
        latest = expected["states"][-1]
        if latest["result"] in ("yes", "no"):
            result = (
                types_pb2.MARKET_RESULT_YES
                if latest["result"] == "yes"
                else types_pb2.MARKET_RESULT_NO
            )
            assert market.result == result, ticker
        if latest["settlement_value"] is not None and market.HasField("settlement_value"):
            assert market.settlement_value.ten_thousandths == latest["settlement_value"], ticker


def latest_state(truth: dict[str, Any], ticker: str) -> dict[str, int]:
    return state_view(truth_by_ticker(truth)[ticker]["states"][-1])


def open_tickers(truth: dict[str, Any]) -> set[str]:
    return {m["ticker"] for m in truth["markets"] if m["states"][-1]["status"] == "active"}


async def read_trades(address: str, tickers: Iterable[str]) -> dict[str, list[types_pb2.Trade]]:
    """Every stored trade of each of ``tickers``, through MarketService.ListTrades."""
    trades: dict[str, list[types_pb2.Trade]] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.MarketServiceStub(channel)
        for ticker in tickers:
            trades[ticker] = []
            token = ""
            while True:
                page = await stub.ListTrades(
                    pb.ListTradesRequest(ticker=ticker, page_size=10_000, page_token=token)
                )
                trades[ticker] += page.trades
                token = page.next_page_token
                if not token:
                    break
    return trades


def lifecycle_differences(stored: Stored, truth: dict[str, Any]) -> list[str]:
    """How each stored market's lifecycle (status, result, settlement value and time) differs
    from the exchange's latest state of it (empty when they all agree)."""
    markets = truth_by_ticker(truth)
    differences = []
    for ticker, market in sorted(stored.markets.items()):
        latest = markets[ticker]["states"][-1]
        settled = latest["status"] == "finalized"
        expected = (
            STATUS[latest["status"]],
            RESULT.get(latest["result"], types_pb2.MARKET_RESULT_UNSPECIFIED),
            latest["settlement_value"],
            latest["ts_us"] if settled else None,
        )
        shown = (
            market.status,
            market.result,
            market.settlement_value.ten_thousandths
            if market.HasField("settlement_value")
            else None,
            _micros(market.settlement_time) if market.HasField("settlement_time") else None,
        )
        if shown != expected:
            differences.append(f"{ticker}: stored {shown} != exchange {expected}")
    return differences


def trade_differences(
    stored: dict[str, list[types_pb2.Trade]], truth: dict[str, Any], since_us: int
) -> list[str]:
    """How the stored trades of each market differ from the exchange's trades at or after
    ``since_us``: missing, extra, or with another time or price (empty when they agree)."""
    markets = truth_by_ticker(truth)
    differences = []
    for ticker, trades in sorted(stored.items()):
        expected = {
            t["trade_id"]: (t["ts_us"], t["yes_price"], t["count"])
            for t in markets[ticker]["trades"]
            if t["ts_us"] >= since_us
        }
        shown = {
            t.trade_id: (_micros(t.create_time), t.yes_price.ten_thousandths, t.count.hundredths)
            for t in trades
            if _micros(t.create_time) >= since_us or t.trade_id in expected
        }
        if len(shown) != len([t for t in trades if t.trade_id in shown]):
            differences.append(f"{ticker}: a trade id stored twice")
        for trade_id in sorted(expected.keys() | shown.keys()):
            if expected.get(trade_id) != shown.get(trade_id):
                differences.append(
                    f"{ticker} {trade_id}: stored {shown.get(trade_id)} "
                    f"!= exchange {expected.get(trade_id)}"
                )
    return differences
