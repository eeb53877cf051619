"""Data quality of a run: the recorded feed gaps that overlap its markets and window.

A gap is a sequence gap the WebSocket feed detected. It spans from its detection to its recovery
(resubscribe or resnapshot), or to the end of the window when it was never recovered. A gap with
no ticker hit its whole subscription, so it counts for every market of the run. A market's
coverage is the share of the window outside the union of its gaps.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from kfeed_server.records import FeedGapRecord
from kfeed_server.records.backtest import DataQuality, MarketCoverage


class UnrecoveredGaps(Exception):
    """A GAP_POLICY_REFUSE run whose window holds unrecovered gaps."""

    def __init__(self, gaps: Sequence[FeedGapRecord]) -> None:
        self.gaps = tuple(gaps)
        first = gaps[0]
        where = f" ({first.ticker})" if first.ticker else ""
        super().__init__(
            f"refused by gap_policy REFUSE: {len(gaps)} unrecovered feed gap(s) overlap the "
            f"window, the first detected at {first.detect_time.isoformat()}{where}"
        )


def _span(gap: FeedGapRecord, end: datetime) -> tuple[datetime, datetime]:
    stop = gap.recover_time if gap.recovered and gap.recover_time is not None else end
    return gap.detect_time, max(stop, gap.detect_time)


def applies_to(gap: FeedGapRecord, ticker: str) -> bool:
    """Whether ``gap`` hides data of ``ticker`` (a gap without a ticker hides every market)."""
    return not gap.ticker or gap.ticker == ticker


def overlaps(gap: FeedGapRecord, start: datetime, end: datetime) -> bool:
    """Whether ``gap`` overlaps the window [start, end)."""
    gap_start, gap_end = _span(gap, end)
    return gap_start < end and gap_end > start


def unrecovered(
    gaps: Sequence[FeedGapRecord], tickers: Sequence[str], start: datetime, end: datetime
) -> list[FeedGapRecord]:
    """The unrecovered gaps among ``gaps`` that overlap the markets and window."""
    return [
        g
        for g in gaps
        if not g.recovered
        and overlaps(g, start, end)
        and any(applies_to(g, ticker) for ticker in tickers)
    ]


def data_quality(
    gaps: Sequence[FeedGapRecord], tickers: Sequence[str], start: datetime, end: datetime
) -> DataQuality:
    """The report of ``gaps`` over the markets ``tickers`` and the window [start, end)."""
    window = max(end - start, timedelta(0))
    seen: set[tuple[str, int, int, datetime]] = set()
    unrecovered_keys: set[tuple[str, int, int, datetime]] = set()
    markets = []
    total = timedelta(0)
    for ticker in tickers:
        spans = []
        count = 0
        for gap in gaps:
            if not applies_to(gap, ticker) or not overlaps(gap, start, end):
                continue
            key = (gap.channel, gap.subscription_id, gap.expected_sequence, gap.detect_time)
            seen.add(key)
            if not gap.recovered:
                unrecovered_keys.add(key)
            count += 1
            gap_start, gap_end = _span(gap, end)
            spans.append((max(gap_start, start), min(gap_end, end)))
        covered = _union_length(spans)
        total += covered
        coverage = 1.0 - covered / window if window > timedelta(0) else 1.0
        markets.append(MarketCoverage(ticker, coverage, count, covered))
    return DataQuality(len(seen), total, len(unrecovered_keys), tuple(markets))


def _union_length(spans: list[tuple[datetime, datetime]]) -> timedelta:
    """The length of the union of the intervals."""
    total = timedelta(0)
    current: tuple[datetime, datetime] | None = None
    for start, end in sorted(spans):
        if end <= start:
            continue
        if current is None or start > current[1]:
            if current is not None:
                total += current[1] - current[0]
            current = (start, end)
        else:
            current = (current[0], max(current[1], end))
    if current is not None:
        total += current[1] - current[0]
    return total
