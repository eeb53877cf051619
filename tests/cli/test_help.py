"""`kfeed <command> --help` lists every flag with its description, default and KFEED_* variable."""

from __future__ import annotations

import importlib
import re

import pytest

from kfeed_cli.main import CLIENT_COMMANDS, COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_process_command_help_names_every_flag_and_variable(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    squeezed = "".join(text.split())  # argparse also wraps inside hyphenated words
    module_name, class_name, _ = COMMANDS[name]
    command = getattr(importlib.import_module(module_name), class_name)
    for field, info in command.model_fields.items():
        flag = "--" + field.replace("_", "-")
        variable = "KFEED_" + field.upper()
        assert flag in text, flag
        assert f"[env {variable}]" in text, variable
        description = (info.description or "").split(" [env ")[0]
        assert description, f"{flag} has no description"
        assert "".join(description.split()) in squeezed, flag
    assert "default factory" not in text


# Flags no environment variable sets: repeatable filters, and where this run writes.
WITHOUT_VARIABLE = {"--status", "--output"}


@pytest.mark.parametrize("name", sorted(set(CLIENT_COMMANDS) - {"backtest"}))
def test_client_command_help_names_defaults_and_variables(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--server SERVER HOST:PORT of kfeed serve (default: 127.0.0.1:50051) [env KFEED_SERVER]"
        in text
    )
    assert "(default: 5.0) [env KFEED_CONNECT_TIMEOUT]" in text
    for flag in set(re.findall(r"(--[a-z-]+) [A-Z_]+ ", text)) - WITHOUT_VARIABLE:
        assert f"[env KFEED_{flag[2:].upper().replace('-', '_')}]" in text, flag
