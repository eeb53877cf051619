"""Recorded feed gaps in a run's markets and window: the report (hand-computed) and the policy
that refuses windows with unrecovered gaps, through a real server on both databases."""

from __future__ import annotations

from datetime import timedelta

import pytest

from kfeed.v1 import backtest_service_pb2 as pb
from kfeed.v1 import backtest_service_pb2_grpc as pb_grpc
from kfeed_server.backtest.quality import data_quality
from kfeed_server.records import FeedGapRecord, SnapshotRecord
from kfeed_server.records.backtest import DataQuality, MarketCoverage
from tests.support.backtest_service import TICKER, run_to_end, threshold_config
from tests.support.factories import at, make_gap
from tests.support.servers import PublishSession


def _gap(sequence: int, ticker: str, detect: float, recover: float | None) -> FeedGapRecord:
    return FeedGapRecord(
        channel="orderbook_delta",
        subscription_id=1,
        expected_sequence=sequence,
        received_sequence=sequence + 2,
        detect_time=at(detect),
        ticker=ticker,
        recovered=recover is not None,
        recover_time=None if recover is None else at(recover),
    )


def test_the_report_counts_gaps_and_coverage_per_market() -> None:
    gaps = [
        _gap(1, "A", 100, 200),  # A: [100, 200)
        _gap(2, "", 150, 250),  # the whole subscription: A and B, [150, 250)
        _gap(3, "B", 900, None),  # never recovered: B until the window ends, [900, 1000)
        _gap(4, "A", 2_000, 2_100),  # after the window
        _gap(5, "C", 100, 900),  # another market
    ]
    report = data_quality(gaps, ("A", "B"), at(0), at(1_000))
    # A: [100, 200) ∪ [150, 250) = [100, 250) = 150 s of 1,000: coverage 0.85.
    # B: [150, 250) and [900, 1000) = 200 s: coverage 0.80.
    assert report == DataQuality(
        gap_count=3,
        gap_time=timedelta(seconds=350),
        unrecovered_gap_count=1,
        markets=(
            MarketCoverage("A", 0.85, 2, timedelta(seconds=150)),
            MarketCoverage("B", 0.8, 2, timedelta(seconds=200)),
        ),
    )


def test_an_unrecovered_gap_before_the_window_hides_all_of_it() -> None:
    report = data_quality([_gap(1, "A", -50, None)], ("A",), at(0), at(100))
    assert report.markets == (MarketCoverage("A", 0.0, 1, timedelta(seconds=100)),)


@pytest.fixture
async def gaps(publisher: PublishSession, recorded: list[SnapshotRecord]) -> None:
    await publisher.publish(
        gaps=[
            make_gap(100, ticker=TICKER, recovered=True, recover_time=at(160)),
            make_gap(300, ticker=TICKER),
            make_gap(400, ticker="KXOTHER", recovered=True, recover_time=at(500)),
        ]
    )


async def test_a_run_reports_the_gaps_of_its_markets_and_window(
    stub: pb_grpc.BacktestServiceAsyncStub, gaps: None
) -> None:
    backtest = await run_to_end(stub, threshold_config())
    assert backtest.state == pb.BACKTEST_STATE_SUCCEEDED, backtest.error_message
    quality = backtest.data_quality
    # Window [0, 10,000 s): [100, 160) recovered, [300, 10,000) never: 60 + 9,700 = 9,760 s.
    assert (quality.gap_count, quality.unrecovered_gap_count) == (2, 1)
    assert quality.gap_time.ToTimedelta() == timedelta(seconds=9_760)
    (market,) = quality.markets
    assert (market.ticker, market.gap_count) == (TICKER, 2)
    assert market.coverage == pytest.approx(1 - 9_760 / 10_000)


async def test_gap_policy_refuse_fails_a_window_with_unrecovered_gaps(
    stub: pb_grpc.BacktestServiceAsyncStub, gaps: None
) -> None:
    config = threshold_config()
    config.gap_policy = pb.GAP_POLICY_REFUSE
    backtest = await run_to_end(stub, config)
    assert backtest.state == pb.BACKTEST_STATE_FAILED
    assert "unrecovered feed gap" in backtest.error_message
    assert backtest.config.gap_policy == pb.GAP_POLICY_REFUSE
    # Only recovered gaps before 300 s: the same policy runs.
    config.end_time.CopyFrom(threshold_config(seconds=250).end_time)
    backtest = await run_to_end(stub, config)
    assert backtest.state == pb.BACKTEST_STATE_SUCCEEDED, backtest.error_message
    assert backtest.data_quality.gap_count == 1
