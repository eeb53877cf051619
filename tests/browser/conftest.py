"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright) against
real `kfeed` processes: the simulator, `kfeed serve --web-listen` and `kfeed ingest`.

Playwright never downloads a browser here: it launches /usr/bin/chromium (`make browser`
installs it). Without it these tests skip, or fail when ``KFEED_TEST_REQUIRE_BROWSER=1`` (CI).
The dashboard is built first (`make web`) when its sources are newer than web/dist.
Screenshots go to ``artifacts/screenshots/`` (kept by CI as artefacts).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.support.dashboard import (
    CHROMIUM_FLAGS,
    Dashboard,
    find_chromium,
    live_dashboard,
)

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
VIEWER_TIME_ZONE = "America/New_York"


def chromium_path() -> str:
    found = find_chromium()
    if found is None:
        message = "no chromium on PATH (run `make browser`, or apt-get install chromium)"
        if os.environ.get("KFEED_TEST_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def dashboard_built() -> Path:
    """web/dist, built by `make web` if missing or older than its sources."""
    subprocess.run(["make", "--no-print-directory", "-s", "web"], cwd=ROOT, check=True)
    dist = ROOT / "web" / "dist"
    assert (dist / "index.html").is_file()
    return dist


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    # A viewer far from UTC: the page must show their local time (UTC on hover).
    context = await browser.new_context(
        viewport={"width": 1400, "height": 1000},
        timezone_id=VIEWER_TIME_ZONE,
        locale="en-US",
    )
    opened = await context.new_page()
    try:
        yield opened
    finally:
        await context.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture(scope="module")
async def live_stack(
    tmp_path_factory: pytest.TempPathFactory, dashboard_built: Path
) -> AsyncIterator[Dashboard]:
    """sim (stepping every 0.5 s, with WebSocket sequence gaps now and then) → ingest
    (WebSocket) → serve with the dashboard (and the test user strategies), on SQLite."""
    directory = tmp_path_factory.mktemp("browser-stack")
    # user_dawdles: a run slow enough for the Cancel test.
    strategies = ("--strategy-module", "tests.support.user_strategies")
    async with live_dashboard(directory, dashboard_built, *strategies) as stack:
        yield stack
