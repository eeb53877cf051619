"""Configuration validation names the offending field; sweeps expand and rank."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from kfeed_server.backtest import (
    ConfigError,
    EngineConfig,
    FeeRounding,
    ParameterType,
    default_registry,
    rank,
    run_backtest,
    sweep_grid,
    validate_config,
)
from kfeed_server.backtest.sweep import walk_forward, walk_forward_splits
from kfeed_server.records.backtest import ParamValue, WalkForwardFold
from tests.support.backtest import T0, at, quote

BASE = EngineConfig("threshold", ("A",))


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (replace(BASE, strategy="nope"), "strategy"),
        (replace(BASE, parameters={"buy_bellow": 100}), "parameters.buy_bellow"),
        (replace(BASE, parameters={"buy_below": 0.4}), "parameters.buy_below"),
        (replace(BASE, parameters={"buy_below": True}), "parameters.buy_below"),
        (replace(BASE, parameters={"buy_below": 10_001}), "parameters.buy_below"),
        (replace(BASE, parameters={"count": 0}), "parameters.count"),
        # Each alone is valid, together they are not: the higher one is named.
        (replace(BASE, parameters={"buy_below": 7_000}), "parameters.sell_above"),
        (EngineConfig("mean_reversion", ("A",), {"entry_z": "2"}), "parameters.entry_z"),
        (EngineConfig("mean_reversion", ("A",), {"entry_z": float("nan")}), "parameters.entry_z"),
        (replace(BASE, tickers=()), "tickers"),
        (replace(BASE, tickers=("A", "A")), "tickers"),
        (replace(BASE, start_time=T0, end_time=T0), "end_time"),
        (replace(BASE, end_time=T0.replace(tzinfo=None)), "end_time"),
        (replace(BASE, initial_cash=0), "initial_cash"),
        (replace(BASE, taker_fee_rate_ten_thousandths=-1), "taker_fee_rate_ten_thousandths"),
        (replace(BASE, slippage=-5), "slippage"),
        (replace(BASE, max_position=-1), "max_position"),
        (replace(BASE, fee_rounding=9), "fee_rounding"),  # type: ignore[arg-type]
    ],
)
def test_invalid_config_names_the_field(config: EngineConfig, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_run_backtest_validates_too() -> None:
    with pytest.raises(ConfigError, match=r"^parameters\.zzz: unknown parameter"):
        run_backtest(replace(BASE, parameters={"zzz": 1}), {}, [])


def test_validation_fills_defaults_and_coerces() -> None:
    config = validate_config(
        EngineConfig("mean_reversion", ("A",), {"entry_z": 3}, fee_rounding=FeeRounding.UNSPECIFIED)
    )
    assert config.parameters == {"window": 20, "entry_z": 3.0, "exit_z": 0.0, "count": 100}
    assert isinstance(config.parameters["entry_z"], float)
    assert config.fee_rounding is FeeRounding.CENT


def test_builtins_expose_typed_schemas() -> None:
    names = [cls.name for cls in default_registry]
    assert {"threshold", "mean_reversion", "momentum", "favourite_hold"} <= set(names)
    threshold = default_registry.get("threshold")
    buy_below = threshold.parameters[0]
    assert (buy_below.name, buy_below.type, buy_below.default) == (
        "buy_below",
        ParameterType.DOLLARS,
        4_000,
    )
    for cls in default_registry:
        assert cls.description
        for spec in cls.parameters:
            assert spec.description
            # Every default passes its own schema.
            assert spec.default is None or spec.coerce(spec.default, spec.name) == spec.default


def test_sweep_expands_every_combination_in_a_stable_order() -> None:
    grid: dict[str, list[ParamValue]] = {"sell_above": [6_000, 7_000], "buy_below": [3_000, 4_000]}
    configs = sweep_grid(replace(BASE, parameters={"count": 200}), grid)
    points = [(c.parameters["buy_below"], c.parameters["sell_above"]) for c in configs]
    # Names sorted (buy_below, sell_above); values in the order given.
    assert points == [(3_000, 6_000), (3_000, 7_000), (4_000, 6_000), (4_000, 7_000)]
    assert all(c.parameters["count"] == 200 for c in configs)
    assert sweep_grid(BASE, {}) == [validate_config(BASE)]


@pytest.mark.parametrize(
    ("grid", "field"),
    [
        ({"buy_below": []}, "sweep.grid.buy_below"),
        ({"buy_below": [4_000, "x"]}, "sweep.grid.buy_below"),
        ({"nope": [1]}, "sweep.grid.nope"),
    ],
)
def test_bad_sweep_names_the_grid_entry(grid: dict[str, list[ParamValue]], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        sweep_grid(BASE, grid)
    assert caught.value.field == field


def test_rank_orders_sweep_results() -> None:
    # A path that pays a low entry and a high exit more.
    snapshots = [
        quote("A", 0, 1, 2_900, 3_000),
        quote("A", 1, 2, 6_500, 6_600),
        quote("A", 2, 3, 7_500, 7_600),
    ]
    configs = sweep_grid(BASE, {"buy_below": [3_000], "sell_above": [6_000, 7_000]})
    results = [run_backtest(c, {}, snapshots) for c in configs]
    # Bought at 0.30 both times; sold at 0.65 (sell_above 0.60) or 0.75 (sell_above 0.70).
    assert [r.metrics.total_pnl for r in results] == [3_100, 4_100]  # minus 2 × 200 in fees
    assert rank(results, "total_pnl") == [1, 0]
    assert rank(results, "pnl") == [1, 0]
    assert rank([r.metrics for r in results], "fees_paid") == [0, 1]  # tie keeps the order
    with pytest.raises(ConfigError) as caught:
        rank(results, "luck")
    assert caught.value.field == "sweep.rank_by"


def test_rank_puts_smaller_drawdown_first() -> None:
    down = run_backtest(
        replace(BASE, end_time=T0 + timedelta(hours=1)),
        {},
        [quote("A", 0, 1, 3_000, 3_100), quote("A", 1, 2, 1_000, 1_100)],
    )
    flat = run_backtest(BASE, {}, [quote("A", 0, 1, 5_000, 5_100)])
    assert down.metrics.max_drawdown > flat.metrics.max_drawdown == 0
    assert rank([down, flat], "max_drawdown") == [1, 0]


def test_walk_forward_splits_are_consecutive_folds_split_at_the_fraction() -> None:
    # 100 minutes, 2 folds of 50, 75 % in-sample: [0, 37.5) and [37.5, 50);
    # [50, 87.5) and [87.5, 100).
    splits = walk_forward_splits(at(0), at(100), 2, 0.75)
    assert splits == [
        WalkForwardFold(at(0), at(37.5), at(50)),
        WalkForwardFold(at(50), at(87.5), at(100)),
    ]
    with pytest.raises(ConfigError) as caught:
        walk_forward_splits(at(0), at(100), 0, 0.5)
    assert caught.value.field == "sweep.walk_forward.folds"
    with pytest.raises(ConfigError) as caught:
        walk_forward_splits(at(0), at(100), 2, 1.0)
    assert caught.value.field == "sweep.walk_forward.in_sample_fraction"


def test_walk_forward_picks_in_sample_and_tests_out_of_sample() -> None:
    # Fold 1 (minutes 0-9, in-sample 0-6): a dip to 0.30 then 0.70. Fold 2 (10-19): the same.
    prices = [(5_000, 5_100), (2_900, 3_000), (3_400, 3_500), (7_000, 7_100)] * 5
    rows = [quote("A", k, k + 1, bid, ask) for k, (bid, ask) in enumerate(prices)]
    base = EngineConfig("threshold", ("A",), start_time=at(0), end_time=at(20))
    grid: dict[str, list[ParamValue]] = {"buy_below": [3_000, 3_500], "sell_above": [6_000]}
    results = walk_forward(base, grid, "pnl", {}, rows, folds=2, in_sample_fraction=0.7)
    assert [r.fold for r in results] == [
        WalkForwardFold(at(0), at(7), at(10)),
        WalkForwardFold(at(10), at(17), at(20)),
    ]
    for result in results:
        # The chosen point is the best of the grid on the in-sample window...
        points: list[dict[str, ParamValue]] = [
            {"buy_below": 3_000, "sell_above": 6_000},
            {"buy_below": 3_500, "sell_above": 6_000},
        ]
        candidates = [
            run_backtest(replace(result.in_sample.config, parameters=point), {}, rows)
            for point in points
        ]
        assert result.in_sample.metrics.total_pnl == max(c.metrics.total_pnl for c in candidates)
        # ...and it is then run, unchanged, on the out-of-sample window only.
        tested = result.out_of_sample.config
        assert tested.parameters == result.in_sample.config.parameters
        assert (tested.start_time, tested.end_time) == (
            result.fold.out_of_sample_start,
            result.fold.end,
        )
        assert result.out_of_sample.fingerprint.row_count == 3
