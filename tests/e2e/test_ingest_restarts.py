"""`kfeed ingest` SIGKILLed at random moments and restarted, while the simulated exchange trades
and its markets close, are determined and finalized: sim + serve + ingest as real processes.

Afterwards kfeed holds every trade the exchange published from the first start on, each once
and with its exact time (the WebSocket gives whole seconds; REST reads refine them), every
market it saw in its final state (status, result, settlement value and time, also after the
market left the open listing and across restarts), and only snapshots equal to the exchange's
state at their instant."""

from __future__ import annotations

import asyncio
import random
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support.processes import (
    KfeedProcess,
    Server,
    Simulator,
    ingest_args,
    start_kfeed,
    stop_once_agreeing,
)
from tests.support.truth import (
    Stored,
    assert_snapshots_match_truth,
    latest_state,
    lifecycle_differences,
    read_everything,
    read_trades,
    snapshot_view,
    trade_differences,
)
from tests.support.waiting import eventually

KILLS = 4


async def _streaming(ingest: KfeedProcess) -> None:
    """Until the (restarted) ingest has its WebSocket open: killed before, it would have read
    nothing."""

    def connected() -> bool:
        ingest.assert_running()
        return "connected to" in ingest.log()

    await eventually(connected, within=60, what="the ingest's WebSocket open")


async def _step_for(simulator: Simulator, steps: int, pause: float = 0.05) -> None:
    for _ in range(steps):
        await simulator.step()
        await asyncio.sleep(pause)


@pytest.mark.timeout(400)
async def test_sigkilled_ingest_loses_no_trade_lifecycle_change_or_snapshot(
    simulator: Simulator, server: Server, tmp_path: Path, log_dir: Path
) -> None:
    rng = random.Random(2026)
    # The exchange's clock runs ahead of this machine's, as it may in production.
    await simulator.step(40)
    now = datetime.fromisoformat((await simulator.truth())["now"].replace("Z", "+00:00"))
    since_us = (now - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    args = ingest_args(
        simulator, server, tmp_path / "spool", "--mode", "ws", "--discovery-interval", "1"
    )
    ingest: KfeedProcess = await start_kfeed("ingest", args, log_dir)

    async def stored_markets() -> bool:
        ingest.assert_running()
        return bool((await read_everything(server.address)).markets)

    await eventually(stored_markets, within=60, what="the first markets stored")
    for _ in range(KILLS):
        await _streaming(ingest)
        await _step_for(simulator, rng.randint(6, 16))
        await asyncio.sleep(rng.uniform(0.0, 0.4))  # anywhere in the ingest's work
        assert await ingest.stop(signal.SIGKILL) == -signal.SIGKILL
        await simulator.step(rng.randint(2, 8))  # the exchange moves on while none runs
        ingest = await start_kfeed("ingest", args, log_dir)
    # Long enough for every market seen at first to close, be determined and finalized.
    await _step_for(simulator, 130)

    async def differences() -> list[str]:
        truth = await simulator.truth()
        stored = await read_everything(server.address)
        trades = await read_trades(server.address, stored.markets)
        return [
            *lifecycle_differences(stored, truth),
            *trade_differences(trades, truth, since_us),
            *(
                f"{t}: newest snapshot {_newest(stored, t)} != exchange {latest_state(truth, t)}"
                for t in stored.markets
                if _newest(stored, t) != latest_state(truth, t)
            ),
        ]

    await stop_once_agreeing(ingest, differences, within=90)

    truth = await simulator.truth()
    stored = await read_everything(server.address)
    trades = await read_trades(server.address, stored.markets)
    assert lifecycle_differences(stored, truth) == []
    assert trade_differences(trades, truth, since_us) == []
    assert sum(len(t) for t in trades.values()) > 50
    finalized = [m for m in truth["markets"] if m["ticker"] in stored.markets]
    assert sum(m["states"][-1]["status"] == "finalized" for m in finalized) >= 5
    assert_snapshots_match_truth(stored, truth)  # also: no instant stored twice
    logs = await asyncio.to_thread(lambda: [p.read_text() for p in log_dir.glob("*-ingest.log")])
    assert not [log for log in logs if "Traceback" in log]


def _newest(stored: Stored, ticker: str) -> dict[str, int] | None:
    """The market's newest stored snapshot, in the truth's terms."""
    snapshots = stored.snapshots.get(ticker) or []
    return snapshot_view(snapshots[-1]) if snapshots else None
