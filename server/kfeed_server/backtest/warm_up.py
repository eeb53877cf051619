"""Imported by the backtest forkserver before it forks workers: compiles (or loads from numba's
disk cache) the compiled path once, so every worker forked afterwards inherits it and no run pays
for it. Never raises: a failure only means the first run compiles instead."""

from __future__ import annotations

import logging

from kfeed_server.backtest.fast import warm_up

try:
    warm_up()
except Exception:
    logging.getLogger(__name__).warning("compiled backtest path not warmed up", exc_info=True)
