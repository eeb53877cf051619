"""The dashboard's budgets (bundle size, 100 live markets each updating every second) and how it
behaves with auth on, a wrong token, and a server that goes away."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from playwright.async_api import Page, expect

from tests.support.dashboard import start_dashboard
from tests.support.factories import make_market, make_snapshot
from tests.support.processes import KfeedProcess
from tests.support.security import INGEST_TOKEN, READ_TOKEN, bearer, write_tokens_file
from tests.support.servers import PublishSession

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

BUNDLE_BUDGET_BYTES = 500 * 1000
LIVE_MARKETS = 100
MEASURE_SECONDS = 8


def test_javascript_bundle_is_under_500_kb_gzipped(dashboard_built: Path) -> None:
    scripts = list((dashboard_built / "assets").glob("*.js"))
    assert scripts, "the build produced JavaScript"
    gzipped = sum(len(gzip.compress(path.read_bytes(), compresslevel=9)) for path in scripts)
    assert gzipped < BUNDLE_BUDGET_BYTES, f"{gzipped / 1000:.0f} kB gzipped"


@contextlib.asynccontextmanager
async def _serving(
    tmp_path: Path, web_root: Path, *serve_args: str
) -> AsyncIterator[tuple[str, str, KfeedProcess]]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir(exist_ok=True)
    url, grpc_address, serve = await start_dashboard(
        log_dir, tmp_path / "kfeed.db", web_root, *serve_args
    )
    try:
        yield url, grpc_address, serve
    finally:
        await serve.stop()


async def _publish_every_second(grpc_address: str, rounds: asyncio.Event) -> None:
    """100 markets, then one new snapshot of each every second until cancelled."""
    tickers = [f"KXPERF-26DEC05-T{i:03d}" for i in range(LIVE_MARKETS)]
    async with (
        grpc.aio.insecure_channel(grpc_address) as channel,
        PublishSession(channel) as publisher,
    ):
        await publisher.publish(markets=[make_market(t) for t in tickers])
        step = 0
        while True:
            step += 1
            await publisher.publish(snapshots=[make_snapshot(t, step) for t in tickers])
            rounds.set()
            await asyncio.sleep(1)


# Frame gaps (requestAnimationFrame) and long tasks (PerformanceObserver) while the page runs,
# and how long the page takes to answer typing in the search box.
_MEASURE = """async (seconds) => {
    const longTasks = [];
    const observer = new PerformanceObserver((list) => longTasks.push(...list.getEntries()));
    observer.observe({ type: 'longtask' });
    const count = () => Number(document.querySelector('[data-testid=updates-count]')
        .textContent.split(' ')[0]);
    const updatesBefore = count();
    const gaps = [];
    let last = performance.now();
    const end = last + seconds * 1000;
    await new Promise((resolve) => {
        const frame = (now) => {
            gaps.push(now - last);
            last = now;
            if (now < end) requestAnimationFrame(frame); else resolve();
        };
        requestAnimationFrame(frame);
    });
    observer.disconnect();
    await new Promise((resolve) => setTimeout(resolve, 1100));  // the counter shows each second
    const blocking = longTasks.reduce((sum, t) => sum + Math.max(0, t.duration - 50), 0);
    return {
        maxFrameGap: Math.max(...gaps),
        frames: gaps.length,
        totalBlockingTime: blocking,
        longTasks: longTasks.length,
        updates: count() - updatesBefore,
    };
}"""

_SEARCH = """async (needle) => {
    const input = document.querySelector('input[type=search]');
    const started = performance.now();
    const setter = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
    setter.call(input, needle);
    input.dispatchEvent(new Event('input', { bubbles: true }));
    await new Promise((resolve) => {
        const check = () => document.querySelectorAll('[data-testid=market-row]').length === 1
            ? resolve() : requestAnimationFrame(check);
        check();
    });
    return performance.now() - started;
}"""


async def test_100_live_markets_updating_every_second_keep_the_page_responsive(
    tmp_path: Path, dashboard_built: Path, page: Page, screenshots: Path
) -> None:
    async with _serving(tmp_path, dashboard_built) as (url, grpc_address, _):
        published = asyncio.Event()
        publishing = asyncio.create_task(_publish_every_second(grpc_address, published))
        try:
            await asyncio.wait_for(published.wait(), 30)
            await page.goto(url)
            await expect(page.locator("[data-testid=market-row]")).to_have_count(
                LIVE_MARKETS, timeout=20_000
            )
            await expect(page.get_by_test_id("stream-state").first).to_have_text("live")
            measured = await page.evaluate(_MEASURE, MEASURE_SECONDS)
            search_ms = await page.evaluate(_SEARCH, "T042")
            await page.screenshot(path=screenshots / "markets-100-live.png")
        finally:
            publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publishing
    print(f"100 live markets: {measured}, search answered in {search_ms:.0f} ms")
    # Every snapshot reaches the page: 100 a second (a round may straddle the window's ends).
    assert measured["updates"] >= LIVE_MARKETS * (MEASURE_SECONDS - 2), measured
    # Responsive: frames keep coming, the main thread is mostly free, typing answers at once.
    # Bounds leave room for a loaded 2-core machine (a quiet one: gaps < 100 ms, blocking < 2 %;
    # at load average 13-14, other engineers' tests: gaps 117-317 ms, blocking 3-23 %).
    assert measured["maxFrameGap"] < 1000, measured
    assert measured["totalBlockingTime"] < 0.5 * MEASURE_SECONDS * 1000, measured
    assert search_ms < 500


async def test_auth_token_entered_once_wrong_token_and_server_down(
    tmp_path: Path, dashboard_built: Path, page: Page, screenshots: Path
) -> None:
    tokens = write_tokens_file(tmp_path)
    async with _serving(tmp_path, dashboard_built, "--auth-tokens-file", str(tokens)) as (
        url,
        grpc_address,
        serve,
    ):
        market = make_market("KXAUTH-26DEC05-T1")
        async with (
            grpc.aio.insecure_channel(grpc_address) as channel,
            PublishSession(channel, metadata=bearer(INGEST_TOKEN)) as publisher,
        ):
            await publisher.publish(markets=[market], snapshots=[make_snapshot(market.ticker, 1)])

        await page.goto(url)
        message = page.get_by_test_id("auth-message")
        await expect(message).to_contain_text("requires a token")
        await page.get_by_label("token").fill("not-the-right-token-at-all")
        await page.get_by_role("button", name="Use token").click()
        await expect(message).to_contain_text("refused this token")
        await page.screenshot(path=screenshots / "auth-wrong-token.png")

        await page.get_by_label("token").fill(READ_TOKEN)
        await page.get_by_role("button", name="Use token").click()
        row = page.locator("[data-testid=market-row]")
        await expect(row).to_have_count(1)
        # Once: a reload finds the token in the browser and asks nothing.
        await page.reload()
        await expect(row).to_have_count(1)
        await expect(page.get_by_test_id("token-form")).to_have_count(0)
        await expect(page.get_by_test_id("stream-state").first).to_have_text("live")

        assert await serve.stop() == 0
        await expect(page.get_by_test_id("server-down")).to_be_visible(timeout=20_000)
        await expect(page.get_by_test_id("server-down")).to_contain_text("cannot be reached")
        await page.screenshot(path=screenshots / "server-down.png")
