"""`kfeed backtest …` as real processes against a real server."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from kfeed_server.app import KfeedServer, ServerConfig
from kfeed_server.backtest import FEE_SCHEDULE_VERSION, FillModel
from kfeed_server.records import SnapshotRecord
from kfeed_server.security import SecurityConfig
from tests.support.backtest_service import TICKER
from tests.support.factories import at
from tests.support.security import READ_TOKEN, write_tokens_file
from tests.support.servers import running_server

COMMAND = (sys.executable, "-m", "kfeed_cli.main", "backtest")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


async def _run(
    server: KfeedServer, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        *args,
        "--server",
        f"127.0.0.1:{server.port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def _kfeed_backtest(server: KfeedServer, *args: str) -> str:
    code, text = await _run(server, *args)
    assert code == 0, text
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
        "--fill-model",
        "depth",
        "--latency-ms",
        "1500",
        "--gap-policy",
        "refuse",
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
    assert backtest.config.fill_model is FillModel.DEPTH
    assert backtest.config.latency == timedelta(milliseconds=1_500)
    for shown_value in ("DEPTH", "0:00:01.500000", "REFUSE", FEE_SCHEDULE_VERSION, "feed gaps"):
        assert shown_value in shown
    listed = await _kfeed_backtest(backtest_server, "list", "--state", "succeeded")
    assert backtest.backtest_id in listed
    strategies = await _kfeed_backtest(backtest_server, "strategies")
    assert "mean_reversion" in strategies


@pytest.mark.e2e
async def test_the_token_comes_from_the_flag_or_kfeed_token(
    tmp_path: Path, sqlite_url: str
) -> None:
    security = SecurityConfig(auth_tokens_file=write_tokens_file(tmp_path))
    async with running_server(ServerConfig(database_url=sqlite_url, security=security)) as server:
        code, refused = await _run(server, "strategies")
        assert code == 1
        assert "UNAUTHENTICATED" in refused
        assert "threshold" in await _kfeed_backtest(server, "strategies", "--token", READ_TOKEN)
        code, listed = await _run(server, "strategies", env={"KFEED_TOKEN": READ_TOKEN})
        assert code == 0, listed
        assert "favourite_hold" in listed
        code, bad = await _run(
            server,
            "run",
            "--strategy",
            "threshold",
            "--initial-cash",
            "0.00001",
            env={"KFEED_TOKEN": READ_TOKEN},
        )
        assert code == 2, bad
        assert "at most four decimals" in bad


@pytest.mark.e2e
async def test_run_walks_forward_and_prints_each_fold(
    database_url: str,
    backtest_server: KfeedServer,
    recorded: list[SnapshotRecord],
) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("the CLI only talks gRPC: one database is enough")
    text = await _kfeed_backtest(
        backtest_server,
        "run",
        "--strategy", "threshold",
        "--ticker", TICKER,
        "--from", at(0).isoformat(),
        "--to", at(600).isoformat(),
        "--sweep", "buy_below=0.30,0.40",
        "--walk-forward", "2",
        "--in-sample-fraction", "0.5",
    )  # fmt: skip
    assert "walk-forward, best in-sample by total_pnl" in text
    # Fold windows: [0, 150) → [150, 300) and [300, 450) → [450, 600) seconds after at(0).
    for start, middle, end in ((0, 150, 300), (300, 450, 600)):
        moments = [at(s).strftime("%Y-%m-%d %H:%M:%S") for s in (start, middle, end)]
        assert f"{moments[0]} → {moments[1]}" in text
        assert f"{moments[1]} → {moments[2]}" in text
    code, refused = await _run(
        backtest_server, "run", "--strategy", "threshold", "--ticker", TICKER,
        "--walk-forward", "2",
    )  # fmt: skip
    assert code == 2, refused
    assert "--walk-forward needs a grid" in refused
