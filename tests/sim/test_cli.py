"""`kfeed sim` as a real process: prints its URLs, serves, stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from kfeed_sim.cli import SimCommand
from kfeed_sim.signing import load_private_key, load_public_key, sign_request, verify_signature


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


def test_the_sim_hands_out_a_key_pair_it_then_accepts(tmp_path: Path) -> None:
    private_path, public_path = tmp_path / "key.pem", tmp_path / "key.pub.pem"
    command = SimCommand(
        api_key_id="demo", api_public_key_file=public_path, api_private_key_file=private_path
    )
    accepted = command.sim_config().api_keys["demo"]
    assert private_path.stat().st_mode & 0o777 == 0o600
    private_pem = private_path.read_bytes()
    private_key = load_private_key(private_pem)
    public_key = load_public_key(accepted.encode())
    signature = sign_request(private_key, 1, "GET", "/trade-api/ws/v2")
    assert verify_signature(public_key, signature, 1, "GET", "/trade-api/ws/v2")
    # A pair already handed out is kept.
    assert command.sim_config().api_keys["demo"] == accepted
    assert private_path.read_bytes() == private_pem


def test_a_private_key_file_needs_the_key_id_and_the_public_key_file(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="--api-private-key-file needs --api-key-id"):
        SimCommand(api_private_key_file=tmp_path / "key.pem")
