"""Compare what kfeed stored with the simulator's ground truth, exactly."""

from __future__ import annotations

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
