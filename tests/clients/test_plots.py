"""The equity PNG reads as a person expects: dollar ticks without an offset, executions marked."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from kfeed.v1 import backtest_service_pb2 as pb
from kfeed_client.backtest_cli import equity_figure

START = datetime(2026, 3, 12, 15, 0, tzinfo=UTC)


def _backtest() -> pb.Backtest:
    """Equity wandering a few cents around $1,000: matplotlib's default axis would print offset
    ticks ("+1e3") for it."""
    backtest = pb.Backtest(backtest_id="bt-1")
    backtest.config.strategy = "threshold"
    for minute in range(60):
        point = backtest.equity_curve.add()
        point.time.FromDatetime(START + timedelta(minutes=minute))
        point.equity.ten_thousandths = 10_000_000 + (minute % 7) * 300
    return backtest


def _execution(minute: int, action: pb.OrderAction.ValueType) -> pb.Execution:
    execution = pb.Execution(action=action)
    execution.time.FromDatetime(START + timedelta(minutes=minute, seconds=30))
    return execution


def test_the_equity_axis_is_in_dollars_and_executions_are_marked() -> None:
    executions = [
        _execution(5, pb.ORDER_ACTION_BUY),
        _execution(9, pb.ORDER_ACTION_SELL),
        _execution(20, pb.ORDER_ACTION_BUY),
        _execution(59, pb.ORDER_ACTION_SETTLE),
    ]
    figure = equity_figure(_backtest(), executions)
    figure.canvas.draw()
    axes = figure.axes[0]
    labels = [tick.get_text() for tick in axes.get_yticklabels() if tick.get_text()]
    assert labels, "no y tick labels"
    assert all(re.fullmatch(r"\$\d{1,3}(,\d{3})*\.\d{2}", label) for label in labels), labels
    assert axes.yaxis.get_offset_text().get_text() == ""
    markers = {c.get_label(): len(c.get_offsets()) for c in axes.collections}
    assert markers == {"buy": 2, "sell": 1, "settle": 1}
