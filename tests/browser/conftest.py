"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright) against
real `kfeed` processes: the simulator, `kfeed serve --web-listen` and `kfeed ingest`.

Playwright never downloads a browser here: it launches /usr/bin/chromium (`make browser`
installs it). Without it these tests skip, or fail when ``KFEED_TEST_REQUIRE_BROWSER=1`` (CI).
The dashboard is built first (`make web`) when its sources are newer than web/dist.
Screenshots go to ``artifacts/screenshots/`` (kept by CI as artefacts).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from playwright.async_api import Browser, Page, async_playwright

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed_sim.signing import generate_key_pair
from tests.support.processes import (
    KEY_ID,
    KfeedProcess,
    free_port,
    start_kfeed,
    wait_for_http,
    wait_for_serving,
)
from tests.support.waiting import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
VIEWER_TIME_ZONE = "America/New_York"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
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


@dataclass
class Dashboard:
    """`kfeed serve` with its web listener (and whatever feeds it)."""

    url: str
    grpc_address: str
    processes: list[KfeedProcess]

    def logs(self) -> str:
        return "\n".join(f"--- {p.command}\n{p.log()}" for p in self.processes)


async def start_dashboard(
    log_dir: Path, database: Path, web_root: Path, *extra_serve_args: str
) -> tuple[str, str, KfeedProcess]:
    grpc_address = f"127.0.0.1:{free_port()}"
    web_port = free_port()
    serve = await start_kfeed("serve", [
        "--listen", grpc_address, "--database-url", f"sqlite+aiosqlite:///{database}",
        "--web-listen", f"127.0.0.1:{web_port}", "--web-root", str(web_root), *extra_serve_args,
    ], log_dir)  # fmt: skip
    await wait_for_serving(grpc_address, serve)
    url = f"http://127.0.0.1:{web_port}/"
    await wait_for_http(url, serve)
    return url, grpc_address, serve


async def _wait_for_markets(grpc_address: str, ingest: KfeedProcess) -> None:
    """Until the ingest has stored markets and their snapshots."""
    async with grpc.aio.insecure_channel(grpc_address) as channel:
        stub = pb_grpc.MarketServiceStub(channel)

        async def stored() -> bool:
            ingest.assert_running()
            markets = (await stub.ListMarkets(pb.ListMarketsRequest())).markets
            if not markets:
                return False
            try:
                await stub.GetLatestSnapshot(pb.GetLatestSnapshotRequest(ticker=markets[0].ticker))
            except grpc.aio.AioRpcError:
                return False
            return True

        await eventually(stored, within=60, what="markets stored by the ingest")


@pytest.fixture(scope="module")
async def live_stack(
    tmp_path_factory: pytest.TempPathFactory, dashboard_built: Path
) -> AsyncIterator[Dashboard]:
    """sim (stepping every 0.5 s, with WebSocket sequence gaps now and then) → ingest
    (WebSocket) → serve with the dashboard (and the test user strategies), on SQLite."""
    directory = tmp_path_factory.mktemp("browser-stack")
    log_dir = directory / "logs"
    log_dir.mkdir()
    private_pem, public_pem = generate_key_pair()
    private_key, public_key = directory / "key.pem", directory / "key.pub.pem"
    private_key.write_bytes(private_pem)
    public_key.write_bytes(public_pem)
    sim_port = free_port()
    processes: list[KfeedProcess] = []
    try:
        sim = await start_kfeed("sim", [
            "--listen", f"127.0.0.1:{sim_port}", "--seed", "7", "--markets", "8",
            "--tick-interval", "0.5", "--history-steps", "120", "--sequence-gap-rate", "0.02",
            "--api-key-id", KEY_ID, "--api-public-key-file", str(public_key),
        ], log_dir)  # fmt: skip
        processes.append(sim)
        await wait_for_http(f"http://127.0.0.1:{sim_port}/trade-api/v2/exchange/status", sim)
        url, grpc_address, serve = await start_dashboard(
            log_dir,
            directory / "kfeed.db",
            dashboard_built,
            # user_dawdles: a run slow enough for the Cancel test.
            "--strategy-module",
            "tests.support.user_strategies",
        )
        processes.append(serve)
        ingest = await start_kfeed("ingest", [
            "--server", grpc_address, "--mode", "ws",
            "--kalshi-url", f"http://127.0.0.1:{sim_port}/trade-api/v2",
            "--api-key-id", KEY_ID, "--api-private-key-file", str(private_key),
            "--spool-dir", str(directory / "spool"), "--discovery-interval", "2",
        ], log_dir)  # fmt: skip
        processes.append(ingest)
        await _wait_for_markets(grpc_address, ingest)
        yield Dashboard(url, grpc_address, processes)
    finally:
        for process in reversed(processes):
            await process.stop()
