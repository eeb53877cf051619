"""Stitching runs (a walk-forward parent's combined out-of-sample metrics) measures them as one
run: a single run stitched alone has exactly its own metrics (but the Brier score, which stays on
the folds), over random orders with netting, settlements and several UTC days."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from kfeed_server.backtest import EngineConfig, Order, run_backtest
from kfeed_server.backtest.stitching import RunSegment, stitched_metrics
from kfeed_server.records import MarketResult, SnapshotRecord
from tests.backtest.test_properties import TICKERS, books, orders
from tests.support.backtest import at, scripted_registry, settled


@settings(max_examples=150, deadline=None)
@given(
    snapshots=books(),
    script=st.dictionaries(st.integers(1, 25), st.lists(orders, max_size=4)),
    initial_cash=st.integers(1, 100_000),
    hours_apart=st.integers(1, 30),
    settles_after=st.integers(0, 30),
    result=st.sampled_from([MarketResult.YES, MarketResult.NO, MarketResult.UNSPECIFIED]),
)
def test_a_run_stitched_alone_has_its_own_metrics(
    snapshots: list[SnapshotRecord],
    script: dict[int, list[Order]],
    initial_cash: int,
    hours_apart: int,
    settles_after: int,
    result: MarketResult,
) -> None:
    # Snapshots ``hours_apart`` hours apart: the run spans several UTC days (daily returns).
    spread = [s._replace(exchange_time=at(k * 60 * hours_apart)) for k, s in enumerate(snapshots)]
    config = EngineConfig("scripted", TICKERS, initial_cash=initial_cash)
    markets = {"A": settled("A", result, settles_after * 60 * hours_apart)}
    run = run_backtest(config, markets, spread, registry=scripted_registry(script))
    alone = stitched_metrics(
        initial_cash, [RunSegment(run.metrics, run.equity_curve, run.executions)]
    )
    assert alone == replace(run.metrics, brier_score=None)
