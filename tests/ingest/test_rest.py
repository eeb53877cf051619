"""The Kalshi REST client: what is retried and how, pagination, rate limiting, bad bodies."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from kfeed_ingest.kalshi.rest import (
    KalshiError,
    KalshiRestClient,
    KalshiStatusError,
    MalformedResponseError,
    RateTier,
    RetryPolicy,
    TokenBucket,
    parse_retry_after,
)
from kfeed_ingest.kalshi.signing import KalshiCredentials, SecretKey

BASE = "http://kalshi.test/trade-api/v2"
FAST_RETRIES = RetryPolicy(attempts=4, initial_backoff=0.001, max_backoff=0.01, jitter=0.001)

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that answers from a script and records each request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def _client(handler: Handler, retry: RetryPolicy = FAST_RETRIES) -> KalshiRestClient:
    return KalshiRestClient(
        BASE,
        transport=httpx.MockTransport(handler),
        retry=retry,
        rate_limiter=TokenBucket(10_000),
    )


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(body).encode(), headers=headers)


MARKET = {"market": {"ticker": "KXT-1", "status": "active", "yes_bid_dollars": "0.4200"}}


async def test_429_then_success_is_retried() -> None:
    handler = Recorder(_json(429, {"error": "too many requests"}), _json(200, MARKET))
    async with _client(handler) as client:
        market = await client.get_market("KXT-1")
    assert market.yes_bid_dollars == "0.4200"
    assert len(handler.requests) == 2


async def test_server_errors_are_retried_until_the_attempts_run_out() -> None:
    handler = Recorder(_json(503, {"error": {"code": "unavailable", "message": "try later"}}))
    async with _client(handler) as client:
        with pytest.raises(KalshiStatusError) as caught:
            await client.get_market("KXT-1")
    assert caught.value.status == 503
    assert "try later" in str(caught.value)
    assert len(handler.requests) == FAST_RETRIES.attempts


async def test_timeouts_and_transport_errors_are_retried() -> None:
    handler = Recorder(httpx.ReadTimeout("slow"), httpx.ConnectError("refused"), _json(200, MARKET))
    async with _client(handler) as client:
        assert (await client.get_market("KXT-1")).ticker == "KXT-1"
    assert len(handler.requests) == 3


async def test_persistent_transport_failure_becomes_a_kalshi_error() -> None:
    handler = Recorder(httpx.ConnectError("refused"))
    async with _client(handler) as client:
        with pytest.raises(KalshiError, match="ConnectError"):
            await client.get_market("KXT-1")


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_other_client_errors_are_not_retried(status: int) -> None:
    handler = Recorder(_json(status, {"error": {"code": "not_found", "message": "no market"}}))
    async with _client(handler) as client:
        with pytest.raises(KalshiStatusError) as caught:
            await client.get_market("NOPE")
    assert caught.value.status == status
    assert len(handler.requests) == 1


async def test_retry_after_is_honoured() -> None:
    handler = Recorder(
        _json(429, {"error": "too many requests"}, {"Retry-After": "0.3"}), _json(200, MARKET)
    )
    started = time.monotonic()
    async with _client(handler) as client:
        await client.get_market("KXT-1")
    assert time.monotonic() - started >= 0.3


def test_retry_after_forms() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


async def test_a_malformed_body_is_retried_then_reported() -> None:
    truncated = httpx.Response(200, content=b'{"market": {"ticker": "KX')
    handler = Recorder(truncated, _json(200, MARKET))
    async with _client(handler) as client:
        assert (await client.get_market("KXT-1")).ticker == "KXT-1"

    always_bad = Recorder(truncated)
    async with _client(always_bad) as client:
        with pytest.raises(MalformedResponseError):
            await client.get_market("KXT-1")
    assert len(always_bad.requests) == FAST_RETRIES.attempts


async def test_pagination_follows_cursors_asks_for_the_cap_and_skips_bad_items() -> None:
    pages = {
        None: {"markets": [{"ticker": "A"}, {"ticker": "B"}], "cursor": "c1"},
        "c1": {"markets": [{"no_ticker": True}, {"ticker": "C"}], "cursor": "c2"},
        "c2": {"markets": [{"ticker": "D"}], "cursor": ""},
    }
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _json(200, pages[request.url.params.get("cursor")])

    async with _client(handler) as client:
        tickers = [m.ticker async for m in client.iter_markets(status="open", tickers=["A", "B"])]
    assert tickers == ["A", "B", "C", "D"]
    assert [r.url.params.get("limit") for r in seen] == ["1000"] * 3
    assert seen[0].url.params["status"] == "open"
    assert seen[0].url.params["tickers"] == "A,B"
    assert seen[0].url.path == "/trade-api/v2/markets"


async def test_historical_and_trade_paths() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.path}?limit={request.url.params['limit']}")
        return _json(200, {"trades": [], "events": [], "markets": []})

    async with _client(handler) as client:
        assert [t async for t in client.iter_trades(ticker="A")] == []
        assert [t async for t in client.iter_historical_trades(ticker="A")] == []
        assert [m async for m in client.iter_historical_markets(status="settled")] == []
        assert [e async for e in client.iter_events()] == []
    assert seen == [
        "/trade-api/v2/markets/trades?limit=1000",
        "/trade-api/v2/historical/trades?limit=1000",
        "/trade-api/v2/historical/markets?limit=1000",
        "/trade-api/v2/events?limit=200",
    ]


async def test_signed_requests_sign_the_full_path() -> None:
    key = SecretKey(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    handler = Recorder(_json(200, MARKET))
    client = KalshiRestClient(
        BASE,
        credentials=KalshiCredentials("kid", key),
        transport=httpx.MockTransport(handler),
        rate_limiter=TokenBucket(10_000),
    )
    async with client:
        await client.get_market("KXT-1")
    headers = handler.requests[0].headers
    assert headers["KALSHI-ACCESS-KEY"] == "kid"
    assert int(headers["KALSHI-ACCESS-TIMESTAMP"]) > 1_700_000_000_000


async def test_token_bucket_holds_the_rate() -> None:
    bucket = TokenBucket(rate=50, capacity=1)
    started = time.monotonic()
    for _ in range(11):
        await bucket.acquire()
    # One token at hand, ten more at 50/s: at least 0.2 s.
    assert time.monotonic() - started >= 0.19


def test_tiers() -> None:
    assert TokenBucket.for_tier("basic").rate == 20
    assert TokenBucket.for_tier(RateTier.PRIME).rate == 400
