"""The run API: determinism, worker-process friendliness, progress, cancellation, fingerprint."""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import pytest

from kfeed_server.backtest import (
    BacktestCancelled,
    ConfigError,
    EngineConfig,
    Order,
    Progress,
    StrategyError,
    fingerprint,
    run_backtest,
)
from kfeed_server.backtest.engine import DEFAULT_PROGRESS_EVERY
from kfeed_server.backtest.fees import FeeType, MarketFees
from kfeed_server.backtest.orders import Instruction
from kfeed_server.backtest.strategy import MarketView, PortfolioView, StrategyRegistry
from kfeed_server.records import MarketResult, OrderAction, Side, SnapshotRecord
from tests.support.backtest import quote, scripted_registry, settled
from tests.support.user_strategies import Dawdles


def _random_walk(count: int, seed: int) -> list[SnapshotRecord]:
    rng = np.random.default_rng(seed)
    mids = np.clip(5_000 + np.cumsum(rng.choice([-200, 0, 200], size=count)), 300, 9_700)
    tickers = ["A", "B", "C"]
    return [
        quote(tickers[k % 3], k, k + 1, int(mid) - 100, int(mid) + 100)
        for k, mid in enumerate(mids.tolist())
    ]


SNAPSHOTS = _random_walk(3_000, seed=11)
MARKETS = {"A": settled("A", MarketResult.YES, 1_500)}
CONFIG = EngineConfig("mean_reversion", ("A", "B", "C"), {"window": 10, "entry_z": 1.5})


def test_same_config_and_data_give_identical_results() -> None:
    first = run_backtest(CONFIG, MARKETS, SNAPSHOTS)
    second = run_backtest(CONFIG, MARKETS, iter(list(SNAPSHOTS)))
    assert first.metrics.trade_count > 10
    assert first == second
    # Bit for bit, floats included, through a pickle round trip (the worker-process path).
    assert pickle.dumps(first) == pickle.dumps(second)
    assert pickle.loads(pickle.dumps(first)) == first


def test_inputs_and_errors_pickle() -> None:
    assert pickle.loads(pickle.dumps(CONFIG)) == CONFIG
    error = pickle.loads(pickle.dumps(ConfigError("parameters.x", "bad")))
    assert (error.field, error.message) == ("parameters.x", "bad")
    assert pickle.loads(pickle.dumps(BacktestCancelled(7))).snapshots_processed == 7


def test_fingerprint_tracks_the_data() -> None:
    result = run_backtest(CONFIG, MARKETS, SNAPSHOTS)
    print_ = result.fingerprint
    assert (print_.row_count, print_.first_snapshot_id, print_.last_snapshot_id) == (
        3_000,
        1,
        3_000,
    )
    assert print_ == fingerprint(SNAPSHOTS, tickers=CONFIG.tickers, markets=MARKETS)
    assert len(print_.content_hash) == 64
    changed = [*SNAPSHOTS[:-1], SNAPSHOTS[-1]._replace(volume=1)]
    changed_print = fingerprint(changed, tickers=CONFIG.tickers, markets=MARKETS)
    assert changed_print.content_hash != print_.content_hash
    # Ingest metadata is not market data.
    moved = [*SNAPSHOTS[:-1], SNAPSHOTS[-1]._replace(receive_time=SNAPSHOTS[0].receive_time)]
    moved_print = fingerprint(moved, tickers=CONFIG.tickers, markets=MARKETS)
    assert moved_print.content_hash == print_.content_hash


def test_the_fingerprint_changes_when_a_market_settles_after_the_run() -> None:
    unsettled = {t: replace(m, result=MarketResult.UNSPECIFIED, settlement_time=None)
                 for t, m in MARKETS.items()}  # fmt: skip
    before = run_backtest(CONFIG, unsettled, SNAPSHOTS)
    after = run_backtest(CONFIG, MARKETS, SNAPSHOTS)
    # The same rows, but a market's result, settlement time and value are now known.
    assert before.fingerprint.row_count == after.fingerprint.row_count
    assert before.fingerprint.content_hash != after.fingerprint.content_hash
    value_changed = {**MARKETS, "A": replace(MARKETS["A"], settlement_value=1)}
    assert run_backtest(CONFIG, value_changed, SNAPSHOTS).fingerprint != after.fingerprint
    # And the fee terms used are part of it too.
    fees = {"A": MarketFees(FeeType.QUADRATIC, 5_000)}
    assert run_backtest(CONFIG, MARKETS, SNAPSHOTS, fees=fees).fingerprint != after.fingerprint


def test_only_the_window_and_tickers_are_replayed_and_fingerprinted() -> None:
    config = replace(
        CONFIG,
        tickers=("A",),
        start_time=SNAPSHOTS[300].exchange_time,
        end_time=SNAPSHOTS[600].exchange_time,
    )
    result = run_backtest(config, MARKETS, SNAPSHOTS)
    # Snapshots 300..599 are inside; every third one is A (indices 300, 303, ..., 597).
    assert result.fingerprint.row_count == 100
    assert result.fingerprint.first_snapshot_id == 301


def test_progress_is_reported_and_ends_at_one() -> None:
    reports: list[Progress] = []
    run_backtest(
        CONFIG, MARKETS, SNAPSHOTS, total=3_000, progress=reports.append, progress_every=1_000
    )
    assert [p.snapshots_processed for p in reports] == [1_000, 2_000, 3_000, 3_000]
    assert [p.fraction_done for p in reports] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert reports[-1].interim_pnl == run_backtest(CONFIG, MARKETS, SNAPSHOTS).metrics.total_pnl


def test_should_stop_cancels_promptly() -> None:
    consumed = 0

    def counting() -> Iterator[SnapshotRecord]:
        nonlocal consumed
        for snapshot in SNAPSHOTS:
            consumed += 1
            yield snapshot

    calls = 0

    def stop_on_second_check() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 2  # the first check is before any snapshot

    with pytest.raises(BacktestCancelled) as caught:
        run_backtest(
            CONFIG, MARKETS, counting(), should_stop=stop_on_second_check, progress_every=100
        )
    assert caught.value.snapshots_processed == 100
    assert consumed == 100


def test_a_slow_strategy_is_cancelled_promptly() -> None:
    """user_dawdles takes 0.5 ms a snapshot: a stop waiting for the next progress report (8,192
    snapshots) would land ≈4 s later; the time-based check sees it within ≈0.1 s."""
    requested_at: float | None = None

    class StopsItselfWhileDawdling(Dawdles):
        def on_snapshot(
            self, snapshot: SnapshotRecord, market: MarketView, portfolio: PortfolioView
        ) -> Sequence[Instruction]:
            nonlocal requested_at
            if snapshot.snapshot_id == 200:
                requested_at = time.monotonic()
            return super().on_snapshot(snapshot, market, portfolio)

    registry = StrategyRegistry()
    registry.register(StopsItselfWhileDawdling)
    config = EngineConfig(Dawdles.name, ("A", "B", "C"))
    with pytest.raises(BacktestCancelled) as caught:
        run_backtest(
            config,
            MARKETS,
            _random_walk(20_000, seed=3),
            registry=registry,
            should_stop=lambda: requested_at is not None,
        )
    assert requested_at is not None
    # Generous on a loaded machine, and still far below the ≈4 s of the progress-only check.
    assert time.monotonic() - requested_at < 1.5
    assert 200 <= caught.value.snapshots_processed < DEFAULT_PROGRESS_EVERY


def test_a_stop_before_the_start_reads_nothing() -> None:
    with pytest.raises(BacktestCancelled) as caught:
        run_backtest(CONFIG, MARKETS, SNAPSHOTS, should_stop=lambda: True)
    assert caught.value.snapshots_processed == 0


def test_malformed_orders_are_strategy_errors() -> None:
    for bad in (
        Order("A", Side.UNSPECIFIED, OrderAction.BUY, 100),
        Order("A", Side.YES, OrderAction.SETTLE, 100),
        Order("A", Side.YES, OrderAction.BUY, 0),
        Order("A", Side.YES, OrderAction.BUY, 100, probability=1.5),
    ):
        registry = scripted_registry({1: [bad]})
        with pytest.raises(StrategyError):
            run_backtest(EngineConfig("scripted", ("A",)), {}, SNAPSHOTS[:1], registry=registry)


def test_no_data_gives_an_empty_result() -> None:
    result = run_backtest(CONFIG, {}, [])
    assert result.executions == []
    assert result.equity_curve == []
    assert result.metrics.total_pnl == 0
    assert result.metrics.sharpe_ratio == 0.0
    assert result.fingerprint.row_count == 0
