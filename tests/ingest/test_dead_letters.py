"""Refused rows go to the dead-letter file with the reason; the valid rows of their batch are
stored, the spool empties and later batches go through. `kfeed ingest`'s Publisher against a
real kfeed server on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from kfeed.v1 import ingest_service_pb2
from kfeed_ingest.dead_letters import DeadLetterFile
from kfeed_ingest.publisher import Backoff, Publisher
from kfeed_ingest.spool import Spool
from kfeed_server.app import KfeedServer
from kfeed_server.transport.convert import market_to_proto, snapshot_to_proto, trade_to_proto
from tests.support.factories import make_market, make_snapshot, make_trade

TICKER = "KXDEAD-26DEC05-T1"


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_refused_rows_are_dead_lettered_and_the_feed_goes_on(
    kfeed_server: KfeedServer, tmp_path: Path
) -> None:
    bad_trade = trade_to_proto(make_trade(TICKER, 1))
    bad_trade.no_price.ten_thousandths += 1
    bad_title = market_to_proto(make_market("KXDEAD-NUL", title="a\x00b"))
    columns_row = snapshot_to_proto(make_snapshot(TICKER, 0))
    first = ingest_service_pb2.PublishRequest(
        markets=[bad_title, market_to_proto(make_market(TICKER))],
        snapshots=[columns_row],
        trades=[trade_to_proto(make_trade(TICKER, 0)), bad_trade],
    )
    # A trade of the first batch again, with another count: refused against the stored one.
    resent_differently = trade_to_proto(make_trade(TICKER, 0, count=200))
    second = ingest_service_pb2.PublishRequest(
        trades=[trade_to_proto(make_trade(TICKER, 2)), resent_differently]
    )
    dead_letter_path = tmp_path / "dead" / "letters.jsonl"
    spool = Spool.open(tmp_path / "spool")
    publisher = Publisher(
        f"127.0.0.1:{kfeed_server.port}",
        spool,
        producer="dead-letter-test",
        backoff=Backoff(initial=0.02, maximum=0.1),
        dead_letters=DeadLetterFile(dead_letter_path, "dead-letter-test"),
    )
    async with publisher:
        await publisher.publish(first)
        await publisher.publish(second)
        async with asyncio.timeout(20):
            await publisher.flush()
    assert len(spool) == 0
    assert (publisher.stats.acked, publisher.stats.rejected) == (2, 0)
    assert publisher.stats.refused_rows == 3
    stored = await kfeed_server.repositories.trades.list_range(
        TICKER, start=None, end=None, limit=10
    )
    assert [t.trade_id for t in stored.items] == [
        make_trade(TICKER, 0).trade_id,
        make_trade(TICKER, 2).trade_id,
    ]
    assert await kfeed_server.repositories.snapshots.latest(TICKER) is not None

    letters = _lines(dead_letter_path)
    assert [(x["batch_id"], x["field"], x["index"]) for x in letters] == [
        (1, "markets", 0),
        (1, "trades", 1),
        (2, "trades", 1),
    ]
    assert letters[0]["violations"][0]["field"] == "markets[0].title"
    assert letters[0]["row"]["title"] == "a\x00b"
    assert letters[1]["violations"] == [
        {"field": "trades[1].no_price", "description": "must be $1 − yes_price"}
    ]
    assert letters[1]["row"]["trade_id"] == bad_trade.trade_id
    assert [v["field"] for v in letters[2]["violations"]] == ["trades[1].count"]
    assert letters[2]["row"]["trade_id"] == resent_differently.trade_id
    assert all(x["producer"] == "dead-letter-test" for x in letters)
