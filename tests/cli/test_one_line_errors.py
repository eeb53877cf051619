"""Every `kfeed` command, run as a real process, meets the usual mistakes with one clear line on
stderr and a non-zero exit, never a traceback (unless --debug): a taken port, a missing or
unreachable database, a URL kfeed cannot use, an unreachable server (within --connect-timeout),
a second demo, and Ctrl-C while starting."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.processes import free_port

pytestmark = pytest.mark.e2e

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1
MISSING_DATABASE = "postgresql://postgres@127.0.0.1:5432/kfeed_no_such_database"


@dataclass
class Outcome:
    returncode: int
    stderr: str
    seconds: float

    @property
    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


async def kfeed(*args: str, cwd: Path | None = None, within: float = 60) -> Outcome:
    """Run ``kfeed ARGS`` to its end; what it printed on stderr and how it exited."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kfeed_cli.main", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, cwd=cwd, env={**os.environ, "KFEED_DEBUG": ""},
    )  # fmt: skip
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), within)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Outcome(process.returncode, stderr.decode(errors="replace"), time.monotonic() - started)


def assert_one_line(outcome: Outcome, program: str, *phrases: str) -> None:
    """A non-zero exit whose stderr ends with one ``program: …`` line holding ``phrases``, and
    no traceback anywhere."""
    assert outcome.returncode != 0, outcome.stderr
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.last_line.startswith(f"{program}: "), outcome.stderr
    for phrase in phrases:
        assert phrase in outcome.last_line, outcome.stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


# --- kfeed serve --------------------------------------------------------------------------------


async def test_serve_on_a_taken_port(taken_port: int, tmp_path: Path) -> None:
    outcome = await kfeed(
        "serve", "--listen", f"127.0.0.1:{taken_port}",
        "--database-url", f"sqlite+aiosqlite:///{tmp_path / 'k.db'}",
    )  # fmt: skip
    assert_one_line(outcome, "kfeed serve", f"cannot listen on 127.0.0.1:{taken_port}")
    assert len(outcome.stderr.strip().splitlines()) == 1, outcome.stderr


async def test_debug_shows_the_traceback(taken_port: int, tmp_path: Path) -> None:
    outcome = await kfeed(
        "serve", "--debug", "--listen", f"127.0.0.1:{taken_port}",
        "--database-url", f"sqlite+aiosqlite:///{tmp_path / 'k.db'}",
    )  # fmt: skip
    assert outcome.returncode != 0
    assert "Traceback" in outcome.stderr
    assert "CommandError" in outcome.stderr


@pytest.mark.usefixtures("postgres_template")  # PostgreSQL is up: only the database is missing
async def test_serve_on_a_missing_postgresql_database_given_without_its_driver() -> None:
    outcome = await kfeed("serve", "--listen", "127.0.0.1:0", "--database-url", MISSING_DATABASE)
    assert_one_line(
        outcome,
        "kfeed serve",
        "cannot use the database postgresql+asyncpg://",
        'database "kfeed_no_such_database" does not exist',
    )


async def test_serve_on_an_unreachable_database() -> None:
    outcome = await kfeed(
        "serve", "--listen", "127.0.0.1:0",
        "--database-url", "postgresql+asyncpg://postgres@127.0.0.1:1/kfeed",
    )  # fmt: skip
    assert_one_line(outcome, "kfeed serve", "cannot use the database", "127.0.0.1")


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("garbage", "not a database URL"),
        ("mysql://u@h/db", "unsupported database 'mysql'"),
        ("postgresql+psycopg://u@h/db", "through asyncpg, not psycopg"),
    ],
)
async def test_serve_with_a_database_url_kfeed_cannot_use(url: str, complaint: str) -> None:
    outcome = await kfeed("serve", "--database-url", url)
    assert outcome.returncode == 2
    assert "Traceback" not in outcome.stderr
    assert outcome.stderr.splitlines()[0] == "kfeed serve: invalid flags (see kfeed serve --help)"
    assert "--database-url (KFEED_DATABASE_URL)" in outcome.stderr
    assert complaint in outcome.stderr


async def test_serve_with_half_the_tls_files() -> None:
    outcome = await kfeed("serve", "--listen", "127.0.0.1:0", "--tls-cert-file", "cert.pem")
    assert_one_line(outcome, "kfeed serve", "--tls-cert-file and --tls-key-file go together")


# --- kfeed sim ----------------------------------------------------------------------------------


async def test_sim_on_a_taken_port(taken_port: int) -> None:
    outcome = await kfeed("sim", "--listen", f"127.0.0.1:{taken_port}")
    assert_one_line(outcome, "kfeed sim", f"cannot listen on 127.0.0.1:{taken_port}", "in use")


async def test_sim_with_a_wrong_flag_value() -> None:
    outcome = await kfeed("sim", "--seed", "abc")
    assert outcome.returncode == 2
    assert "Traceback" not in outcome.stderr
    assert "--seed (KFEED_SEED)" in outcome.stderr


# --- kfeed ingest -------------------------------------------------------------------------------


async def test_ingest_with_a_kalshi_url_that_is_no_url(tmp_path: Path) -> None:
    outcome = await kfeed("ingest", "--kalshi-url", "garbage", "--spool-dir", str(tmp_path))
    assert outcome.returncode == 2
    assert "Traceback" not in outcome.stderr
    assert "--kalshi-url (KFEED_KALSHI_URL): expected an absolute URL" in outcome.stderr


async def test_ingest_with_a_missing_key_file(tmp_path: Path) -> None:
    outcome = await kfeed(
        "ingest", "--once", "--spool-dir", str(tmp_path),
        "--api-key-id", "k", "--api-private-key-file", str(tmp_path / "missing.pem"),
    )  # fmt: skip
    assert_one_line(outcome, "kfeed ingest", "missing.pem")


async def test_ingest_against_an_unreachable_server_and_exchange(tmp_path: Path) -> None:
    outcome = await kfeed(
        "ingest", "--once", "--mode", "poll", "--server", UNREACHABLE,
        "--kalshi-url", f"http://{UNREACHABLE}/trade-api/v2",
        "--spool-dir", str(tmp_path), "--flush-timeout", "2",
    )  # fmt: skip
    assert outcome.returncode != 0
    assert "Traceback" not in outcome.stderr


# --- client commands ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["tail"],
        ["markets"],
        ["snapshots", "KXANY"],
        ["candles", "KXANY"],
        ["book", "KXANY"],
        ["export", "snapshots", "-o", "snapshots.parquet"],
        ["backtest", "list"],
    ],
    ids=lambda args: args[0],
)
async def test_a_client_command_gives_up_on_an_unreachable_server(args: list[str]) -> None:
    outcome = await kfeed(*args, "--server", UNREACHABLE, "--connect-timeout", "1")
    assert_one_line(outcome, f"kfeed {args[0]}", f"no kfeed server answered at {UNREACHABLE}")
    # The timeout plus a Python start-up: never the unbounded wait it used to be.
    assert outcome.seconds < 15, outcome.seconds


async def test_the_default_connect_timeout_is_a_few_seconds() -> None:
    outcome = await kfeed("markets", "--server", UNREACHABLE)
    assert_one_line(outcome, "kfeed markets", "within 5 s")
    assert outcome.seconds < 20, outcome.seconds


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["tail", "--from", "99999999d"], "'99999999d' reaches before year 1"),
        (["tail", "--limit", "many"], "invalid int value: 'many'"),
        (["markets", "--status", "sideways"], "unknown status 'sideways'"),
        (["markets", "--connect-timeout", "0"], "not a number of seconds above 0"),
        (["backtest", "run"], "the following arguments are required: --strategy"),
    ],
)
async def test_a_client_command_with_a_wrong_flag_value(args: list[str], complaint: str) -> None:
    outcome = await kfeed(*args, "--server", UNREACHABLE)
    assert outcome.returncode == 2
    assert "Traceback" not in outcome.stderr
    assert outcome.stderr.strip().count("\n") == 0, outcome.stderr
    assert complaint in outcome.stderr


# --- kfeed demo ---------------------------------------------------------------------------------


def _demo_ports() -> list[str]:
    return [
        "--listen", f"127.0.0.1:{free_port()}",
        "--sim-listen", f"127.0.0.1:{free_port()}",
        "--web-listen", f"127.0.0.1:{free_port()}",
    ]  # fmt: skip


async def test_a_second_demo_on_the_same_data_folder_says_so(tmp_path: Path) -> None:
    import fcntl

    data = tmp_path / "data"
    data.mkdir()
    # The first demo's lock, held as a running demo holds it.
    with (data / "demo.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242\n")
        lock.flush()
        outcome = await kfeed("demo", "--data-dir", str(data), *_demo_ports())
    assert_one_line(outcome, "kfeed demo", "another kfeed demo (pid 4242) is running on")
    assert not (data / "logs").exists()  # nothing started, no log overwritten


async def test_a_demo_on_taken_ports_says_so(tmp_path: Path, taken_port: int) -> None:
    ports = _demo_ports()
    ports[1] = f"127.0.0.1:{taken_port}"
    outcome = await kfeed("demo", "--data-dir", str(tmp_path / "data"), *ports)
    assert_one_line(outcome, "kfeed demo", f"127.0.0.1:{taken_port} is in use", "--listen")


# --- Ctrl-C -------------------------------------------------------------------------------------


@pytest.mark.parametrize("after", [0.8, 2.0])
@pytest.mark.parametrize("command", ["serve", "sim", "ingest", "demo", "tail"])
async def test_ctrl_c_while_starting_is_one_line(
    command: str, after: float, tmp_path: Path
) -> None:
    args = {
        "serve": ["--listen", "127.0.0.1:0", "--database-url", f"sqlite:///{tmp_path / 'k.db'}"],
        "sim": ["--listen", "127.0.0.1:0"],
        "ingest": [
            "--server",
            UNREACHABLE,
            "--kalshi-url",
            f"http://{UNREACHABLE}/trade-api/v2",
            "--spool-dir",
            str(tmp_path / "spool"),
        ],
        "demo": ["--data-dir", str(tmp_path / "data"), *_demo_ports()],
        "tail": ["--server", UNREACHABLE],
    }[command]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kfeed_cli.main", command, *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    try:
        await asyncio.sleep(after)  # "any moment": the interrupt is the event under test
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = stderr.decode(errors="replace")
    assert "Traceback" not in text, text
    # Interrupted at any moment, a command stops (gracefully once up) and says so in one line
    # with exit status 130 — or, before Python has loaded kfeed, dies by SIGINT itself, which a
    # shell reports as 130 too.
    assert process.returncode in (130, -signal.SIGINT), text
    if process.returncode == 130:
        assert text.strip().splitlines()[-1] == f"kfeed {command}: interrupted", text


@pytest.mark.parametrize("loaded", ["kfeed_cli.entry", "kfeed_cli.main"])
async def test_ctrl_c_as_soon_as_python_runs_kfeed_is_one_line(loaded: str) -> None:
    """The `kfeed` console script, interrupted the moment Python has loaded ``loaded`` (its import
    time line, printed as each import ends, is the clock): from the first module of kfeed that
    Python runs, a Ctrl-C is one line and exit status 130, while the commands' modules load."""
    script = Path(sys.executable).with_name("kfeed")
    process = await asyncio.create_subprocess_exec(
        script, "sim", "--listen", "127.0.0.1:0",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "KFEED_DEBUG": "", "PYTHONPROFILEIMPORTTIME": "1"},
    )  # fmt: skip
    assert process.stderr is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not seen or not seen[-1].endswith(f"| {loaded}"):
                line = await process.stderr.readline()
                assert line, f"{script} ended before loading {loaded}:\n" + "\n".join(seen)
                seen.append(line.decode(errors="replace").rstrip())
        process.send_signal(signal.SIGINT)
        rest = (await asyncio.wait_for(process.stderr.read(), 30)).decode(errors="replace")
        returncode = await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    said = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert (returncode, said) == (130, ["kfeed sim: interrupted"]), rest
