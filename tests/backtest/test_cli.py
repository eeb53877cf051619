"""`kfeed backtest …` as real processes against a real server."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from kfeed_server.app import KfeedServer
from kfeed_server.records import SnapshotRecord
from tests.support.backtest_service import TICKER
from tests.support.factories import at

# Until the lead registers "backtest" in kfeed_cli.main's COMMANDS, the module runs itself.
COMMAND = (sys.executable, "-m", "kfeed_cli.main", "backtest")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


async def _kfeed_backtest(server: KfeedServer, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        *args,
        "--server",
        f"127.0.0.1:{server.port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    text = output.decode()
    assert process.returncode == 0, text
    return text


@pytest.mark.e2e
async def test_run_plots_and_show_list_strategies_print(
    database_url: str,
    backtest_server: KfeedServer,
    recorded: list[SnapshotRecord],
    tmp_path: Path,
) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("the CLI only talks gRPC: one database is enough")
    plot = tmp_path / "equity.png"
    output = await _kfeed_backtest(
        backtest_server,
        "run",
        "--strategy",
        "threshold",
        "--param",
        "buy_below=0.40",
        "--param",
        "sell_above=0.60",
        "--ticker",
        TICKER,
        "--from",
        at(0).isoformat(),
        "--to",
        at(10_000).isoformat(),
        "--plot",
        str(plot),
    )
    assert "total PnL" in output
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    backtests = await backtest_server.backtests.list(limit=10)
    (backtest,) = backtests.items
    assert backtest.metrics is not None
    assert f"{backtest.metrics.trade_count:,}" in output

    shown = await _kfeed_backtest(backtest_server, "show", backtest.backtest_id)
    assert backtest.content_hash in shown
    assert "buy_below" in shown
    listed = await _kfeed_backtest(backtest_server, "list", "--state", "succeeded")
    assert backtest.backtest_id in listed
    strategies = await _kfeed_backtest(backtest_server, "strategies")
    assert "mean_reversion" in strategies
