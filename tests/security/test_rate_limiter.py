"""The token bucket, on a clock the test moves."""

from __future__ import annotations

import pytest
from google.rpc import code_pb2, error_details_pb2

from kfeed_server.security.rate_limit import RateLimited, RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_granted_then_the_next_call_waits_one_interval() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    clock.now += 0.25
    assert limiter.acquire("a") == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.acquire("a") == 0.0


def test_buckets_refill_only_up_to_the_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=10.0, burst=2, clock=clock)
    clock.now += 3600
    assert [limiter.acquire("a") > 0 for _ in range(3)] == [False, False, True]


def test_each_caller_has_its_own_bucket() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=FakeClock())
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0
    assert limiter.acquire("b") == 0.0


def test_default_burst_is_one_seconds_worth() -> None:
    assert RateLimiter(rate=0.2).burst == 1
    assert RateLimiter(rate=7.5).burst == 8


@pytest.mark.parametrize(("rate", "burst"), [(0.0, None), (-1.0, None), (1.0, 0)])
def test_nonsense_limits_are_refused(rate: float, burst: int | None) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        RateLimiter(rate=rate, burst=burst)


def test_the_refusal_carries_retry_info_rounded_up_to_the_millisecond() -> None:
    status = RateLimited("reader", 0.0101).to_status()
    assert status.code == code_pb2.RESOURCE_EXHAUSTED
    assert "reader" in status.message
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 11
