"""The dashboard's own unit tests (web/test, `node --test`): money formatted and parsed exactly."""

from __future__ import annotations

import subprocess
from pathlib import Path


def test_money_is_formatted_and_parsed_exactly(dashboard_built: Path) -> None:
    web = dashboard_built.parent  # `make web` installed web/node_modules
    report = subprocess.run(
        ["npm", "test", "--silent"], cwd=web, capture_output=True, text=True, timeout=120
    )
    assert report.returncode == 0, report.stdout + report.stderr
    assert "# pass 4" in report.stdout
    assert "# fail 0" in report.stdout
