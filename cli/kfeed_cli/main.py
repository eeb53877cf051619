"""`kfeed <command> [flags]`: dispatches to the command's implementation.

Process commands are pydantic-settings models (flags and KFEED_* variables); the client commands
(tail, markets, snapshots, candles, export, backtest) come from the kfeed-client package, exactly
as an internal service would use it. Commands are imported lazily so that `kfeed tail` does not
pay for the server's imports.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

# Only the standard library at import time: a Ctrl-C while the commands' (heavy) modules load
# happens inside main()'s handler, and is one line like any other moment.
if TYPE_CHECKING:
    from pydantic import ValidationError

_TRUE = {"1", "true", "yes", "on"}

# command name -> (module, settings class, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("kfeed_server.cli", "ServeCommand", "run the gRPC server (owns the database)"),
    "ingest": ("kfeed_ingest.cli", "IngestCommand", "feed the server from Kalshi (or the sim)"),
    "sim": ("kfeed_sim.cli", "SimCommand", "run the offline Kalshi-compatible exchange"),
    "demo": ("kfeed_cli.demo", "DemoCommand", "sim + serve (SQLite in ./data) + ingest, live"),
}
# command name -> (MODULE.FUNCTION in kfeed_client taking the remaining args, one-line help)
CLIENT_COMMANDS: dict[str, tuple[str, str]] = {
    "tail": ("cli.run_tail", "print the live snapshot feed (history first with --from/--resume)"),
    "markets": ("cli.run_markets", "list markets"),
    "snapshots": ("cli.run_snapshots", "list a market's stored snapshots"),
    "backtest": ("backtest_cli.run_backtest", "run, list and inspect backtests"),
    "candles": ("cli.run_candles", "print a market's candles: kfeed candles TICKER --interval 1h"),
    "book": ("cli.run_book", "print a market's order book: kfeed book TICKER [--at T] [--depth N]"),
    "export": ("cli.run_export", "export snapshots|trades to a Parquet, CSV or Arrow file"),
}


def _usage() -> str:
    helps = {name: help_text for name, (_, _, help_text) in COMMANDS.items()}
    helps |= {name: help_text for name, (_, help_text) in CLIENT_COMMANDS.items()}
    width = max(len(name) for name in helps)
    lines = [f"  {name:<{width}}  {help_text}" for name, help_text in helps.items()]
    return (
        "usage: kfeed <command> [flags]   (kfeed <command> --help)\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\nAny command also takes --debug (or KFEED_DEBUG=1): tracebacks instead of one line."
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("KFEED_DEBUG", "").lower() in _TRUE
    args = [arg for arg in args if arg != "--debug"]
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    name, rest = args[0], args[1:]
    if name not in COMMANDS and name not in CLIENT_COMMANDS:
        print(f"kfeed: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    program = f"kfeed {name}"
    if not debug:
        # gRPC's C core logs failures (a port in use) that the one line below already reports.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        # From here a Ctrl-C is a KeyboardInterrupt, reported below (the console script's entry
        # point, kfeed_cli.entry, ends start-up at once until now).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _run(name, rest)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{program}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if debug:
            raise
        print(f"{program}: {describe_error(error)} (--debug shows more)", file=sys.stderr)
        raise SystemExit(1) from None


def _run(name: str, rest: list[str]) -> None:
    if name in CLIENT_COMMANDS:
        module_name, function_name = CLIENT_COMMANDS[name][0].rsplit(".", 1)
        client_cli = importlib.import_module(f"kfeed_client.{module_name}")
        raise SystemExit(getattr(client_cli, function_name)(rest))
    from pydantic import ValidationError
    from pydantic_settings import CliApp

    from kfeed_settings import CommandSettings

    module_name, class_name, _ = COMMANDS[name]
    command_class: type[CommandSettings] = getattr(importlib.import_module(module_name), class_name)
    command_class.model_config["cli_prog_name"] = f"kfeed {name}"
    try:
        CliApp.run(command_class, cli_args=rest)
    except ValidationError as error:
        if error.title != command_class.__name__:
            raise  # not the flags: a failure inside the command
        env_prefix = command_class.model_config.get("env_prefix", "")
        print(invalid_flags_message(f"kfeed {name}", env_prefix, error), file=sys.stderr)
        raise SystemExit(2) from None


def describe_error(error: BaseException) -> str:
    """One line for an error that ended a command: a :class:`CommandError`'s message as it is
    (found anywhere in the chain of causes), else the error's type and first line."""
    from pydantic import ValidationError

    from kfeed_settings import CommandError

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, CommandError):
            return str(current)
        if isinstance(current, ValidationError):
            return "; ".join(
                problem["msg"].removeprefix("Value error, ")
                for problem in current.errors(include_url=False)
            )
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            current = current.exceptions[0]
            continue
        current = current.__cause__ or current.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def invalid_flags_message(program: str, env_prefix: str, error: ValidationError) -> str:
    """The flags' validation errors, a line each, naming the flag and its environment variable
    (either may have given the value)."""
    lines = [f"{program}: invalid flags (see {program} --help)"]
    for problem in error.errors(include_url=False):
        name = "_".join(str(part) for part in problem["loc"])
        flag = f"--{name.replace('_', '-')} ({env_prefix}{name.upper()})"
        message = problem["msg"].removeprefix("Value error, ")
        given = problem.get("input")
        shown = f" (got {given!r})" if problem["loc"] and not isinstance(given, dict) else ""
        lines.append(f"  {flag}: {message}{shown}" if problem["loc"] else f"  {message}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
