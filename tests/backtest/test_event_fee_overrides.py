"""Event-level fee overrides through ingest's publish path, storage and CreateBacktest (real
server, both databases): a taker fill pays its series' fee unless its event overrides the fee type
or the multiplier. Fees hand-computed."""

from __future__ import annotations

import pytest

from kfeed.v1 import backtest_service_pb2 as pb
from kfeed.v1 import backtest_service_pb2_grpc as pb_grpc
from kfeed.v1 import ingest_service_pb2
from kfeed_server.records import EventRecord
from kfeed_server.transport.convert import event_to_proto, market_to_proto, series_to_proto
from tests.support.backtest_service import (
    all_executions,
    publish_snapshots,
    run_to_end,
    threshold_config,
)
from tests.support.factories import make_event, make_market, make_series, make_snapshot
from tests.support.servers import PublishSession

TICKER = "KXFEE-1"


# Ten contracts bought at $0.40, taker coefficient 0.07, cent rounding (the default):
#   series quadratic × 1:           0.07 × 1   × 10 × 0.40 × 0.60 = 0.168 → $0.17
#   event multiplier override 2:    0.07 × 2   × 10 × 0.24        = 0.336 → $0.34
#   event multiplier override 0.35: 0.07 × 0.35 × 10 × 0.24       = 0.0588 → $0.06
#   event fee type override flat (charged at P = 0.50): 0.07 × 10 × 0.25 = 0.175 → $0.18
@pytest.mark.parametrize(
    ("fee_type_override", "multiplier_override", "fee"),
    [("", None, 1_700), ("", 20_000, 3_400), ("", 3_500, 600), ("flat", None, 1_800)],
)
async def test_a_fill_pays_its_series_fee_unless_its_event_overrides_it(
    stub: pb_grpc.BacktestServiceAsyncStub,
    publisher: PublishSession,
    fee_type_override: str,
    multiplier_override: int | None,
    fee: int,
) -> None:
    market = make_market(TICKER)
    event: EventRecord = make_event(
        market.event_ticker,
        fee_type_override=fee_type_override,
        fee_multiplier_override_ten_thousandths=multiplier_override,
    )
    request = ingest_service_pb2.PublishRequest(
        batch_id=0,
        producer="tests",
        series=[
            series_to_proto(
                make_series(fee_type="quadratic", fee_multiplier_ten_thousandths=10_000)
            )
        ],
        events=[event_to_proto(event)],
        markets=[market_to_proto(market)],
    )
    assert (await publisher.send(request)).code == 0
    await publish_snapshots(
        publisher,
        [
            make_snapshot(TICKER, i, yes_bid=3_800, yes_ask=4_000, no_bid=6_000, no_ask=6_200)
            for i in range(3)
        ],
    )
    run = await run_to_end(
        stub,
        threshold_config((TICKER,), buy_below=4_000, sell_above=9_000, count=1_000),
    )
    assert run.state == pb.BACKTEST_STATE_SUCCEEDED, run.error_message
    buys = [
        e for e in await all_executions(stub, run.backtest_id) if e.action == pb.ORDER_ACTION_BUY
    ]
    assert [(b.count.hundredths, b.price.ten_thousandths, b.fee.ten_thousandths) for b in buys] == [
        (1_000, 4_000, fee)
    ]
