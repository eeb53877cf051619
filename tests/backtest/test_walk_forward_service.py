"""Walk-forward sweeps through CreateBacktest (real server, both databases): the folds' windows
(hand-computed), each fold's best in-sample child by the ranking metric, and its configuration run
out of sample — every child equal to the library's ``walk_forward`` over the same stored rows."""

from __future__ import annotations

import math
import statistics
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from kfeed.v1 import backtest_service_pb2 as pb
from kfeed.v1 import backtest_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer
from kfeed_server.backtest import EngineConfig
from kfeed_server.backtest.sweep import walk_forward
from kfeed_server.records import MarketRecord, MarketResult, MarketStatus, SnapshotRecord
from kfeed_server.transport.backtest_servicer import metrics_to_proto
from kfeed_server.transport.convert import dollars, timestamp
from tests.support.backtest_service import (
    TICKER,
    publish_snapshots,
    run_to_end,
    stored_window,
    threshold_config,
    watch_to_end,
)
from tests.support.factories import at, make_market, make_snapshot
from tests.support.servers import PublishSession, bad_request_fields

GRID = (3_000, 3_500, 4_000)


def _walk_forward_sweep(folds: int, fraction: float) -> pb.ParameterSweep:
    sweep = pb.ParameterSweep(rank_by="total_pnl")
    sweep.grid["buy_below"].values.extend(pb.ParameterValue(dollars_value=dollars(v)) for v in GRID)
    sweep.walk_forward.folds = folds
    sweep.walk_forward.in_sample_fraction = fraction
    return sweep


async def _children(stub: pb_grpc.BacktestServiceAsyncStub, parent_id: str) -> list[pb.Backtest]:
    request = pb.ListBacktestsRequest(parent_backtest_id=parent_id, page_size=500)
    return list((await stub.ListBacktests(request)).backtests)


async def test_a_walk_forward_sweep_reports_each_fold_as_the_library_computes_it(
    backtest_server: KfeedServer,
    stub: pb_grpc.BacktestServiceAsyncStub,
    recorded: list[SnapshotRecord],
) -> None:
    # The window [0 s, 600 s) in 2 folds of 300 s, each 0.5 in-sample:
    # fold 0: in-sample [0, 150), out-of-sample [150, 300); fold 1: [300, 450), [450, 600).
    parent = await run_to_end(stub, threshold_config(seconds=600), _walk_forward_sweep(2, 0.5))
    assert parent.state == pb.BACKTEST_STATE_SUCCEEDED, parent.error_message
    assert parent.sweep.walk_forward == pb.WalkForward(folds=2, in_sample_fraction=0.5)
    windows = [
        (f.fold, f.in_sample_start, f.out_of_sample_start, f.end) for f in parent.walk_forward_folds
    ]
    assert windows == [
        (0, timestamp(at(0)), timestamp(at(150)), timestamp(at(300))),
        (1, timestamp(at(300)), timestamp(at(450)), timestamp(at(600))),
    ]
    children = {c.backtest_id: c for c in await _children(stub, parent.backtest_id)}
    assert len(children) == 2 * (len(GRID) + 1)  # each fold: the grid in-sample, one test
    assert all(c.state == pb.BACKTEST_STATE_SUCCEEDED for c in children.values())

    # The library over the same stored rows and market.
    repositories = backtest_server.repositories
    rows = await stored_window(repositories, (TICKER,), at(0), at(600))
    market = await repositories.markets.get_market(TICKER)
    assert isinstance(market, MarketRecord)
    base = EngineConfig(
        strategy="threshold",
        tickers=(TICKER,),
        parameters={"sell_above": 6_000, "count": 100},
        start_time=at(0),
        end_time=at(600),
    )
    expected = walk_forward(
        base,
        {"buy_below": list(GRID)},
        "total_pnl",
        {TICKER: market},
        rows,
        folds=2,
        in_sample_fraction=0.5,
    )
    for fold, library in zip(parent.walk_forward_folds, expected, strict=True):
        best = children[fold.best_in_sample_backtest_id]
        tested = children[fold.out_of_sample_backtest_id]
        assert best.metrics == metrics_to_proto(library.in_sample.metrics)
        assert tested.metrics == metrics_to_proto(library.out_of_sample.metrics)
        assert tested.config.parameters == best.config.parameters
        assert (best.config.start_time, best.config.end_time) == (
            fold.in_sample_start,
            fold.out_of_sample_start,
        )
        assert (tested.config.start_time, tested.config.end_time) == (
            fold.out_of_sample_start,
            fold.end,
        )
        # The best is the best of its fold's in-sample children.
        in_sample = [
            c.metrics.total_pnl.ten_thousandths
            for c in children.values()
            if c.config.start_time == fold.in_sample_start
        ]
        assert len(in_sample) == len(GRID)
        assert best.metrics.total_pnl.ten_thousandths == max(in_sample)


@pytest.mark.parametrize(
    ("field", "folds", "fraction", "open_end"),
    [
        ("sweep.walk_forward.folds", 0, 0.5, False),
        ("sweep.walk_forward.folds", 70, 0.5, False),  # 70 × 4 runs > 256
        ("sweep.walk_forward.folds", 10**9, 0.5, False),
        ("sweep.walk_forward.in_sample_fraction", 2, 1.0, False),
        ("sweep.walk_forward.in_sample_fraction", 2, math.nan, False),
        ("config.end_time", 2, 0.5, True),
    ],
)
async def test_bad_walk_forward_requests_name_the_field(
    stub: pb_grpc.BacktestServiceAsyncStub,
    recorded: list[SnapshotRecord],
    field: str,
    folds: int,
    fraction: float,
    open_end: bool,
) -> None:
    config = threshold_config(seconds=600)
    if open_end:
        config.ClearField("end_time")
    request = pb.CreateBacktestRequest(config=config, sweep=_walk_forward_sweep(folds, fraction))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreateBacktest(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(raised.value) == [field]


MIDNIGHT = datetime(2025, 3, 15, tzinfo=UTC)


def _quote(ticker: str, day: int, hour: int, bid: int, ask: int) -> SnapshotRecord:
    return make_snapshot(
        ticker, 0, exchange_time=MIDNIGHT + timedelta(days=day, hours=hour),
        yes_bid=bid, yes_ask=ask, no_bid=10_000 - ask, no_ask=10_000 - bid,
    )  # fmt: skip


async def test_a_walk_forward_parent_holds_its_out_of_sample_runs_stitched(
    stub: pb_grpc.BacktestServiceAsyncStub, publisher: PublishSession
) -> None:
    # Six days from a UTC midnight in 3 folds of 2 days, each half in-sample: fold k is
    # in-sample on day 2k and out of sample on day 2k + 1. Nothing is recorded in-sample (the
    # one grid point is the best of each fold); out of sample the threshold rule (buy one YES
    # contract at an ask <= $0.40, sell at a bid >= $0.60) trades, from $10.00 (C = 100,000):
    #
    # day 1, A: 01 h buy at 4,000 + fee 200 (7% × 0.4 × 0.6 = $0.0168 → $0.02), marked at
    #   3,800: −400; 05 h sell at 6,000 − 200 = 5,800: realised +1,600. Fold 0 PnL +1,600.
    # day 3, A: 01 h buy as above: −400; 03 h marked at 2,000: −2,200; A settles NO at 04 h:
    #   pays 0, realised −4,200; 05 h A quotes again, the buy is refused (settled). PnL −4,200.
    # day 5, B: 01 h buy at 3,700 + 200 (7% × 0.37 × 0.63 = $0.0163 → $0.02) = 3,900, marked at
    #   3,500: −400; 02 h marked at 2,800: −1,100; 04 h sell at 6,500 − 200 (7% × 0.65 × 0.35 =
    #   $0.0159 → $0.02) = 6,300: realised +2,400. PnL +2,400.
    await publisher.publish(
        markets=[
            make_market("A", status=MarketStatus.FINALIZED, result=MarketResult.NO,
                        settlement_time=MIDNIGHT + timedelta(days=3, hours=4)),
            make_market("B"),
        ]
    )  # fmt: skip
    await publish_snapshots(
        publisher,
        [
            _quote("A", 1, 1, 3_800, 4_000),
            _quote("A", 1, 5, 6_000, 6_200),
            _quote("A", 3, 1, 3_800, 4_000),
            _quote("A", 3, 3, 2_000, 2_200),
            _quote("A", 3, 5, 3_000, 3_200),
            _quote("B", 5, 1, 3_500, 3_700),
            _quote("B", 5, 2, 2_800, 3_000),
            _quote("B", 5, 4, 6_500, 6_700),
        ],
    )
    config = threshold_config(("A", "B"), buy_below=4_000, sell_above=6_000, count=100)
    config.start_time.CopyFrom(timestamp(MIDNIGHT))
    config.end_time.CopyFrom(timestamp(MIDNIGHT + timedelta(days=6)))
    config.initial_cash.CopyFrom(dollars(100_000))
    sweep = pb.ParameterSweep(rank_by="total_pnl")
    sweep.grid["buy_below"].values.append(pb.ParameterValue(dollars_value=dollars(4_000)))
    sweep.walk_forward.folds = 3
    sweep.walk_forward.in_sample_fraction = 0.5
    created = await stub.CreateBacktest(pb.CreateBacktestRequest(config=config, sweep=sweep))
    watched = await watch_to_end(stub, created.backtest.backtest_id)
    parent = (
        await stub.GetBacktest(pb.GetBacktestRequest(backtest_id=created.backtest.backtest_id))
    ).backtest
    assert parent.state == pb.BACKTEST_STATE_SUCCEEDED, parent.error_message
    assert watched[-1].metrics == parent.metrics
    children = {c.backtest_id: c for c in await _children(stub, parent.backtest_id)}
    tested = [children[f.out_of_sample_backtest_id] for f in parent.walk_forward_folds]
    assert [c.metrics.total_pnl.ten_thousandths for c in tested] == [1_600, -4_200, 2_400]

    # Stitched, fold k shifted by the PnL before it (0, +1,600, −2,600), after C at 1 d 01 h:
    #   1 d 01 h C − 400   1 d 05 h C + 1,600
    #   3 d 01 h C + 1,200   03 h C − 600   04 h C − 2,600   05 h C − 2,600
    #   5 d 01 h C − 3,000   02 h C − 3,700   04 h C − 200
    # Peak C + 1,600 from 1 d 05 h on; the deepest fall is to C − 3,700: 5,300, a fraction
    # 5,300 / 101,600 of the peak; the longest time under a peak is from 1 d 05 h to the end,
    # 5 d 04 h: 95 h (the first fall, 1 d 01 h to 05 h, lasts 4 h).
    # Day closes (two midnights between each fold's last and the next one's first point):
    #   C + 1,600, C + 1,600, C − 2,600, C − 2,600, then the final C − 200; daily returns
    #   1,600 / 100,000, 0, −4,200 / 101,600, 0, 2,400 / 97,400.
    returns = [1_600 / 100_000, 0.0, -4_200 / 101_600, 0.0, 2_400 / 97_400]
    downside = math.sqrt(sum(min(r, 0.0) ** 2 for r in returns) / len(returns))
    # Round trips +1,600, −4,200, +2,400: 2 of 3 won, profit factor 4,000 / 4,200, expectancy
    # −200 / 3 = −66.7 → −67. Open 4 h + 3 h + 3 h = 10 h of the 99 h from 1 d 01 h to 5 d 04 h.
    expected = pb.BacktestMetrics(
        total_pnl=dollars(-200),
        total_return=-200 / 100_000,
        sharpe_ratio=statistics.mean(returns) / statistics.stdev(returns) * math.sqrt(365),
        sortino_ratio=statistics.mean(returns) / downside * math.sqrt(365),
        max_drawdown=dollars(5_300),
        max_drawdown_fraction=5_300 / 101_600,
        win_rate=2 / 3,
        profit_factor=4_000 / 4_200,
        expectancy=dollars(-67),
        trade_count=5,  # 2 + 1 + 2 (a settlement is not a trade)
        fees_paid=dollars(1_000),
        exposure=10 / 99,
    )
    expected.max_drawdown_duration.FromTimedelta(timedelta(hours=95))
    assert parent.metrics.sharpe_ratio == pytest.approx(expected.sharpe_ratio)
    assert parent.metrics.sortino_ratio == pytest.approx(expected.sortino_ratio)
    parent.metrics.sharpe_ratio = expected.sharpe_ratio
    parent.metrics.sortino_ratio = expected.sortino_ratio
    assert parent.metrics.exposure == pytest.approx(expected.exposure)
    parent.metrics.exposure = expected.exposure
    assert parent.metrics == expected
