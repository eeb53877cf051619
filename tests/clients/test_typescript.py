"""The TypeScript client (clients/typescript: protobuf-es v2 + Connect over gRPC) against a real
server: compiles it with tsc and runs its Node test (unary and server-streaming calls)."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.support.clients import NODE_BIN, ROOT, SNAPSHOT_COUNT, TICKER, run_command
from tests.support.servers import PublishSession

TYPESCRIPT = ROOT / "clients" / "typescript"


async def test_node_client_calls_the_server(address: str, seeded: PublishSession) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (NODE_BIN / "tsc").exists():
        pytest.fail("node_modules is missing: run `make install` (npm ci)")
    await run_command(NODE_BIN / "tsc", "-p", ".", cwd=TYPESCRIPT)
    expected_bids = ",".join(f"0.{4_000 + i}" for i in range(SNAPSHOT_COUNT))
    env = {
        **os.environ,
        "KFEED_ADDRESS": address,
        "KFEED_TICKER": TICKER,
        "KFEED_EXPECTED_BIDS": expected_bids,
    }
    report = await run_command(node, "--test", "dist/test/", cwd=TYPESCRIPT, env=env)
    assert "# pass 4" in report
    assert "# fail 0" in report
