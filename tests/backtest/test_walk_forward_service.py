"""Walk-forward sweeps through CreateBacktest (real server, both databases): the folds' windows
(hand-computed), each fold's best in-sample child by the ranking metric, and its configuration run
out of sample — every child equal to the library's ``walk_forward`` over the same stored rows."""

from __future__ import annotations

import math

import grpc
import pytest

from kfeed.v1 import backtest_service_pb2 as pb
from kfeed.v1 import backtest_service_pb2_grpc as pb_grpc
from kfeed_server.app import KfeedServer
from kfeed_server.backtest import EngineConfig
from kfeed_server.backtest.sweep import walk_forward
from kfeed_server.records import MarketRecord, SnapshotRecord
from kfeed_server.transport.backtest_servicer import metrics_to_proto
from kfeed_server.transport.convert import dollars, timestamp
from tests.support.backtest_service import TICKER, run_to_end, stored_window, threshold_config
from tests.support.factories import at
from tests.support.servers import bad_request_fields

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
