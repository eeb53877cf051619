"""The kfeed-client wheel installs alone and talks to a server.

The wheel is built from clients/python, installed into a fresh virtual environment with only
its declared dependencies (from the uv cache or the index), and a script in that environment
makes a unary call and reads a stream from a real server running in this test process.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.support.clients import ROOT, SNAPSHOT_COUNT, TICKER, run_command
from tests.support.servers import PublishSession

CLIENT_SCRIPT = """
import asyncio, json, sys
from datetime import datetime, timezone
import kfeed_client

async def main(address, ticker):
    async with kfeed_client.connect(address) as client:
        market = await client.get_market(ticker)
        bids = []
        async for message in client.stream_snapshots(
            [ticker], start_time=datetime(2000, 1, 1, tzinfo=timezone.utc)
        ):
            if message.HasField("caught_up"):
                break
            bids.append(str(kfeed_client.dollars_to_decimal(message.snapshot.snapshot.yes_bid)))
    print(json.dumps({"title": market.title, "bids": bids}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
# Server-side packages that must not come along with the client.
SERVER_ONLY = ("sqlalchemy", "pydantic", "kfeed_server", "grpc_health", "betterproto2")


@pytest.fixture(scope="module")
def uv() -> str:
    path = shutil.which("uv")
    if path is None:
        pytest.fail("uv is required to build the client wheel")
    return path


async def test_wheel_installs_alone_and_calls_the_server(
    uv: str, tmp_path: Path, address: str, seeded: PublishSession
) -> None:
    dist = tmp_path / "dist"
    await run_command(
        uv, "build", "--package", "kfeed-client", "--wheel", "--out-dir", dist, cwd=ROOT
    )
    (wheel,) = dist.glob("kfeed_client-*.whl")
    venv = tmp_path / "venv"
    await run_command(uv, "venv", "--quiet", "--python", sys.executable, venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    await run_command(uv, "pip", "install", "--quiet", "--python", python, wheel, cwd=tmp_path)

    # Run outside the repository, so nothing but the venv's site-packages can be imported.
    origin = await run_command(
        python, "-c", "import kfeed_client; print(kfeed_client.__file__)", cwd=tmp_path
    )
    assert origin.startswith(str(venv))
    probe = f"import importlib.util as u; print([m for m in {SERVER_ONLY!r} if u.find_spec(m)])"
    assert await run_command(python, "-c", probe, cwd=tmp_path) == "[]\n"

    result = json.loads(
        await run_command(python, "-c", CLIENT_SCRIPT, address, TICKER, cwd=tmp_path)
    )
    assert result["title"] == f"Will {TICKER} happen?"
    assert result["bids"] == [f"0.{4000 + i}" for i in range(SNAPSHOT_COUNT)]

    markets = await run_command(
        venv / "bin" / "kfeed-client", "markets", "--server", address, "--json", cwd=tmp_path
    )
    assert TICKER in markets
