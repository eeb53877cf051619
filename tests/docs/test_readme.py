"""The README's commands work as written.

Blocks marked ``<!-- offline-test -->`` run line by line in bash, in a fresh folder, exactly as
written except for two rewrites that keep the suite off fixed ports: the documented addresses
(127.0.0.1:50051 for the server, 127.0.0.1:8765 for the simulator) become free ports, and
``kfeed`` gets them from ``KFEED_LISTEN`` / ``KFEED_SERVER``. ``uv run X`` and ``npx X`` run X
from the installed environments (``make install`` has run; ``make test`` does it). Blocks marked
``<!-- offline-test-needs-server -->`` run while a ``kfeed serve`` does. A line that runs until
interrupted (a live feed) passes when it is still running after its time, fails when it exits
non-zero. Every other ``kfeed`` command line of the READMEs is at least parsed by its command.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from kfeed_cli.main import CLIENT_COMMANDS, COMMANDS
from tests.support.docs import all_code_blocks
from tests.support.processes import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
READMES = [ROOT / "README.md", *sorted((ROOT / "clients").glob("*/README.md"))]
DOCUMENTED_SERVER = "127.0.0.1:50051"
DOCUMENTED_SIM = "127.0.0.1:8765"
LINE_SECONDS = 25  # a line still running after this is a live feed, which is fine

WRAPPERS = {
    "uv": '[ "$1" = run ] && shift\nexec "$@"\n',
    "npx": '[ "$1" = --no-install ] && shift\nexec "$@"\n',
    "kfeed": (
        'case "$1" in\n'
        '  sim) export KFEED_LISTEN="$README_SIM" ;;\n'
        '  serve) export KFEED_LISTEN="$README_SERVER" ;;\n'
        '  *) export KFEED_SERVER="$README_SERVER" ;;\n'
        "esac\n"
        f'exec "{sys.executable}" -m kfeed_cli.main "$@"\n'
    ),
}


def _logical_lines(code: str) -> list[str]:
    """Lines with their backslash continuations joined; blank lines and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def _script(code: str, folder: Path, server: str, sim: str, *, with_server: bool) -> str:
    """The bash script that runs ``code``'s lines: each under a timeout, background ones (``&``)
    followed by a wait for their port, every process stopped at the end; ``with_server``: a
    ``kfeed serve`` first."""
    code = code.replace(DOCUMENTED_SERVER, server).replace(DOCUMENTED_SIM, sim)
    lines = [
        "set -u",
        "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT",
        "_t() {",
        f'  timeout {LINE_SECONDS} bash "$1"; rc=$?',
        "  if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then",
        '    echo "README line failed with exit status $rc: $(cat "$1")" >&2; exit 1',
        "  fi",
        "}",
        "_port() { for _ in $(seq 600); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return;"
        ' sleep 0.1; done; echo "nothing listens on $1" >&2; exit 1; }',
    ]
    if with_server:
        lines += ["kfeed serve > serve.log 2>&1 &", f"_port {server.rsplit(':', 1)[1]}"]
    for index, line in enumerate(_logical_lines(code)):
        command = line.split("#", 1)[0].rstrip() if " #" in line else line
        if command.endswith("&"):
            lines.append(command)
            port = sim if " sim" in command else server
            lines.append(f"_port {port.rsplit(':', 1)[1]}")
        elif command.startswith("export "):
            lines.append(command)
        else:
            path = folder / f"line-{index:02d}.sh"
            path.write_text(command + "\n")
            lines.append(f"_t {path}")
    return "\n".join(lines) + "\n"


def _wrapped_path(folder: Path) -> str:
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    for name, body in WRAPPERS.items():
        wrapper = bin_dir / name
        wrapper.write_text("#!/bin/bash\n" + body)
        wrapper.chmod(0o755)
    venv_bin = Path(sys.executable).parent
    return os.pathsep.join([str(bin_dir), str(venv_bin), str(ROOT / "node_modules" / ".bin")])


def _marked(marker: str) -> list[tuple[str, str]]:
    return [
        (f"{path.relative_to(ROOT)}#{number}", block.code)
        for path in READMES
        for number, block in enumerate(all_code_blocks(path))
        if block.marker == marker
    ]


async def _run_block(code: str, tmp_path: Path, *, with_server: bool) -> None:
    server, sim = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    folder = tmp_path / "work"
    folder.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KFEED_")},
        "PATH": _wrapped_path(tmp_path) + os.pathsep + os.environ["PATH"],
        "README_SERVER": server,
        "README_SIM": sim,
    }
    script = _script(code, tmp_path, server, sim, with_server=with_server)
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", script, cwd=folder, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 600)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, output.decode(errors="replace")[-4000:]


@pytest.mark.parametrize(("where", "code"), _marked("offline-test"))
async def test_offline_block_runs_as_written(where: str, code: str, tmp_path: Path) -> None:
    await _run_block(code, tmp_path, with_server=False)
    if "sim-key.pem" in code:  # what the block writes stays in the git-ignored data folder
        assert (tmp_path / "work" / "data" / "sim-key.pem").exists()
        assert not (tmp_path / "work" / "sim-key.pem").exists()


@pytest.mark.parametrize(("where", "code"), _marked("offline-test-needs-server"))
async def test_block_runs_against_a_server(where: str, code: str, tmp_path: Path) -> None:
    await _run_block(code, tmp_path, with_server=True)


def test_some_blocks_are_marked_to_run() -> None:
    assert _marked("offline-test")
    assert _marked("offline-test-needs-server")


def _kfeed_lines() -> list[tuple[str, list[str]]]:
    """Every ``kfeed`` command line of the READMEs' shell blocks that has no placeholder."""
    found = []
    for path in READMES:
        for block in all_code_blocks(path):
            if block.language != "sh":
                continue
            for line in _logical_lines(block.code):
                command = line.split(" #", 1)[0].rstrip(" &")
                if "…" in command or "$" in command or "kfeed " not in command:
                    continue
                words = shlex.split(command)
                if words[:2] == ["uv", "run"]:
                    words = words[2:]
                if words and words[0] == "kfeed":
                    found.append((f"{path.relative_to(ROOT)}: {command}", words[1:]))
    return found


@pytest.mark.parametrize(("where", "args"), _kfeed_lines(), ids=lambda v: str(v)[:60])
def test_every_kfeed_line_parses(where: str, args: list[str]) -> None:
    """The flags of each documented command line are accepted by its command (not run)."""
    name, rest = args[0], args[1:]
    if name in COMMANDS:
        module_name, class_name, _ = COMMANDS[name]
        command_class = getattr(__import__(module_name, fromlist=[class_name]), class_name)
        command_class(_cli_parse_args=rest)  # parses and validates; cli_cmd does not run
        return
    assert name in CLIENT_COMMANDS, where
    module_name = CLIENT_COMMANDS[name][0].rsplit(".", 1)[0]
    module = __import__(f"kfeed_client.{module_name}", fromlist=["build_parser"])
    if module_name == "backtest_cli":
        module.build_parser(f"kfeed {name}").parse_args(rest)
    else:
        configure = module.COMMANDS[name][0]
        parser = module.CliParser(prog=f"kfeed {name}")
        configure(parser)
        parser.parse_args(rest)


def test_the_offline_compose_command_points_ingest_at_the_simulator() -> None:
    readme = (ROOT / "README.md").read_text()
    [line] = [line for line in readme.splitlines() if "--profile sim up" in line]
    assert "KALSHI_URL=http://sim:8765/trade-api/v2 docker compose --profile sim up" in line
    compose = (ROOT / "docker-compose.yml").read_text()
    assert '"--listen", "0.0.0.0:8765"' in compose
