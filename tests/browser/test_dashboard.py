"""The dashboard in Chromium against sim → ingest → `kfeed serve --web-listen`: live markets, a
market's chart and trades, scrolling back through older candles with past feed gaps marked, a
backtest from the form to SUCCEEDED with its equity curve, and one cancelled while it runs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest
from playwright.async_api import Locator, Page, expect

from kfeed.v1 import backtest_service_pb2 as bt
from kfeed.v1 import backtest_service_pb2_grpc as bt_grpc
from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc
from kfeed.v1 import types_pb2
from kfeed_server.records import FeedGapRecord, MarketRecord, MarketStatus
from kfeed_server.transport.convert import timestamp
from tests.browser.conftest import VIEWER_TIME_ZONE
from tests.support.dashboard import Dashboard
from tests.support.factories import make_snapshot
from tests.support.servers import PublishSession

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


async def _row_prices(page: Page) -> list[str]:
    texts: list[str] = await page.locator("[data-testid=market-row]").evaluate_all(
        "rows => rows.map(r => r.querySelector('[data-testid=bid]').textContent"
        " + '|' + r.querySelector('[data-testid=ask]').textContent"
        " + '|' + r.querySelector('[data-testid=last]').textContent)"
    )
    return texts


async def test_markets_page_shows_live_prices_and_updates_live(
    live_stack: Dashboard, page: Page, screenshots: Path
) -> None:
    await page.goto(live_stack.url)
    first_row = page.locator("[data-testid=market-row]").first
    await expect(first_row).to_be_visible(timeout=15_000)
    # Usable: market rows with live prices (how fast: bench/bench_dashboard.py, not a test).
    await expect(first_row.locator("[data-testid=bid]")).to_have_text(re.compile(r"\$"))

    await expect(page.get_by_test_id("stream-state").first).to_have_text("live")
    before = await _row_prices(page)
    # The sim steps every 0.5 s: rows change in place without a reload.
    await page.wait_for_function(
        """before => {
            const rows = [...document.querySelectorAll('[data-testid=market-row]')];
            const now = rows.map(r => r.querySelector('[data-testid=bid]').textContent
                + '|' + r.querySelector('[data-testid=ask]').textContent
                + '|' + r.querySelector('[data-testid=last]').textContent);
            return now.some((text, i) => before[i] !== undefined && text !== before[i]);
        }""",
        arg=before,
        timeout=20_000,
    )
    await page.screenshot(path=screenshots / "markets.png", full_page=True)

    # Times in the viewer's zone (New York), the UTC time on hover.
    shown = first_row.locator("time")
    utc_title = await shown.get_attribute("title")
    local_text = await shown.text_content()
    assert utc_title is not None
    assert local_text is not None
    assert utc_title.endswith(" UTC")
    utc = datetime.fromisoformat(utc_title.removesuffix(" UTC")).replace(tzinfo=UTC)
    local = utc.astimezone(ZoneInfo(VIEWER_TIME_ZONE))
    assert local.strftime("%I:%M:%S") in local_text, (local_text, utc_title)
    assert utc.strftime("%H:%M:%S") not in local_text

    # Filter by series: every row left belongs to it (the sim's series prefix its tickers).
    series_options = await page.get_by_label("series").locator("option").all_text_contents()
    series = next(option for option in series_options if option != "all series")
    await page.get_by_label("series").select_option(series)
    await expect(page.locator("[data-testid=market-row]").first).to_be_visible()
    tickers = await page.locator("[data-testid=market-row]").evaluate_all(
        "rows => rows.map(r => r.dataset.ticker)"
    )
    assert tickers
    assert all(t.startswith(series + "-") for t in tickers), (series, tickers)
    await page.get_by_label("series").select_option("")

    # Search filters the rows in place.
    ticker = await first_row.get_attribute("data-ticker")
    assert ticker
    await page.get_by_label("search").fill(ticker)
    await expect(page.locator("[data-testid=market-row]")).to_have_count(1)


async def _open_market_closing_last(grpc_address: str) -> str:
    """The open market that closes last. The sim closes its live markets 15–60 s after they
    open, and a closed market's book is empty: a test watching one market's page for tens of
    seconds takes the one with the most time left."""
    async with grpc.aio.insecure_channel(grpc_address) as channel:
        stub: pb_grpc.MarketServiceAsyncStub = pb_grpc.MarketServiceStub(channel)
        response = await stub.ListMarkets(
            pb.ListMarketsRequest(statuses=[types_pb2.MARKET_STATUS_OPEN])
        )
    assert response.markets, "no open market"
    return max(response.markets, key=lambda m: m.close_time.ToNanoseconds()).ticker


async def test_market_page_shows_chart_and_trades(
    live_stack: Dashboard, page: Page, screenshots: Path
) -> None:
    await page.goto(live_stack.url)
    await expect(page.locator("[data-testid=market-row] a").first).to_be_visible(timeout=15_000)
    ticker = await _open_market_closing_last(live_stack.grpc_address)
    await page.locator(f'[data-testid=market-row][data-ticker="{ticker}"] a').click()
    await expect(page.get_by_test_id("market-ticker")).to_have_text(ticker)
    chart = page.get_by_test_id("price-chart")
    await expect(chart.locator("canvas").first).to_be_visible()
    # Candles where the server has them; otherwise the stored snapshots (and a notice saying so).
    await page.wait_for_function(
        """() => {
            const chart = document.querySelector('[data-testid=price-chart]');
            return Number(chart.dataset.candles) > 0 || Number(chart.dataset.points) > 0;
        }""",
        timeout=20_000,
    )
    await expect(page.get_by_test_id("trade-row").first).to_be_visible(timeout=30_000)
    trade = await page.get_by_test_id("trade-row").first.text_content()
    assert trade is not None
    assert "$" in trade
    # The sim's markets have books (ingest records them from the WebSocket): the ladder shows
    # them and keeps applying StreamOrderBooks updates as the sim steps.
    depth = page.get_by_test_id("depth")
    await expect(depth).to_contain_text("YES bid", timeout=20_000)
    await expect(depth.get_by_test_id("stream-state")).to_have_text("live")
    applied = int(await depth.get_attribute("data-updates") or 0)
    await page.wait_for_function(
        "seen => Number(document.querySelector('[data-testid=depth]').dataset.updates) > seen",
        arg=applied,
        timeout=30_000,
    )
    await page.screenshot(path=screenshots / "market.png", full_page=True)


async def test_backtest_from_the_form_runs_to_succeeded_with_progress_and_equity_curve(
    live_stack: Dashboard, page: Page, screenshots: Path
) -> None:
    await page.goto(live_stack.url + "#/backtests")
    form = page.get_by_test_id("backtest-form")
    await expect(form).to_be_visible(timeout=15_000)
    # Record every progress and state the page shows, from the moment the run page appears.
    await page.evaluate(
        """() => {
            window.__seen = { fractions: [], states: [] };
            new MutationObserver(() => {
                const progress = document.querySelector('[data-testid=progress]');
                const detail = document.querySelector('[data-testid=backtest-detail]');
                if (progress) window.__seen.fractions.push(progress.dataset.fraction);
                if (detail) window.__seen.states.push(detail.dataset.state);
            }).observe(document.body, { subtree: true, childList: true, attributes: true });
        }"""
    )
    await page.screenshot(path=screenshots / "backtest-form.png", full_page=True)
    await form.get_by_role("button", name="Run").click()
    await expect(page).to_have_url(re.compile(r"#/backtests/[^/]+$"), timeout=15_000)
    detail = page.get_by_test_id("backtest-detail")
    await expect(detail).to_have_attribute("data-state", "succeeded", timeout=120_000)
    await expect(page.get_by_test_id("equity-chart").locator("canvas").first).to_be_visible(
        timeout=15_000
    )
    points = await page.get_by_test_id("equity-chart").get_attribute("data-points")
    assert points is not None
    assert int(points) > 0
    seen = await page.evaluate("window.__seen")
    assert seen["fractions"], "progress was shown"
    assert seen["fractions"][-1] == "1.000"
    assert seen["states"][-1] == "succeeded"
    await expect(page.get_by_test_id("provenance")).to_contain_text("data fingerprint")
    await expect(page.get_by_test_id("executions")).to_be_visible()
    await page.screenshot(path=screenshots / "backtest.png", full_page=True)


async def test_status_page_shows_health_ingest_and_subscribers(
    live_stack: Dashboard, page: Page, screenshots: Path
) -> None:
    await page.goto(live_stack.url + "#/status")
    await expect(page.get_by_test_id("health")).to_contain_text("serving", timeout=15_000)
    # The ingest rate needs two scrapes of /metrics; the sim stores snapshots all the time.
    await expect(page.get_by_test_id("ingest-rate")).to_contain_text(
        re.compile(r"[1-9][0-9.]* snapshots/s"), timeout=20_000
    )
    # This page's own feed-gap stream is one of the live subscriptions it reports.
    await expect(page.get_by_test_id("subscribers")).to_contain_text(
        re.compile(r"[1-9][0-9]* live stream subscriptions"), timeout=20_000
    )
    # The sim drops WebSocket sequence numbers now and then: the ingest reports each gap, and the
    # page lists the ones reported while it is open.
    await expect(page.get_by_test_id("feed-gap-row").first).to_be_visible(timeout=30_000)
    await page.screenshot(path=screenshots / "status.png", full_page=True)


async def _backtest_form(page: Page, live_stack: Dashboard, strategy: str) -> Locator:
    """The Backtests page's form, with ``strategy`` chosen."""
    await page.goto(live_stack.url + "#/backtests")
    form = page.get_by_test_id("backtest-form")
    await expect(form).to_be_visible(timeout=15_000)
    await form.get_by_label("strategy").select_option(strategy)
    return form


async def test_a_sweep_from_the_form_ranks_its_runs_and_they_compare_side_by_side(
    live_stack: Dashboard, page: Page, screenshots: Path
) -> None:
    form = await _backtest_form(page, live_stack, "favourite_hold")
    await form.get_by_label("sweep count").check()
    await form.locator("input[name=count]").fill("1, 5")
    await form.get_by_role("button", name="Run").click()
    await expect(page).to_have_url(re.compile(r"#/backtests/[^/]+$"), timeout=15_000)
    detail = page.get_by_test_id("backtest-detail")
    await expect(detail).to_have_attribute("data-state", "succeeded", timeout=120_000)
    children = detail.locator("a[href^='#/backtests/']")
    await expect(children).to_have_count(2)

    await page.goto(live_stack.url + "#/backtests")
    sweep_children = page.get_by_test_id("backtest-list").locator("tr", has_text="sweep child")
    await expect(sweep_children).to_have_count(2, timeout=15_000)
    for index in range(2):
        await sweep_children.nth(index).get_by_role("checkbox").check()
    compare = page.get_by_test_id("compare")
    await expect(compare).to_contain_text("count=1")
    await expect(compare).to_contain_text("count=5")
    await expect(compare).to_contain_text("total PnL")
    await page.screenshot(path=screenshots / "backtests-compare.png", full_page=True)


@dataclass(frozen=True)
class PastMarket:
    ticker: str
    gap_id: int


@pytest.fixture(scope="module")
async def stored_past(live_stack: Dashboard) -> PastMarket:
    """A market of its own next to the sim's: snapshots over the last 30 hours (1m candles span
    several ListCandles windows of 500) and one feed gap 3 hours ago, all stored before any page
    opens."""
    now = datetime.now(UTC).replace(microsecond=0)
    market = MarketRecord(
        ticker="KXPAST-26DEC05-T1",
        event_ticker="KXPAST-26DEC05",
        series_ticker="KXPAST",
        title="A market with a long past",
        status=MarketStatus.OPEN,
        open_time=now - timedelta(days=2),
        close_time=now + timedelta(days=2),
    )
    # 20,000 snapshots, one every 5.4 s: more than a worker replays between two checks for a
    # stop (8,192), for the Cancel test.
    steps = 20_000
    history = [
        make_snapshot(
            market.ticker,
            i,
            exchange_time=now - timedelta(milliseconds=5400 * (steps - i)),
            receive_time=now - timedelta(milliseconds=5400 * (steps - i)),
            yes_bid=4000 + 7 * (i % 40),
            yes_ask=4200 + 7 * (i % 40),
            no_bid=5800 - 7 * (i % 40),
            no_ask=6000 - 7 * (i % 40),
        )
        for i in range(steps)
    ]
    gap = FeedGapRecord(
        channel="ticker",
        subscription_id=9,
        expected_sequence=100,
        received_sequence=104,
        detect_time=now - timedelta(hours=3),
        ticker=market.ticker,
        recovered=True,
        recover_time=now - timedelta(hours=3) + timedelta(seconds=5),
    )
    async with (
        grpc.aio.insecure_channel(live_stack.grpc_address) as channel,
        PublishSession(channel) as publisher,
    ):
        await publisher.publish(markets=[market], gaps=[gap])
        for start in range(0, steps, 5000):
            await publisher.publish(snapshots=history[start : start + 5000])
        # The sim's newer gaps of whole subscriptions come first: ask for the past ones.
        stored = await pb_grpc.MarketServiceStub(channel).ListFeedGaps(
            pb.ListFeedGapsRequest(
                tickers=[market.ticker], end_time=timestamp(gap.detect_time + timedelta(seconds=1))
            )
        )
    (gap_id,) = [g.gap_id for g in stored.feed_gaps if g.ticker == market.ticker]
    return PastMarket(market.ticker, gap_id)


async def test_market_page_scrolls_back_through_older_candles_and_marks_past_gaps(
    live_stack: Dashboard, stored_past: PastMarket, page: Page, screenshots: Path
) -> None:
    candle_calls: list[str] = []
    page.on(
        "request",
        lambda request: candle_calls.append(request.url) if "/ListCandles" in request.url else None,
    )
    await page.goto(live_stack.url + "#/market/" + stored_past.ticker)
    chart = page.get_by_test_id("price-chart")
    await expect(chart).to_have_attribute("data-candles", re.compile(r"^[1-9]"), timeout=20_000)
    # The gap was stored before the page opened: it comes from ListFeedGaps, not the stream.
    await expect(chart).to_have_attribute(
        "data-gaps", re.compile(rf"(^| ){stored_past.gap_id}( |$)"), timeout=10_000
    )
    canvas = chart.locator("canvas").first
    box = await canvas.bounding_box()
    assert box is not None
    shown = int(await chart.get_attribute("data-candles") or 0)
    calls = len(candle_calls)
    # Drag the time axis to the right (back in time) until older candles are drawn.
    middle_y = box["y"] + box["height"] / 2
    for _ in range(10):
        await page.mouse.move(box["x"] + 40, middle_y)
        await page.mouse.down()
        await page.mouse.move(box["x"] + box["width"] - 40, middle_y, steps=8)
        await page.mouse.up()
        if int(await chart.get_attribute("data-candles") or 0) > shown:
            break
    await expect(chart).not_to_have_attribute("data-candles", str(shown), timeout=10_000)
    assert int(await chart.get_attribute("data-candles") or 0) > shown
    assert len(candle_calls) > calls, "older candles came from more ListCandles calls"
    await page.screenshot(path=screenshots / "market-scroll-back.png", full_page=True)


async def test_cancel_ends_a_running_backtest_cancelled_in_the_page_and_the_server(
    live_stack: Dashboard, stored_past: PastMarket, page: Page
) -> None:
    # user_dawdles over the market's ≈16,000 snapshots of the last day takes ≈8 s or more: it is
    # still running when Cancel is clicked; the worker sees the stop at its next check (at the
    # start, then every 8,192 snapshots).
    form = await _backtest_form(page, live_stack, "user_dawdles")
    await expect(form.get_by_label("markets").locator("option:checked")).not_to_have_count(0)
    await form.get_by_label("markets").select_option(stored_past.ticker)
    await form.get_by_role("button", name="Run").click()
    await expect(page).to_have_url(re.compile(r"#/backtests/[^/]+$"), timeout=15_000)
    detail = page.get_by_test_id("backtest-detail")
    await expect(detail).to_have_attribute("data-state", "running", timeout=60_000)
    await detail.get_by_role("button", name="Cancel").click()
    await expect(detail).to_have_attribute("data-state", "cancelled", timeout=30_000)
    backtest_id = page.url.rsplit("/", 1)[1]
    async with grpc.aio.insecure_channel(live_stack.grpc_address) as channel:
        stored = await bt_grpc.BacktestServiceStub(channel).GetBacktest(
            bt.GetBacktestRequest(backtest_id=backtest_id)
        )
    assert stored.backtest.state == bt.BACKTEST_STATE_CANCELLED
    progress = stored.backtest.progress
    assert progress.snapshots_processed < progress.snapshots_total, "it stopped before the end"
