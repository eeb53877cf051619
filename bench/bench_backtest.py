"""Backtest engine throughput: the threshold strategy over 1,000,000 synthetic snapshots in memory,
against a numpy vectorised implementation of the same rule over the same records.

Run: ``uv run python -m bench.bench_backtest [--snapshots N] [--markets M] [--seed S]``. The last
line printed is a one-line JSON summary. The two implementations must agree on the final PnL to the
1/10,000 USD, or the run fails.

The numpy time includes reading the columns out of the records (the input both implementations get:
stored rows, not pre-built arrays); the kernel alone is reported too.

The other compiled rules (mean reversion, favourite-hold, momentum, and the spread maker over the
records and a synthetic trade every 5 snapshots) are timed against the engine over the same
records, and must give an equal result (``--rules-only``: just those).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import numpy as np

from kfeed_server.backtest import EngineConfig, Fingerprinter, fingerprint, run_backtest
from kfeed_server.backtest.config import COMPILED_WITH_TRADES
from kfeed_server.backtest.engine import MarketEvent
from kfeed_server.backtest.fast import columns_from_records, run_fast, sweep_fast, warm_up
from kfeed_server.backtest.feeding import SEND_ROWS
from kfeed_server.backtest.replay_batches import batch_from_records
from kfeed_server.records import DataSource, MarketStatus, Side, SnapshotRecord, TradeRecord

BUY_BELOW = 4_000
SELL_ABOVE = 6_000
COUNT = 100  # one contract
FEE_RATE = 700
TARGET_RATIO = 0.3


@dataclass(frozen=True, slots=True)
class Timing:
    seconds: float
    pnl: int


def synthetic_snapshots(count: int, markets: int, seed: int) -> list[SnapshotRecord]:
    """Random-walk YES quotes (spread 1-3 cents) for ``markets`` markets, interleaved, one second
    apart; NO quotes are the complements. Prices are shared int objects to keep memory down."""
    rng = np.random.default_rng(seed)
    prices = list(range(10_001))
    market_of = rng.integers(0, markets, size=count)
    steps = rng.choice(np.array([-100, 0, 100]), size=count)
    spreads = rng.integers(1, 4, size=count) * 100
    mids = np.full(markets, 5_000, dtype=np.int64)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    tickers = [f"BENCH-{m}" for m in range(markets)]
    snapshots = []
    for i, (m, step, spread) in enumerate(
        zip(market_of.tolist(), steps.tolist(), spreads.tolist(), strict=True)
    ):
        mid = min(max(int(mids[m]) + step, 500), 9_500)
        mids[m] = mid
        bid, ask = mid - spread // 2, mid - spread // 2 + spread
        moment = start + timedelta(seconds=i)
        snapshots.append(
            SnapshotRecord(
                ticker=tickers[m],
                exchange_time=moment,
                receive_time=moment,
                source=DataSource.BACKFILL,
                yes_bid=prices[bid],
                yes_ask=prices[ask],
                no_bid=prices[10_000 - ask],
                no_ask=prices[10_000 - bid],
                status=MarketStatus.OPEN,
                snapshot_id=i + 1,
            )
        )
    return snapshots


def synthetic_trades(snapshots: list[SnapshotRecord], seed: int) -> list[TradeRecord]:
    """A public trade half a second after every 5th snapshot, a cent through its YES bid (a
    taker selling YES) or its ask (buying YES), 1-4 contracts: the synthetic snapshots show no
    sizes, so the market maker's resting orders fill on trades through their price."""
    rng = np.random.default_rng(seed)
    trades = []
    for k in range(0, len(snapshots), 5):
        row = snapshots[k]
        assert row.yes_bid is not None
        assert row.yes_ask is not None
        sells = bool(rng.random() < 0.5)
        price = row.yes_bid - 100 if sells else row.yes_ask + 100
        trades.append(
            TradeRecord(f"T{k}", row.ticker, price, 10_000 - price, int(rng.integers(1, 5)) * 100,
                        Side.NO if sells else Side.YES,
                        row.exchange_time + timedelta(milliseconds=500))
        )  # fmt: skip
    return trades


def with_trades(snapshots: list[SnapshotRecord], trades: list[TradeRecord]) -> list[MarketEvent]:
    """The engine's input: each trade before the first snapshot at or after its time."""
    events: list[MarketEvent] = []
    k = 0
    for row in snapshots:
        while k < len(trades) and trades[k].create_time <= row.exchange_time:
            events.append(trades[k])
            k += 1
        events.append(row)
    return events + trades[k:]


def columnar_fingerprinter(snapshots: list[SnapshotRecord]) -> Fingerprinter:
    """What the service's worker does with the columns it receives: hash them batch by batch (the
    batches built from the records here, as the database read builds them in the service)."""
    fingerprinter = Fingerprinter()
    for first in range(0, len(snapshots), SEND_ROWS):
        fingerprinter.add_batch(batch_from_records(snapshots[first : first + SEND_ROWS]))
    return fingerprinter


def run_engine(
    snapshots: list[SnapshotRecord], tickers: tuple[str, ...], *, engine_hashes: bool
) -> Timing:
    """The engine alone. ``engine_hashes``: the engine fingerprints the rows itself (direct
    callers); otherwise the fingerprint comes from the columns, as in the service, and its
    cost is measured apart (it runs in the server process, in parallel with the worker)."""
    config = EngineConfig(
        strategy="threshold",
        tickers=tickers,
        parameters={"buy_below": BUY_BELOW, "sell_above": SELL_ABOVE, "count": COUNT},
    )
    fingerprinter = None if engine_hashes else columnar_fingerprinter(snapshots)
    began = time.perf_counter()
    result = run_backtest(config, {}, snapshots, total=len(snapshots), fingerprinter=fingerprinter)
    return Timing(time.perf_counter() - began, result.metrics.total_pnl)


def _cent_fees(prices: np.ndarray) -> np.ndarray:
    # ceil(0.07 × C × P × (1 − P)) to the cent, exact in int64 (see kfeed_server.backtest.fees).
    numerator = FEE_RATE * COUNT * prices * (10_000 - prices)
    fees: np.ndarray = -(-numerator // 10**12) * 100
    return fees


def threshold_pnl_numpy(codes: np.ndarray, bids: np.ndarray, asks: np.ndarray, markets: int) -> int:
    """The threshold rule vectorised per market: the position after each snapshot is the last
    signal so far (buy = 1 when the ask <= buy_below, sell = 0 when the bid >= sell_above; they
    cannot coincide since bid <= ask and buy_below < sell_above), forward-filled."""
    pnl = 0
    for market in range(markets):
        mask = codes == market
        bid, ask = bids[mask], asks[mask]
        if bid.size == 0:
            continue
        signal = np.where(ask <= BUY_BELOW, 1, np.where(bid >= SELL_ABOVE, 0, -1))
        last_signal_at = np.maximum.accumulate(np.where(signal >= 0, np.arange(signal.size), 0))
        held = np.maximum(signal[last_signal_at], 0)
        change = np.diff(held, prepend=0)
        bought, sold = change == 1, change == -1
        # With one contract, amount = count × price / 100 = price exactly.
        pnl -= int((ask[bought] + _cent_fees(ask[bought])).sum())
        pnl += int((bid[sold] - _cent_fees(bid[sold])).sum())
        pnl += int(bid[-1]) if held[-1] else 0  # marked at the last bid, unsettled
    return pnl


def run_numpy(snapshots: list[SnapshotRecord], tickers: tuple[str, ...]) -> tuple[Timing, float]:
    """(total timing including column extraction, kernel-only seconds)."""
    code_of = {ticker: code for code, ticker in enumerate(tickers)}
    n = len(snapshots)
    began = time.perf_counter()
    codes = np.fromiter((code_of[s.ticker] for s in snapshots), dtype=np.int64, count=n)
    bids = np.fromiter((s.yes_bid for s in snapshots), dtype=np.int64, count=n)
    asks = np.fromiter((s.yes_ask for s in snapshots), dtype=np.int64, count=n)
    kernel_began = time.perf_counter()
    pnl = threshold_pnl_numpy(codes, bids, asks, len(tickers))
    ended = time.perf_counter()
    return Timing(ended - began, pnl), ended - kernel_began


def run_compiled(
    snapshots: list[SnapshotRecord], tickers: tuple[str, ...], fingerprinter: Fingerprinter
) -> tuple[Timing, float]:
    """The compiled path from the records (columns built, then the kernel and the full result:
    executions, curve, metrics): (total timing, seconds from the columns on)."""
    config = EngineConfig(
        strategy="threshold",
        tickers=tickers,
        parameters={"buy_below": BUY_BELOW, "sell_above": SELL_ABOVE, "count": COUNT},
    )
    began = time.perf_counter()
    columns = columns_from_records(snapshots, tickers)
    columns_ready = time.perf_counter()
    result = run_fast(config, {}, columns, fingerprinter)
    ended = time.perf_counter()
    assert result is not None
    return Timing(ended - began, result.metrics.total_pnl), ended - columns_ready


OTHER_RULES = (
    EngineConfig("mean_reversion", (), {"window": 20, "entry_z": 2.0, "count": COUNT}),
    EngineConfig("favourite_hold", (), {"min_price": 6_000, "max_price": 9_000, "count": COUNT}),
    EngineConfig("momentum", (), {"lookback": 10, "threshold": 200, "count": COUNT}),
    # Resting orders with the queue model, over the snapshots and the synthetic trades.
    EngineConfig("spread_maker", (), {"min_spread": 200, "max_inventory": 500, "count": COUNT}),
)


def compare_rule(
    rule: EngineConfig,
    snapshots: list[SnapshotRecord],
    tickers: tuple[str, ...],
    hashed: Fingerprinter,
    repeat: int,
    trades: list[TradeRecord],
) -> dict[str, object]:
    """``rule`` through the engine once (the slow side) and compiled from the records ``repeat``
    times (every run kept), both fingerprinted from the columns as in the service; the
    results must be equal. The market maker also replays ``trades`` (both sides)."""
    config = replace(rule, tickers=tickers)
    replayed = trades if config.strategy in COMPILED_WITH_TRADES else []
    events = with_trades(snapshots, replayed) if replayed else snapshots
    began = time.perf_counter()
    expected = run_backtest(config, {}, events, fingerprinter=hashed.copy())
    engine_seconds = time.perf_counter() - began
    runs = []
    from_columns = []
    equal = True
    for _ in range(repeat):
        began = time.perf_counter()
        columns = columns_from_records(snapshots, tickers)
        columns_ready = time.perf_counter()
        result = run_fast(config, {}, columns, hashed.copy(), trades=replayed)
        runs.append(time.perf_counter() - began)
        from_columns.append(time.perf_counter() - columns_ready)
        equal = equal and result == expected
    ratio = engine_seconds / min(runs)
    print(
        f"{rule.strategy}: engine {engine_seconds:.3f} s, compiled from the records "
        f"{[round(r, 3) for r in runs]} s: {ratio:.1f}x (from the columns "
        f"{[round(r, 3) for r in from_columns]} s); trades {expected.metrics.trade_count}, "
        f"equal: {equal}"
    )
    return {
        "rule": rule.strategy,
        "engine_seconds": round(engine_seconds, 4),
        "compiled_runs_seconds": [round(r, 4) for r in runs],
        "compiled_from_columns_seconds": [round(r, 4) for r in from_columns],
        "ratio_compiled_vs_engine": round(ratio, 2),
        "trade_count": expected.metrics.trade_count,
        "equal": equal,
    }


def run_sweep(
    snapshots: list[SnapshotRecord], tickers: tuple[str, ...], fingerprinter: Fingerprinter
) -> tuple[float, int]:
    """A 10 × 10 grid of (buy_below, sell_above) over the same records: columns built once, the
    kernel per point, a full result each. (seconds, points)."""
    base = EngineConfig("threshold", tickers, {"count": COUNT})
    configs = [
        replace(base, parameters={"buy_below": low, "sell_above": high, "count": COUNT})
        for low in range(3_000, 5_000, 200)
        for high in range(5_200, 7_200, 200)
    ]
    began = time.perf_counter()
    columns = columns_from_records(snapshots, tickers)
    results = sweep_fast(configs, {}, columns, [fingerprinter.copy() for _ in configs])
    seconds = time.perf_counter() - began
    assert all(r is not None for r in results)
    return seconds, len(configs)


def run_vectorbt(
    codes: np.ndarray, bids: np.ndarray, asks: np.ndarray, markets: int
) -> float | None:
    """vectorbt's Portfolio.from_signals on the same signals (entries: ask <= buy_below, exits:
    bid >= sell_above; one contract, buys at the ask, sells at the bid), one column per market.
    Seconds of the call (its own numba code compiled by a first call), None without vectorbt.
    Its fees are proportional, not Kalshi's, so only the time is compared."""
    try:
        import vectorbt as vbt  # type: ignore[import-untyped]
    except ImportError:
        return None
    length = max(int((codes == m).sum()) for m in range(markets))
    entries = np.zeros((length, markets), dtype=bool)
    exits = np.zeros((length, markets), dtype=bool)
    price = np.full((length, markets), np.nan)
    for m in range(markets):
        mask = codes == m
        bid, ask = bids[mask] / 10_000, asks[mask] / 10_000
        entry, leave = ask <= BUY_BELOW / 10_000, bid >= SELL_ABOVE / 10_000
        rows = bid.size
        entries[:rows, m], exits[:rows, m] = entry, leave
        price[:rows, m] = np.where(entry, ask, bid)

    def call() -> None:
        vbt.Portfolio.from_signals(
            price, entries, exits, size=1.0, init_cash=1_000.0, freq="1s"
        ).total_return()

    call()  # compiles vectorbt's kernels
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def _time_fingerprint(snapshots: list[SnapshotRecord]) -> float:
    began = time.perf_counter()
    fingerprint(snapshots)
    return time.perf_counter() - began


def _time_column_hashing(snapshots: list[SnapshotRecord]) -> float:
    batches = [
        batch_from_records(snapshots[first : first + SEND_ROWS])
        for first in range(0, len(snapshots), SEND_ROWS)
    ]
    began = time.perf_counter()
    fingerprinter = Fingerprinter()
    for batch in batches:
        fingerprinter.add_batch(batch)
    fingerprinter.result()
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--snapshots", type=int, default=1_000_000)
    parser.add_argument("--markets", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3, help="best of N for each implementation")
    parser.add_argument(
        "--rules-only", action="store_true", help="only the other compiled rules vs the engine"
    )
    args = parser.parse_args(argv)

    snapshots = synthetic_snapshots(args.snapshots, args.markets, args.seed)
    tickers = tuple(f"BENCH-{m}" for m in range(args.markets))
    # The records live for the whole run: keep the cyclic collector from rescanning them.
    gc.collect()
    gc.freeze()
    warm_up()
    trades = synthetic_trades(snapshots, args.seed)
    hashed = columnar_fingerprinter(snapshots)
    rules = [
        compare_rule(rule, snapshots, tickers, hashed, args.repeat, trades) for rule in OTHER_RULES
    ]
    rules_equal = all(r["equal"] for r in rules)
    if args.rules_only:
        print(json.dumps({"benchmark": "backtest_rules", "snapshots": args.snapshots,
                          "markets": args.markets, "rules": rules}, sort_keys=True))  # fmt: skip
        return 0 if rules_equal else 1
    engine = min(
        (run_engine(snapshots, tickers, engine_hashes=False) for _ in range(args.repeat)),
        key=lambda t: t.seconds,
    )
    engine_hashing = min(
        (run_engine(snapshots, tickers, engine_hashes=True) for _ in range(args.repeat)),
        key=lambda t: t.seconds,
    )
    numpy_runs = [run_numpy(snapshots, tickers) for _ in range(args.repeat)]
    numpy_total, _ = min(numpy_runs, key=lambda r: r[0].seconds)
    numpy_kernel = min(kernel for _, kernel in numpy_runs)
    # The provenance hash is part of every run; timed alone to show what the loop itself costs.
    fingerprint_seconds = min(_time_fingerprint(snapshots) for _ in range(args.repeat))
    hashing_seconds = min(_time_column_hashing(snapshots) for _ in range(args.repeat))

    # The compiled path (warmed above, from numba's disk cache): best of N, every run kept for the
    # spread; its fingerprint comes from the columns, as in the service.
    compiled_runs = [run_compiled(snapshots, tickers, hashed.copy()) for _ in range(args.repeat)]
    compiled, _ = min(compiled_runs, key=lambda r: r[0].seconds)
    compiled_from_columns = min(seconds for _, seconds in compiled_runs)
    sweep_runs = [run_sweep(snapshots, tickers, hashed) for _ in range(max(1, args.repeat - 1))]
    sweep_seconds, sweep_points = min(sweep_runs)
    code_of = {ticker: code for code, ticker in enumerate(tickers)}
    codes = np.fromiter((code_of[s.ticker] for s in snapshots), dtype=np.int64)
    bids = np.fromiter((s.yes_bid for s in snapshots), dtype=np.int64)
    asks = np.fromiter((s.yes_ask for s in snapshots), dtype=np.int64)
    vectorbt_runs = [run_vectorbt(codes, bids, asks, args.markets) for _ in range(args.repeat)]
    vectorbt_seconds = min((v for v in vectorbt_runs if v is not None), default=None)

    engine_rate = args.snapshots / engine.seconds
    numpy_rate = args.snapshots / numpy_total.seconds
    ratio = engine_rate / numpy_rate
    hashing_rate = args.snapshots / engine_hashing.seconds
    agree = engine.pnl == numpy_total.pnl == engine_hashing.pnl
    print(
        f"engine : {engine.seconds:8.3f} s  {engine_rate:12,.0f} snapshots/s  PnL {engine.pnl}"
        "  (as the service runs it: rows fingerprinted from the columns)"
    )
    print(
        f"engine+hash: {engine_hashing.seconds:8.3f} s  {hashing_rate:12,.0f} snapshots/s  "
        f"(the engine fingerprinting the records itself: ratio {hashing_rate / numpy_rate:.3f})"
    )
    print(
        f"numpy  : {numpy_total.seconds:8.3f} s  {numpy_rate:12,.0f} snapshots/s  PnL "
        f"{numpy_total.pnl}  (kernel alone {numpy_kernel:.3f} s, "
        f"{args.snapshots / numpy_kernel:,.0f} snapshots/s)"
    )
    print(
        f"fingerprint of records alone: {fingerprint_seconds:.3f} s; hash the columns "
        f"(the worker, while the server reads): {hashing_seconds:.3f} s"
    )
    print(f"ratio  : {ratio:.3f} (target >= {TARGET_RATIO})  PnL agree: {agree}")
    compiled_ratio = numpy_total.seconds / compiled.seconds
    columns_ratio = numpy_kernel / compiled_from_columns
    spread = [round(r[0].seconds, 3) for r in compiled_runs]
    print(
        f"compiled: {compiled.seconds:8.3f} s from the records (runs {spread}), "
        f"{compiled_from_columns:.3f} s from the columns; PnL {compiled.pnl}"
    )
    print(
        f"  vs numpy from the records: {compiled_ratio:.2f}x; from the columns (numpy kernel "
        f"{numpy_kernel:.3f} s): {columns_ratio:.2f}x (target >= 1.0)"
    )
    if vectorbt_seconds is not None:
        print(
            f"  vs vectorbt Portfolio.from_signals on the same signals ({vectorbt_seconds:.3f} s, "
            f"arrays given): {vectorbt_seconds / compiled_from_columns:.2f}x (target >= 1.0)"
        )
    print(
        f"sweep  : {sweep_points} points {sweep_seconds:.3f} s = "
        f"{sweep_seconds / compiled.seconds:.2f}x one run (target <= 10)"
    )
    agree = agree and compiled.pnl == engine.pnl and rules_equal
    summary = {
        "benchmark": "backtest_threshold",
        "snapshots": args.snapshots,
        "markets": args.markets,
        "engine_seconds": round(engine.seconds, 4),
        "engine_snapshots_per_s": round(engine_rate),
        "numpy_seconds": round(numpy_total.seconds, 4),
        "numpy_snapshots_per_s": round(numpy_rate),
        "numpy_kernel_seconds": round(numpy_kernel, 4),
        "ratio": round(ratio, 3),
        "fingerprint_seconds": round(fingerprint_seconds, 4),
        "column_hash_seconds": round(hashing_seconds, 4),
        "engine_hashing_seconds": round(engine_hashing.seconds, 4),
        "ratio_engine_hashing": round(hashing_rate / numpy_rate, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "engine_pnl": engine.pnl,
        "numpy_pnl": numpy_total.pnl,
        "pnl_agree": agree,
        "compiled_seconds": round(compiled.seconds, 4),
        "compiled_runs_seconds": [round(r[0].seconds, 4) for r in compiled_runs],
        "compiled_from_columns_seconds": round(compiled_from_columns, 4),
        "ratio_compiled_vs_numpy_records": round(compiled_ratio, 3),
        "ratio_compiled_vs_numpy_columns": round(columns_ratio, 3),
        "vectorbt_seconds": None if vectorbt_seconds is None else round(vectorbt_seconds, 4),
        "ratio_compiled_vs_vectorbt": None
        if vectorbt_seconds is None
        else round(vectorbt_seconds / compiled_from_columns, 3),
        "sweep_points": sweep_points,
        "sweep_seconds": round(sweep_seconds, 4),
        "sweep_over_one_run": round(sweep_seconds / compiled.seconds, 3),
        "rules": rules,
    }
    print(json.dumps(summary, sort_keys=True))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
