"""The examples in clients/typescript/README.md and clients/betterproto/README.md, run as written
against a real server, so the client READMEs cannot drift from the clients."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.support.clients import MARKETS, NODE_BIN, ROOT, SNAPSHOT_COUNT, TICKER, run_command
from tests.support.docs import code_blocks
from tests.support.servers import PublishSession

TYPESCRIPT = ROOT / "clients" / "typescript"
BETTERPROTO = ROOT / "clients" / "betterproto"


async def test_the_typescript_readme_example(
    address: str, seeded: PublishSession, tmp_path: Path
) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (NODE_BIN / "tsc").exists():
        pytest.fail("node_modules is missing: run `make install` (npm ci)")
    [example] = code_blocks(TYPESCRIPT / "README.md", "js")
    await run_command(NODE_BIN / "tsc", "-p", ".", cwd=TYPESCRIPT)
    # The README's file lives in clients/typescript/examples/; this copy lives elsewhere.
    built = (TYPESCRIPT / "dist" / "src" / "index.js").as_uri()
    script = tmp_path / "markets.mjs"
    script.write_text(example.replace('"../dist/src/index.js"', f'"{built}"'))
    output = await run_command(
        node, script, cwd=tmp_path, env={**os.environ, "KFEED_SERVER": address}
    )
    lines = output.splitlines()
    assert [line.split("\t")[0] for line in lines[:5]] == [m.ticker for m in MARKETS]
    assert lines[5] == f"latest {TICKER}: yes bid 0.{4_000 + SNAPSHOT_COUNT - 1}"
    assert lines[6:] == [f"{TICKER} yes bid 0.{4_000 + i}" for i in range(5)]


async def test_the_betterproto_readme_example(address: str, seeded: PublishSession) -> None:
    [example] = code_blocks(BETTERPROTO / "README.md", "python")
    env = {**os.environ, "KFEED_SERVER": address, "PYTHONPATH": str(BETTERPROTO / "src")}
    output = await run_command(sys.executable, "-c", example, cwd=ROOT, env=env)
    lines = output.splitlines()
    assert [line.split("\t")[0] for line in lines[:5]] == [m.ticker for m in MARKETS]
    assert lines[5:-1] == [f"{TICKER} 0.{4_000 + i}" for i in range(SNAPSHOT_COUNT)]
    assert lines[-1] == f"caught up after {SNAPSHOT_COUNT} snapshots"
