"""Tables and lines read as a person expects: whole tickers at any width, tab-separated when
piped, an empty book side as "—", and what changed between two rows of a market."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from kfeed.v1 import types_pb2
from kfeed_client.cli import NO_QUOTE, ChangeTracker, print_markets, snapshot_line

LONG_TICKER = "KXSIMBTC-26DEC05RTPJUIIE13-T107500"
ROWS = [
    (LONG_TICKER, "open", "KXSIMBTC-26DEC05RTPJUIIE13", "2026-12-05 03:00:00.000", "Bitcoin " * 9),
    ("KXA-1", "closed", "KXA", "", "Short"),
]


def _snapshot(**fields: int) -> types_pb2.MarketSnapshot:
    snapshot = types_pb2.MarketSnapshot(ticker=LONG_TICKER, status=types_pb2.MARKET_STATUS_OPEN)
    for name, value in fields.items():
        if name in {"volume", "open_interest", "yes_bid_size"}:
            getattr(snapshot, name).hundredths = value
        else:
            getattr(snapshot, name).ten_thousandths = value
    return snapshot


def test_piped_markets_are_tab_separated_and_whole() -> None:
    out = io.StringIO()
    print_markets(ROWS, Console(file=out, width=40))  # not a terminal
    lines = out.getvalue().splitlines()
    assert lines[0].split("\t") == ["ticker", "status", "event", "close time", "title"]
    assert lines[1].split("\t")[0] == LONG_TICKER
    assert lines[1].split("\t")[4] == ROWS[0][4]
    assert len(lines) == 3


@pytest.mark.parametrize("width", [30, 50, 70, 100, 200])
def test_a_terminal_of_any_width_never_cuts_a_ticker(width: int) -> None:
    out = io.StringIO()
    print_markets(ROWS, Console(file=out, width=width, force_terminal=True, color_system=None))
    lines = out.getvalue().splitlines()
    assert any(line.startswith(LONG_TICKER) for line in lines), lines
    assert any(line.startswith("KXA-1") for line in lines), lines
    assert "…" not in out.getvalue()
    if width >= 100:  # room for the event beside the ticker
        assert "KXSIMBTC-26DEC05RTPJUIIE13 " in out.getvalue()


def test_an_empty_book_side_is_a_dash_not_zero() -> None:
    line = snapshot_line(_snapshot(no_bid=4_000, no_ask=4_200))
    assert f"yes [green]{NO_QUOTE}[/]×[red]{NO_QUOTE}[/]" in line
    assert "0.0000" not in line
    assert "no [green]0.4000[/]×[red]0.4200[/]" in line


def test_a_row_says_what_changed_that_it_does_not_show() -> None:
    tracker = ChangeTracker()
    first = _snapshot(yes_bid=4_000, yes_ask=4_200, open_interest=10_000)
    assert tracker.changes(first) is None
    second = _snapshot(yes_bid=4_000, yes_ask=4_200, open_interest=12_500)
    changed = tracker.changes(second)
    assert changed == ["open_interest"]
    assert "Δ open_interest 125.00" in snapshot_line(second, changed=changed)
    third = _snapshot(yes_bid=4_100, yes_ask=4_200, open_interest=12_500)
    changed = tracker.changes(third)
    assert changed == ["yes_bid"]
    assert "Δ" not in snapshot_line(third, changed=changed)  # the change is in the line
    assert "(no change)" in snapshot_line(third, changed=tracker.changes(third))
