"""sim → ingest → serve as real processes, on SQLite and PostgreSQL: what kfeed stores equals the
simulator's truth exactly, with faults on, and across a server crash."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from tests.support.processes import Server, Simulator, free_port, ingest_args, run_kfeed
from tests.support.truth import (
    Stored,
    _micros,
    assert_markets_match_truth,
    assert_snapshots_match_truth,
    latest_state,
    open_tickers,
    read_everything,
    snapshot_view,
)


async def _poll_once_then_read(
    simulator: Simulator, server: Server, tmp_path: Path, log_dir: Path
) -> tuple[dict[str, Any], Stored]:
    """One successful `kfeed ingest --mode poll --once` pass; then the simulator's truth and
    everything the server stored."""
    args = ingest_args(simulator, server, tmp_path / "spool", "--mode", "poll", "--once")
    assert await run_kfeed("ingest", args, log_dir) == 0
    return await simulator.truth(), await read_everything(server.address)


async def test_poll_once_stores_the_simulators_truth_exactly(
    simulator: Simulator, server: Server, tmp_path: Path, log_dir: Path
) -> None:
    await simulator.step(3)
    truth, stored = await _poll_once_then_read(simulator, server, tmp_path, log_dir)
    assert open_tickers(truth) <= set(stored.markets)
    assert assert_snapshots_match_truth(stored, truth) >= len(open_tickers(truth))
    assert_markets_match_truth(stored, truth)
    for ticker in open_tickers(truth):
        assert snapshot_view(stored.snapshots[ticker][-1]) == latest_state(truth, ticker)


async def test_exchange_faults_are_retried_and_nothing_is_wrong(
    simulator: Simulator, server: Server, tmp_path: Path, log_dir: Path
) -> None:
    await simulator.step(2)
    await simulator.set_faults(error_rate=0.15, rate_limit_rate=0.15, malformed_rate=0.1)
    truth, stored = await _poll_once_then_read(simulator, server, tmp_path, log_dir)
    assert open_tickers(truth) <= set(stored.markets)
    assert_snapshots_match_truth(stored, truth)
    for ticker in open_tickers(truth):
        assert snapshot_view(stored.snapshots[ticker][-1]) == latest_state(truth, ticker)


async def test_server_killed_mid_ingest_loses_nothing_and_duplicates_nothing(
    simulator: Simulator, server: Server, tmp_path: Path, log_dir: Path
) -> None:
    spool = tmp_path / "spool"
    observed: list[dict[str, dict[str, int]]] = []

    async def poll_pass(expect_exit: int) -> None:
        truth = await simulator.truth()
        observed.append({t: latest_state(truth, t) for t in open_tickers(truth)})
        once = ingest_args(simulator, server, spool, "--mode", "poll", "--once")
        once += ["--flush-timeout", "3"]
        assert await run_kfeed("ingest", once, log_dir) == expect_exit

    await simulator.step(2)
    await poll_pass(0)
    await simulator.step(2)
    assert await server.stop(signal.SIGKILL) == -signal.SIGKILL
    await poll_pass(1)  # the server is down: the batch stays in the spool
    assert any(spool.iterdir())
    # Same database; a new port, because the killed server's port may meanwhile have become
    # the source port of some outgoing connection (they share the ephemeral range).
    server.address = f"127.0.0.1:{free_port()}"
    await server.start()
    await simulator.step(2)
    await poll_pass(0)  # resends the spooled batch, then the new pass

    truth = await simulator.truth()
    stored = await read_everything(server.address)
    assert_snapshots_match_truth(stored, truth)  # also: no instant stored twice
    for states in observed:
        for ticker, state in states.items():
            stored_times = {_micros(s.exchange_time) for s in stored.snapshots[ticker]}
            assert state["ts_us"] in stored_times, (ticker, state)
