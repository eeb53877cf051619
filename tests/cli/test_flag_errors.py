"""Bad flags or KFEED_* values: a usage error naming the flag, exit status 2, no traceback."""

from __future__ import annotations

import pytest

from kfeed_cli.main import main


def _usage_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err.splitlines()


def test_a_value_outside_the_choices_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _usage_error(["ingest", "--mode", "stream"], capsys)
    assert lines[0] == "kfeed ingest: invalid flags (see kfeed ingest --help)"
    assert lines[1].startswith("  --mode (KFEED_MODE): Input should be 'poll', 'ws' or 'backfill'")
    assert lines[1].endswith("(got 'stream')")


def test_an_environment_value_is_named_with_its_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KFEED_BATCH_ROWS", "many")
    lines = _usage_error(["ingest", "--once"], capsys)
    assert lines[1].startswith("  --batch-rows (KFEED_BATCH_ROWS): Input should be a valid integer")


def test_ws_mode_without_a_signing_key_is_refused_before_starting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = _usage_error(["ingest", "--mode", "ws"], capsys)
    assert "--mode ws needs --api-key-id and --api-private-key-file" in lines[1]


def test_a_key_id_without_its_key_file_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _usage_error(["ingest", "--api-key-id", "abc"], capsys)
    assert lines[1] == "  --api-key-id and --api-private-key-file go together"


def test_sim_flags_are_checked_against_the_simulators_limits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = _usage_error(["sim", "--tick-interval", "0"], capsys)
    assert lines == [
        "kfeed sim: invalid flags (see kfeed sim --help)",
        "  --tick-interval (KFEED_TICK_INTERVAL): Input should be greater than 0 (got '0')",
    ]
