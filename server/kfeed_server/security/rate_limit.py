"""A token bucket per caller: ``rate`` calls per second on average, bursts up to ``burst``.

Every RPC call (a stream counts once, when it opens) takes one token from its caller's bucket.
An empty bucket answers RESOURCE_EXHAUSTED with a google.rpc.RetryInfo saying when the next
token will be there, so well-behaved clients back off exactly as long as needed.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from kfeed_server.transport.errors import ResourceExhausted

Clock = Callable[[], float]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Independent token buckets keyed by caller name (never by the secret token)."""

    def __init__(self, rate: float, burst: int | None = None, clock: Clock = time.monotonic):
        if rate <= 0:
            raise ValueError("rate limit must be positive")
        self.rate = rate
        # Default burst: one second's worth, and at least one call.
        self.burst = burst if burst is not None else max(1, math.ceil(rate))
        if self.burst < 1:
            raise ValueError("rate limit burst must be at least 1")
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        # Interceptors run on the event loop, but a lock keeps the limiter safe anywhere.
        self._lock = threading.Lock()

    def acquire(self, caller: str) -> float:
        """Take one token for ``caller``; 0.0 when granted, else the seconds until one is due."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(caller)
            if bucket is None:
                bucket = self._buckets[caller] = _Bucket(float(self.burst), now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate


class RateLimited(ResourceExhausted):
    """RESOURCE_EXHAUSTED with a google.rpc.RetryInfo carrying ``retry_delay``."""

    def __init__(self, caller: str, retry_after: float) -> None:
        super().__init__(f"rate limit exceeded for {caller!r}; retry in {retry_after:.3f} s")
        self.retry_after = retry_after

    def to_status(self) -> status_pb2.Status:
        status = super().to_status()
        delay = duration_pb2.Duration()
        # Rounded up to the millisecond: retrying a hair early would just be refused again.
        delay.FromMilliseconds(math.ceil(self.retry_after * 1000))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status.details.append(detail)
        return status
