"""Fixtures of the backtest service tests (defined in service_support)."""

from tests.backtest.service_support import (  # noqa: F401
    backtest_channel,
    backtest_server,
    publisher,
    recorded,
    stub,
)
