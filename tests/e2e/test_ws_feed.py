"""`kfeed ingest --mode ws` against the simulator with skipped sequence numbers: gaps are detected,
recorded and recovered, and the stored books still equal the truth."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kfeed.v1 import types_pb2
from kfeed_server.db import create_engine
from kfeed_server.db.repositories import build_repositories
from kfeed_server.records import FeedGapRecord
from tests.support.processes import Server, Simulator, ingest_args, start_kfeed
from tests.support.truth import (
    assert_snapshots_match_truth,
    latest_state,
    open_tickers,
    read_everything,
    snapshot_view,
)
from tests.support.waiting import eventually


async def _caught_up(simulator: Simulator, server: Server, within: float = 30.0) -> list[str]:
    """Waits until the newest stored snapshot of every open market equals its truth; returns the
    differences left at the deadline (empty once caught up)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        truth = await simulator.truth()
        stored = await read_everything(server.address)
        differences = [
            f"{ticker}: stored {stored_view} != truth {latest_state(truth, ticker)}"
            for ticker in sorted(open_tickers(truth))
            if (stored_view := _newest(stored.snapshots.get(ticker, [])))
            != latest_state(truth, ticker)
        ]
        if not differences or asyncio.get_running_loop().time() > deadline:
            return differences
        await asyncio.sleep(0.5)


def _newest(snapshots: list[types_pb2.MarketSnapshot]) -> dict[str, int] | None:
    return snapshot_view(snapshots[-1]) if snapshots else None


async def _stored_gaps(server: Server) -> list[FeedGapRecord]:
    """Every stored gap (a run records well over a thousand), in id order."""
    engine = create_engine(server.database_url)
    try:
        repository = build_repositories(engine).feed_gaps
        gaps: list[FeedGapRecord] = []
        while page := await repository.list_gaps(
            tickers=None, after_id=gaps[-1].gap_id if gaps else 0, limit=1000
        ):
            gaps += page
    finally:
        await engine.dispose()
    return gaps


async def _every_gap_recovered(server: Server) -> bool:
    gaps = await _stored_gaps(server)
    return bool(gaps) and all(gap.recovered for gap in gaps)


async def test_ws_feed_with_sequence_gaps_recovers_and_matches_truth(
    simulator: Simulator, server: Server, tmp_path: Path, log_dir: Path
) -> None:
    args = ingest_args(simulator, server, tmp_path / "spool", "--mode", "ws")
    ingest = await start_kfeed("ingest", args, log_dir)
    try:
        assert await _caught_up(simulator, server) == []
        await simulator.set_faults(sequence_gap_rate=0.2)
        for _ in range(15):
            await simulator.step()
            await asyncio.sleep(0.05)
        await simulator.set_faults(sequence_gap_rate=0.0)
        await simulator.step()
        assert await _caught_up(simulator, server) == []
        # Books and quotes right again do not mean every repair is done: a trade or ticker gap
        # is marked recovered by a REST read the ingest makes a moment later (0.25 s after the
        # gap, then the read). Once caught up, every gap is stored (the gaps went out before the
        # last step's snapshots). A stop would still make those reads (--repair-grace; the test
        # below), but this one checks that the running ingest makes them.
        await eventually(
            lambda: _every_gap_recovered(server), within=30, what="every gap recovered"
        )
    finally:
        assert await ingest.stop() == 0, ingest.log()

    truth = await simulator.truth()
    assert_snapshots_match_truth(await read_everything(server.address), truth)
    gaps = await _stored_gaps(server)
    assert gaps, "the sim skipped sequence numbers but no gap was recorded"
    assert [gap for gap in gaps if not gap.recovered] == []


_REST_LATENCY_MS = 3_000  # every REST read: the repair of a gap is still in flight at SIGTERM


async def _repairable_gaps(server: Server) -> list[FeedGapRecord]:
    """The stored gaps a REST read repairs (an order-book gap waits for a socket snapshot)."""
    return [gap for gap in await _stored_gaps(server) if gap.channel != "orderbook_delta"]


async def test_a_gap_detected_just_before_sigterm_is_repaired_before_the_ingest_exits(
    simulator: Simulator, server: Server, tmp_path: Path, log_dir: Path
) -> None:
    args = ingest_args(simulator, server, tmp_path / "spool", "--mode", "ws")
    ingest = await start_kfeed("ingest", [*args, "--repair-grace", "20"], log_dir)
    try:
        assert await _caught_up(simulator, server) == []
        await simulator.set_faults(latency_ms=_REST_LATENCY_MS, sequence_gap_rate=0.3)

        async def an_unrecovered_gap_is_stored() -> bool:
            if any(not gap.recovered for gap in await _repairable_gaps(server)):
                return True
            await simulator.step()
            return False

        await eventually(an_unrecovered_gap_is_stored, within=30, what="an unrecovered gap")
        await simulator.set_faults(sequence_gap_rate=0.0)
        # Its repair read waits out the REST latency: SIGTERM comes first.
        assert any(not gap.recovered for gap in await _repairable_gaps(server))
    finally:
        assert await ingest.stop(within=40) == 0, ingest.log()

    gaps = await _repairable_gaps(server)
    assert gaps
    assert [gap for gap in gaps if not gap.recovered] == [], ingest.log()[-3000:]
