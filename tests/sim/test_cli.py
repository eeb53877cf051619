"""`kfeed sim` as a real process: prints its URLs, serves, stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import httpx

from kfeed_sim.cli import SimCommand


async def test_kfeed_sim_serves_until_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kfeed_cli.main", "sim", "--listen", "127.0.0.1:0",
        "--markets", "5", "--history-steps", "30",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "KFEED_SEED": "7"},
    )  # fmt: skip
    assert process.stdout is not None
    try:
        lines = [(await asyncio.wait_for(process.stdout.readline(), 20)).decode() for _ in range(3)]
        assert lines[0].startswith("kfeed sim: seed 7, 5 markets")
        rest_url = lines[1].split()[-1]
        assert rest_url.endswith("/trade-api/v2")
        assert lines[2].split()[-1].startswith("ws://")
        async with httpx.AsyncClient(base_url=rest_url) as client:
            markets = (await client.get("/markets")).json()["markets"]
        assert markets
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0


def test_firehose_is_off_unless_asked_for() -> None:
    assert SimCommand(firehose=True, ws_queue_size=7).sim_config().firehose
    assert SimCommand(ws_queue_size=7).sim_config().ws_queue_size == 7
    assert not SimCommand().sim_config().firehose
