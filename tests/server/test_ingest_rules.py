"""The boundary rules of IngestService.Publish (docs/INGEST_RULES.md): every invalid row is
refused and named, never stored, and never costs the valid rows of its batch. Real server on
SQLite and PostgreSQL (PostgreSQL refuses NUL in text: a NUL that got through would fail the
whole batch there)."""

from __future__ import annotations

from dataclasses import replace

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2

from kfeed.v1 import ingest_service_pb2 as pb
from kfeed.v1 import market_service_pb2, market_service_pb2_grpc
from kfeed_server.app import KfeedServer
from kfeed_server.records import Side
from kfeed_server.transport.convert import (
    MAX_TIMESTAMP_SECONDS,
    market_to_proto,
    snapshot_to_proto,
    trade_to_proto,
)
from tests.support.factories import make_market, make_snapshot, make_trade
from tests.support.servers import PublishSession, refused

MARKET = make_market("KXRULES-26DEC05-T1")
TICKER = MARKET.ticker


async def _stored_trade_ids(server: KfeedServer) -> list[str]:
    page = await server.repositories.trades.list_range(TICKER, start=None, end=None, limit=100)
    return [t.trade_id for t in page.items]


async def test_a_trade_whose_prices_do_not_add_up_to_one_dollar_is_refused(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    good = make_trade(TICKER, 0)
    bad_message = trade_to_proto(make_trade(TICKER, 1))
    bad_message.no_price.ten_thousandths += 1
    request = pb.PublishRequest(
        markets=[market_to_proto(MARKET)], trades=[trade_to_proto(good), bad_message]
    )
    ack = await publisher.send(request)
    assert (ack.code, ack.trades_stored) == (code_pb2.OK, 1)
    assert refused(ack) == [("trades", 1, ["trades[1].no_price"])]
    assert await _stored_trade_ids(kfeed_server) == [good.trade_id]


async def test_one_trade_id_names_one_trade(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    first = trade_to_proto(make_trade(TICKER, 0))
    same_again = trade_to_proto(make_trade(TICKER, 0))
    conflicting = trade_to_proto(make_trade(TICKER, 0))
    conflicting.yes_price.ten_thousandths += 100
    conflicting.no_price.ten_thousandths -= 100
    request = pb.PublishRequest(
        markets=[market_to_proto(MARKET)], trades=[first, same_again, conflicting]
    )
    ack = await publisher.send(request)
    assert (ack.code, ack.trades_stored) == (code_pb2.OK, 1)
    assert refused(ack) == [("trades", 2, ["trades[2].trade_id"])]
    assert "trades[0]" in ack.refused_rows[0].field_violations[0].description
    page = await kfeed_server.repositories.trades.list_range(TICKER, start=None, end=None, limit=10)
    assert [t.yes_price for t in page.items] == [first.yes_price.ten_thousandths]


BAD_TICKERS = ["A\nB", " KXLEAD", "KXTRAIL ", "KX\x00NUL", "KX SPACE", "KXÄ", "K" * 129, ""]


async def test_markets_with_bad_tickers_are_refused_and_the_good_one_is_readable(
    publisher: PublishSession, channel: grpc.aio.Channel
) -> None:
    markets = [market_to_proto(make_market(t)) for t in BAD_TICKERS] + [market_to_proto(MARKET)]
    ack = await publisher.send(pb.PublishRequest(markets=markets))
    assert ack.code == code_pb2.OK
    assert [(row.field, row.index) for row in ack.refused_rows] == [
        ("markets", i) for i in range(len(BAD_TICKERS))
    ]
    stub = market_service_pb2_grpc.MarketServiceStub(channel)
    listed = await stub.ListMarkets(market_service_pb2.ListMarketsRequest())
    assert [m.ticker for m in listed.markets] == [TICKER]


async def test_settlement_values_outside_zero_to_one_dollar_are_refused(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    too_much = market_to_proto(make_market("KXRULES-500", settlement_value=5_000_000))
    negative = market_to_proto(make_market("KXRULES-NEG", settlement_value=-1))
    settled = market_to_proto(make_market("KXRULES-OK", settlement_value=10_000))
    # A snapshot of a refused market is refused too: its market is not known.
    orphan = snapshot_to_proto(make_snapshot("KXRULES-500", 0))
    ack = await publisher.send(
        pb.PublishRequest(markets=[too_much, negative, settled], snapshots=[orphan])
    )
    assert (ack.code, ack.snapshots_stored) == (code_pb2.OK, 0)
    assert refused(ack) == [
        ("markets", 0, ["markets[0].settlement_value"]),
        ("markets", 1, ["markets[1].settlement_value"]),
        ("snapshots", 0, ["snapshots[0].ticker"]),
    ]
    stored = await kfeed_server.repositories.markets.get_market("KXRULES-OK")
    assert stored is not None
    assert stored.settlement_value == 10_000
    assert await kfeed_server.repositories.markets.get_market("KXRULES-500") is None


async def test_control_characters_and_huge_strings_are_refused(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    nul_title = market_to_proto(make_market("KXRULES-NUL", title="bad\x00title"))
    huge_rules = market_to_proto(make_market("KXRULES-HUGE", rules_primary="x" * 1_000_000))
    multi_line = market_to_proto(make_market("KXRULES-TEXT", rules_primary="line 1\nline 2\t."))
    huge_id = trade_to_proto(make_trade(TICKER, 0))
    huge_id.trade_id = "t" * 1_000_000
    ack = await publisher.send(
        pb.PublishRequest(
            markets=[nul_title, huge_rules, multi_line, market_to_proto(MARKET)],
            trades=[huge_id, trade_to_proto(make_trade(TICKER, 1))],
        )
    )
    assert (ack.code, ack.trades_stored) == (code_pb2.OK, 1)
    assert refused(ack) == [
        ("markets", 0, ["markets[0].title"]),
        ("markets", 1, ["markets[1].rules_primary"]),
        ("trades", 0, ["trades[0].trade_id"]),
    ]
    assert await kfeed_server.repositories.markets.get_market("KXRULES-TEXT") is not None
    assert await _stored_trade_ids(kfeed_server) == [make_trade(TICKER, 1).trade_id]


async def test_times_out_of_range_are_refused(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    year_10000 = timestamp_pb2.Timestamp(seconds=MAX_TIMESTAMP_SECONDS + 1)
    far_market = market_to_proto(make_market("KXRULES-FAR"))
    far_market.close_time.CopyFrom(year_10000)
    late_trade = trade_to_proto(make_trade(TICKER, 0))
    late_trade.create_time.CopyFrom(year_10000)
    bad_nanos = snapshot_to_proto(make_snapshot(TICKER, 0))
    bad_nanos.exchange_time.nanos = 1_000_000_000
    negative_nanos = snapshot_to_proto(make_snapshot(TICKER, 1))
    negative_nanos.receive_time.nanos = -1
    good = make_snapshot(TICKER, 2)
    ack = await publisher.send(
        pb.PublishRequest(
            markets=[far_market, market_to_proto(MARKET)],
            snapshots=[bad_nanos, negative_nanos, snapshot_to_proto(good)],
            trades=[late_trade],
        )
    )
    assert (ack.code, ack.snapshots_stored, ack.trades_stored) == (code_pb2.OK, 1, 0)
    assert refused(ack) == [
        ("markets", 0, ["markets[0].close_time"]),
        ("snapshots", 0, ["snapshots[0].exchange_time"]),
        ("snapshots", 1, ["snapshots[1].receive_time"]),
        ("trades", 0, ["trades[0].create_time"]),
    ]
    latest = await kfeed_server.repositories.snapshots.latest(TICKER)
    assert latest is not None
    assert latest.exchange_time == good.exchange_time


async def test_the_same_trade_twice_in_a_batch_is_stored_once_with_its_exact_time(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    exact = make_trade(TICKER, 0)
    whole_second = make_trade(TICKER, 0, create_time=exact.create_time.replace(microsecond=0))
    assert exact.create_time.microsecond != 0
    ack = await publisher.send(
        pb.PublishRequest(
            markets=[market_to_proto(MARKET)],
            trades=[
                trade_to_proto(whole_second),
                trade_to_proto(exact),
                trade_to_proto(whole_second),
            ],
        )
    )
    assert (ack.code, ack.trades_stored, refused(ack)) == (code_pb2.OK, 1, [])
    page = await kfeed_server.repositories.trades.list_range(TICKER, start=None, end=None, limit=10)
    assert [t.create_time for t in page.items] == [exact.create_time]


async def test_a_trade_resent_later_as_another_trade_is_refused_and_an_identical_one_is_not(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    stored = make_trade(TICKER, 0)
    ack = await publisher.publish(markets=[MARKET], trades=[stored])
    assert ack.trades_stored == 1
    other_price = replace(stored, yes_price=stored.yes_price + 100, no_price=stored.no_price - 100)
    other_side_and_count = replace(stored, taker_side=Side.NO, count=stored.count + 1)
    new = make_trade(TICKER, 1)
    ack = await publisher.publish(trades=[new, other_price])
    assert (ack.code, ack.trades_stored) == (code_pb2.OK, 1)
    assert refused(ack) == [("trades", 1, ["trades[1].yes_price", "trades[1].no_price"])]
    assert "stored: 4000" in ack.refused_rows[0].field_violations[0].description
    ack = await publisher.publish(trades=[other_side_and_count])
    assert refused(ack) == [("trades", 0, ["trades[0].count", "trades[0].taker_side"])]
    assert "stored: YES" in ack.refused_rows[0].field_violations[1].description
    again = await publisher.publish(trades=[stored])  # an identical resend: a harmless no-op
    assert (again.trades_stored, refused(again)) == (0, [])
    page = await kfeed_server.repositories.trades.list_range(TICKER, start=None, end=None, limit=10)
    assert page.items == [stored, new]


async def test_a_more_exact_time_does_not_refine_a_stored_trade_that_differs_otherwise(
    publisher: PublishSession, kfeed_server: KfeedServer
) -> None:
    exact = make_trade(TICKER, 0)
    whole_second = replace(exact, create_time=exact.create_time.replace(microsecond=0))
    await publisher.publish(markets=[MARKET], trades=[whole_second])
    ack = await publisher.publish(trades=[replace(exact, count=exact.count * 2)])
    assert (ack.trades_stored, refused(ack)) == (0, [("trades", 0, ["trades[0].count"])])
    page = await kfeed_server.repositories.trades.list_range(TICKER, start=None, end=None, limit=10)
    assert page.items == [whole_second]
