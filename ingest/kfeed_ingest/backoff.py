"""Reconnect backoff shared by the Publish stream and the Kalshi WebSocket."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter, in seconds: ``initial·2^(n−1)`` capped at ``maximum``.

    The delay is drawn from the upper half of that ceiling, so many clients that lost the same
    server at once do not come back in lockstep, yet none retries sooner than half the schedule.
    """

    initial: float = 0.2
    maximum: float = 10.0

    def delay(self, failures: int) -> float:
        """How long to wait after ``failures`` consecutive failures (≥ 1)."""
        ceiling = min(self.maximum, self.initial * 2 ** max(0, failures - 1))
        return random.uniform(ceiling / 2, ceiling)
