"""The client CLI (`kfeed-client` / `kfeed tail|markets|snapshots`) against a real server."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.csv
import pyarrow.ipc
import pyarrow.parquet
import pytest
from rich.console import Console

from kfeed.v1 import ingest_service_pb2, types_pb2
from kfeed_client.cli import build_parser, env_name, execute, parse_time
from kfeed_ingest.kalshi.books import START, BookChange, change_columns, checkpoint, micros
from tests.support.clients import MARKETS, SNAPSHOT_COUNT, TICKER
from tests.support.factories import at, make_snapshot, make_trade
from tests.support.servers import PublishSession
from tests.support.waiting import eventually


async def run(*argv: str, output: io.StringIO | None = None) -> tuple[int, str]:
    """Run a command in this event loop; its exit status and what it printed (also into
    ``output`` as it goes, when given)."""
    output = output or io.StringIO()
    console = Console(file=output, width=200, color_system=None)
    status = await asyncio.wait_for(execute(build_parser().parse_args(argv), console), 10)
    return status, output.getvalue()


async def test_markets_lists_every_market(address: str, seeded: PublishSession) -> None:
    status, table = await run("markets", "--server", address)
    _, lines = await run("markets", "--server", address, "--json")
    assert status == 0
    assert all(m.ticker in table and m.title in table for m in MARKETS)
    assert [json.loads(line)["ticker"] for line in lines.splitlines()] == [
        m.ticker for m in MARKETS
    ]


async def test_snapshots_prints_dollars_and_contracts(address: str, seeded: PublishSession) -> None:
    status, text = await run("snapshots", TICKER, "--server", address, "--limit", "2")
    lines = text.splitlines()
    assert status == 0
    assert len(lines) == 2
    assert "yes 0.4000×0.4100  no 0.5900×0.6000  last 0.4050  vol 0.00" in lines[0]
    assert "2025-03-14 15:09:27.535" in lines[1]


async def test_tail_json_prints_one_message_per_line(address: str, seeded: PublishSession) -> None:
    status, text = await run(
        "tail", TICKER, "--server", address, "--from", "2025-03-14T00:00:00Z", "--json",
        "--limit", str(SNAPSHOT_COUNT),
    )  # fmt: skip
    messages = [json.loads(line) for line in text.splitlines()]
    assert status == 0
    assert [m["snapshot"]["snapshot"]["yesBid"]["tenThousandths"] for m in messages] == [
        str(4_000 + i) for i in range(SNAPSHOT_COUNT)
    ]
    assert all(m["resumeToken"] for m in messages)


async def test_tail_shows_history_the_caught_up_marker_then_live(
    address: str, seeded: PublishSession
) -> None:
    printed = io.StringIO()

    async def publish_when_caught_up() -> None:
        await eventually(lambda: "caught up" in printed.getvalue(), what="the caught-up line")
        await seeded.publish(snapshots=[make_snapshot(TICKER, SNAPSHOT_COUNT)])

    publishing = asyncio.create_task(publish_when_caught_up())
    status, text = await run(
        "tail",
        TICKER,
        "--server",
        address,
        "--from",
        "2025-03-14T15:09:30Z",
        "--limit",
        "4",
        output=printed,
    )
    await publishing
    lines = text.splitlines()
    assert status == 0
    assert "caught up: 3 replayed, now live" in lines[3]
    assert [line.split()[2] for line in (*lines[:3], lines[4])] == [TICKER] * 4
    assert "yes 0.4007×0.4107" in lines[4]


async def test_tail_trades_shows_the_tape_the_caught_up_marker_then_live(
    address: str, seeded: PublishSession
) -> None:
    await seeded.publish(trades=[make_trade(TICKER, i) for i in range(3)])

    printed = io.StringIO()

    async def publish_when_caught_up() -> None:
        await eventually(lambda: "caught up" in printed.getvalue(), what="the caught-up line")
        await seeded.publish(trades=[make_trade(TICKER, 3, count=250)])

    publishing = asyncio.create_task(publish_when_caught_up())
    status, text = await run(
        "tail", TICKER, "--trades", "--server", address, "--from", at(1).isoformat(),
        "--limit", "3", output=printed,
    )  # fmt: skip
    await publishing
    lines = text.splitlines()
    assert status == 0
    assert "caught up: 2 replayed, now live" in lines[2]
    assert [line.split()[2] for line in (*lines[:2], lines[3])] == [TICKER] * 3
    assert "taker yes  yes 0.4001  no 0.5999  × 1.00" in lines[0]
    assert "yes 0.4003  no 0.5997  × 2.50" in lines[3]


async def test_tail_prints_a_resume_hint_that_continues_exactly(
    address: str, seeded: PublishSession, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hint keeps the start: a trade older than it, committed after the first run stopped,
    is not shown by the run resumed from the hint."""
    await seeded.publish(trades=[make_trade(TICKER, i) for i in range(3, 6)])
    capsys.readouterr()
    _, text = await run("tail", TICKER, "--trades", "--server", address,
                        "--from", at(3).isoformat(), "--limit", "1")  # fmt: skip
    shown = trade_prices(text)
    assert shown == ["0.4003"]  # --limit 1: one trade, though three are ready at once
    hint = capsys.readouterr().err.strip().removeprefix("resume with: ").split()
    late = make_trade(TICKER, 1, trade_id=f"{TICKER}-late")
    await seeded.publish(trades=[late, make_trade(TICKER, 9)])
    # The trades at or after the start not shown yet, then the last one.
    left = 3 - len(shown) + 1
    status, rest = await run("tail", TICKER, "--trades", "--server", address, *hint,
                             "--limit", str(left))  # fmt: skip
    assert status == 0
    assert hint[::2] == ["--resume", "--from"]
    assert shown + trade_prices(rest) == ["0.4003", "0.4004", "0.4005", "0.4009"]


def trade_prices(text: str) -> list[str]:
    """The YES price of each trade line ``tail --trades`` printed."""
    return re.findall(r" yes (\d\.\d{4})  no ", text)


async def test_an_unknown_market_is_a_one_line_error(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _ = await run("tail", "KXNOPE", "--server", address)
    assert status == 1
    assert "kfeed: NOT_FOUND" in capsys.readouterr().err


def test_flags_fall_back_to_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFEED_SERVER", "10.0.0.1:1234")
    monkeypatch.setenv("KFEED_TOKEN", "from-env")
    monkeypatch.setenv("KFEED_JSON", "true")
    monkeypatch.setenv("KFEED_FROM", "2025-01-02T03:04:05")
    options = build_parser().parse_args(["tail", "KXA"])
    overridden = build_parser().parse_args(["tail", "--server", "127.0.0.1:1"])
    assert (options.server, options.token, options.json) == ("10.0.0.1:1234", "from-env", True)
    assert options.start == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert overridden.server == "127.0.0.1:1"
    assert env_name("--ca-file") == "KFEED_CA_FILE"


def test_times_are_iso_or_a_span_ago() -> None:
    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    assert parse_time("15m", now=now) == datetime(2025, 6, 1, 11, 45, tzinfo=UTC)
    assert parse_time("1d", now=now) == datetime(2025, 5, 31, 12, 0, tzinfo=UTC)
    assert parse_time("2025-06-01T10:00:00+02:00") == datetime(2025, 6, 1, 8, 0, tzinfo=UTC)


async def test_console_script_entry_point(address: str, seeded: PublishSession) -> None:
    """`python -m kfeed_client.cli` (the `kfeed-client` script's `main`) with env settings."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kfeed_client.cli", "markets",
        env={**os.environ, "KFEED_SERVER": address, "KFEED_JSON": "1"},
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    assert len(stdout.decode().splitlines()) == len(MARKETS)


async def test_candles_prints_ohlc_of_book_and_trades(address: str, seeded: PublishSession) -> None:
    # Seven snapshots (yes bid 0.4000 … 0.4006) and three trades (0.4000 … 0.4002, one contract
    # each) in the minute 15:09 of 2025-03-14.
    status, text = await run(
        "candles", TICKER, "--server", address, "--interval", "1m",
        "--from", "2025-03-14T15:08:30Z", "--to", "2025-03-14T15:10:00Z",
    )  # fmt: skip
    lines = text.splitlines()
    assert status == 0
    assert lines == [
        "2025-03-14 15:08:00  bid —  ask —  no trades  vol 0.00 (0)  OI —",
        "2025-03-14 15:09:00  bid 0.4000 0.4006 0.4000 0.4006  ask 0.4100 0.4106 0.4100 0.4106  "
        "trades 0.4000 0.4002 0.4000 0.4002 mean 0.4001  vol 3.00 (3)  OI 50.00",
    ]
    _, json_lines = await run(
        "candles", TICKER, "--server", address, "--interval", "60",
        "--from", "2025-03-14T15:09:00Z", "--to", "2025-03-14T15:10:00Z", "--json",
    )  # fmt: skip
    (candle,) = [json.loads(line) for line in json_lines.splitlines()]
    assert candle["meanPrice"] == {"tenThousandths": "4001"}
    assert candle["tradeCount"] == "3"


@pytest.mark.parametrize("interval", ["1.5m", "abc", "-1h", "1w"])
def test_candles_interval_must_be_whole(interval: str) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["candles", "T", "--interval", interval])


async def test_book_prints_a_ladder_at_an_instant(address: str, seeded: PublishSession) -> None:
    request = ingest_service_pb2.PublishRequest(producer="tests")
    request.book_checkpoints.append(
        checkpoint(TICKER, START, at(0), at(0), 7, {4200: 1050, 4100: 25}, {5500: 300})
    )
    change = BookChange(TICKER, micros(at(5)), micros(at(5)), 8, types_pb2.SIDE_YES, 4300, 99)
    request.book_changes.CopyFrom(change_columns([change]))
    assert (await seeded.send(request)).book_changes_stored == 1
    status, text = await run("book", TICKER, "--server", address, "--at", at(1).isoformat())
    assert status == 0
    lines = text.splitlines()
    assert "seq 7" in lines[0]
    rows = [line.split() for line in lines[1:] if "bid" in line]
    # NO bids (the YES asks) above, YES bids best first below
    assert rows[-3:] == [
        ["no", "bid", "0.5500", "3.00", "yes", "ask", "0.4500"],
        ["yes", "bid", "0.4200", "10.50", "no", "ask", "0.5800"],
        ["yes", "bid", "0.4100", "0.25", "no", "ask", "0.5900"],
    ]
    status, line = await run("book", TICKER, "--server", address, "--depth", "1", "--json")
    book = json.loads(line)
    assert status == 0
    assert [level["price"]["tenThousandths"] for level in book["yesBids"]] == ["4300"]
    status, _ = await run("book", TICKER, "--server", address, "--depth", "-1")
    assert status == 1


async def test_tail_book_shows_a_ladder_the_changes_since_then_live_ones(
    address: str, seeded: PublishSession
) -> None:
    request = ingest_service_pb2.PublishRequest(producer="tests")
    request.book_checkpoints.append(
        checkpoint(TICKER, START, at(0), at(0), 7, {4200: 1050, 4100: 25}, {5500: 300})
    )
    change = BookChange(TICKER, micros(at(5)), micros(at(5)), 8, types_pb2.SIDE_YES, 4300, 99)
    request.book_changes.CopyFrom(change_columns([change]))
    assert (await seeded.send(request)).book_changes_stored == 1

    printed = io.StringIO()

    async def publish_when_caught_up() -> None:
        await eventually(lambda: "caught up" in printed.getvalue(), what="the caught-up line")
        live = ingest_service_pb2.PublishRequest(producer="tests")
        gone = change._replace(exchange_time_us=micros(at(6)), sequence=9, price=4200, size=0)
        live.book_changes.CopyFrom(change_columns([gone]))
        await seeded.send(live)

    publishing = asyncio.create_task(publish_when_caught_up())
    status, text = await run(
        "tail", TICKER, "--book", "--server", address, "--from", at(1).isoformat(),
        "--limit", "3", output=printed,
    )  # fmt: skip
    await publishing
    lines = text.splitlines()
    assert status == 0
    assert f"{TICKER} book as of" in lines[0]
    rows = [line.split() for line in lines if line.split()[:1] in (["no"], ["yes"])]
    assert rows == [
        ["no", "bid", "0.5500", "3.00", "yes", "ask", "0.4500"],
        ["yes", "bid", "0.4200", "10.50", "no", "ask", "0.5800"],
        ["yes", "bid", "0.4100", "0.25", "no", "ask", "0.5900"],
    ]
    changes = [line for line in lines if line.startswith("2")]  # timed lines
    assert "yes bid 0.4300  new 0.99   yes bid 0.4300 × 0.99 | yes ask 0.4500 × 3.00" in changes[0]
    assert "caught up: 2 replayed, now live" in text
    assert "yes bid 0.4200  10.50 → gone   yes bid 0.4300 × 0.99" in changes[1]


@pytest.mark.parametrize("suffix", ["parquet", "csv", "arrow"])
async def test_export_writes_a_file_that_reads_back_exactly(
    address: str, seeded: PublishSession, tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    path = out / f"snapshots.{suffix}"
    status, text = await run(
        "export", "snapshots", TICKER, "--server", address, "-o", str(path), "--quiet"
    )
    assert status == 0
    assert f"wrote {SNAPSHOT_COUNT} snapshots" in text
    if suffix == "parquet":
        table = pyarrow.parquet.read_table(path)
    elif suffix == "csv":
        table = pyarrow.csv.read_csv(path)
    else:
        table = pyarrow.ipc.open_file(str(path)).read_all()
    assert table.column("yes_bid").to_pylist() == [4_000 + i for i in range(SNAPSHOT_COUNT)]
    assert table.column("exchange_time").to_pylist()[0] == make_snapshot(TICKER, 0).exchange_time
    assert os.listdir(out) == [path.name]  # no partial file left behind


async def test_export_trades_of_an_unknown_market_fails_and_writes_nothing(
    address: str, seeded: PublishSession, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    status, _ = await run(
        "export", "trades", "KXNOPE", "--server", address, "-o", str(out / "trades.csv")
    )
    assert status == 1
    assert os.listdir(out) == []
