"""Fixtures of the end-to-end tests: real `kfeed` processes (tests/support/processes.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kfeed_sim.signing import generate_key_pair
from tests.support.processes import KEY_ID, Server, Simulator, free_port, start_kfeed, wait_for_http


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
async def simulator(tmp_path: Path, log_dir: Path) -> AsyncIterator[Simulator]:
    private_pem, public_pem = generate_key_pair()
    private_key, public_key = tmp_path / "key.pem", tmp_path / "key.pub.pem"
    private_key.write_bytes(private_pem)
    public_key.write_bytes(public_pem)
    port = free_port()
    running = await start_kfeed("sim", [
        "--listen", f"127.0.0.1:{port}", "--seed", "11", "--markets", "6", "--no-auto-step",
        "--history-steps", "30", "--api-key-id", KEY_ID, "--api-public-key-file", str(public_key),
    ], log_dir)  # fmt: skip
    sim = Simulator(f"http://127.0.0.1:{port}", private_key, running)
    try:
        await wait_for_http(f"{sim.rest_url}/exchange/status", running)
        yield sim
    finally:
        assert await running.stop() == 0, running.log()


@pytest.fixture
async def server(database_url: str, log_dir: Path) -> AsyncIterator[Server]:
    started = Server(f"127.0.0.1:{free_port()}", database_url, log_dir)
    await started.start()
    try:
        yield started
    finally:
        if started.running is not None and started.running.process.returncode is None:
            assert await started.stop() == 0, started.running.log()
