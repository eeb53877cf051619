"""Async REST client for the Kalshi Trade API v2 (httpx + tenacity).

- Retries (exponential backoff with jitter) only what can succeed on a second try: 429, 5xx,
  timeouts, transport errors and malformed bodies; never another 4xx. A ``Retry-After`` header is
  honoured when present (Kalshi usually sends none).
- A client-side token bucket keeps the request rate under the account's tier.
- Lists are async iterators that ask for the server's page cap and follow ``cursor``.
- Items that fail validation are logged and skipped; the rest of the page is kept.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from kfeed_ingest.kalshi.models import (
    KalshiCandlesticks,
    KalshiEvent,
    KalshiExchangeStatus,
    KalshiHistoricalCutoff,
    KalshiMarket,
    KalshiOrderbookResponse,
    KalshiSeries,
    KalshiTrade,
)
from kfeed_ingest.kalshi.signing import KalshiCredentials

logger = logging.getLogger(__name__)

PRODUCTION_REST_URL = "https://external-api.kalshi.com/trade-api/v2"
MARKETS_PAGE_CAP = 1000
TRADES_PAGE_CAP = 1000
EVENTS_PAGE_CAP = 200

ModelT = TypeVar("ModelT", bound=BaseModel)
QueryValue = str | int | bool | None


class RateTier(enum.StrEnum):
    """Kalshi API access tiers."""

    BASIC = "basic"
    ADVANCED = "advanced"
    PREMIER = "premier"
    PRIME = "prime"


READS_PER_SECOND: Mapping[RateTier, float] = {
    RateTier.BASIC: 20.0,
    RateTier.ADVANCED: 30.0,
    RateTier.PREMIER: 100.0,
    RateTier.PRIME: 400.0,
}


class TokenBucket:
    """A token bucket: ``rate`` requests per second on average, bursts up to ``capacity``."""

    def __init__(
        self,
        rate: float,
        capacity: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = capacity if capacity is not None else max(1.0, rate)
        self._tokens = self.capacity
        self._clock = clock
        self._updated = clock()
        self._lock = asyncio.Lock()

    @classmethod
    def for_tier(cls, tier: RateTier | str) -> TokenBucket:
        """A bucket matching a tier's documented read rate."""
        return cls(READS_PER_SECOND[RateTier(tier)])

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    async def acquire(self) -> None:
        """Wait until a request may be sent, then take its token."""
        # The lock makes waiters queue in arrival order instead of racing for each new token.
        async with self._lock:
            self._refill()
            while self._tokens < 1:
                await asyncio.sleep((1 - self._tokens) / self.rate)
                self._refill()
            self._tokens -= 1


class KalshiError(Exception):
    """A Kalshi request that failed for good (after any retries)."""


class KalshiStatusError(KalshiError):
    """A non-2xx answer; ``retryable`` for 429 and 5xx."""

    def __init__(self, status: int, message: str, path: str, retry_after: float | None) -> None:
        super().__init__(f"{status} from {path}: {message}")
        self.status = status
        self.message = message
        self.path = path
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """True for 429 (rate limited) and server errors."""
        return self.status == 429 or self.status >= 500


class MalformedResponseError(KalshiError):
    """A 2xx answer whose body is not the JSON object expected (truncated, garbled, …)."""


class _RetryableStatus(Exception):
    """Internal: wraps a retryable status error so tenacity retries exactly these."""

    def __init__(self, error: KalshiStatusError) -> None:
        super().__init__(str(error))
        self.error = error


RETRYABLE_EXCEPTIONS: tuple[type[BaseException], ...] = (
    _RetryableStatus,
    MalformedResponseError,
    httpx.TimeoutException,
    httpx.TransportError,
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to retry: attempts in total and the exponential backoff's shape (seconds)."""

    attempts: int = 6
    initial_backoff: float = 0.25
    max_backoff: float = 20.0
    jitter: float = 0.25
    max_retry_after: float = 60.0


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _error_message(response: httpx.Response) -> str:
    """Kalshi's error bodies vary (``{"error": {"code", "message"}}``, ``{"error": "..."}``)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            parts = [str(error[key]) for key in ("code", "message") if error.get(key)]
            return ": ".join(parts) or json.dumps(error)[:200]
        return str(error)[:200]
    return str(body)[:200]


class KalshiRestClient:
    """The Trade API's read endpoints ingest uses. Use as an async context manager."""

    def __init__(
        self,
        base_url: str = PRODUCTION_REST_URL,
        *,
        credentials: KalshiCredentials | None = None,
        rate_limiter: TokenBucket | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._credentials = credentials
        self._limiter = rate_limiter or TokenBucket.for_tier(RateTier.BASIC)
        self._retry = retry or RetryPolicy()
        self._backoff = wait_exponential_jitter(
            multiplier=self._retry.initial_backoff,
            max=self._retry.max_backoff,
            jitter=self._retry.jitter,
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url + "/", timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> KalshiRestClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def _wait(self, state: RetryCallState) -> float:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, _RetryableStatus) and error.error.retry_after is not None:
            return min(error.error.retry_after, self._retry.max_retry_after)
        return float(self._backoff(state))

    def _log_retry(self, state: RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        logger.warning(
            "Kalshi request failed (attempt %d): %s; retrying in %.2fs",
            state.attempt_number,
            error,
            wait,
        )

    async def _request_once(self, path: str, params: Mapping[str, QueryValue]) -> dict[str, Any]:
        await self._limiter.acquire()
        query = {key: _query_text(value) for key, value in params.items() if value is not None}
        request = self._http.build_request("GET", path.lstrip("/"), params=query)
        if self._credentials is not None:
            request.headers.update(self._credentials.headers("GET", request.url.path))
        response = await self._http.send(request)
        if response.status_code >= 300:
            error = KalshiStatusError(
                response.status_code,
                _error_message(response),
                request.url.path,
                parse_retry_after(response.headers.get("Retry-After")),
            )
            raise _RetryableStatus(error) if error.retryable else error
        try:
            body = response.json()
        except ValueError:
            raise MalformedResponseError(
                f"malformed JSON from {request.url.path} ({len(response.content)} bytes)"
            ) from None
        if not isinstance(body, dict):
            raise MalformedResponseError(f"expected a JSON object from {request.url.path}")
        return body

    async def get_json(
        self, path: str, params: Mapping[str, QueryValue] | None = None
    ) -> dict[str, Any]:
        """GET ``path`` (relative to the base URL) with retries; the JSON object answered.

        Raises :class:`KalshiStatusError` (after retries for 429/5xx, at once for other 4xx),
        :class:`MalformedResponseError` or :class:`KalshiError` for a transport failure.
        """
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._retry.attempts),
            wait=self._wait,
            retry=retry_if_exception_type(RETRYABLE_EXCEPTIONS),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._request_once(path, params or {})
        except _RetryableStatus as exc:
            raise exc.error from None
        except httpx.HTTPError as exc:
            raise KalshiError(f"{type(exc).__name__} on {path}: {exc}") from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _get_model(
        self,
        path: str,
        key: str,
        model: type[ModelT],
        params: Mapping[str, QueryValue] | None = None,
    ) -> ModelT:
        body = await self.get_json(path, params)
        try:
            return model.model_validate(body[key] if key else body)
        except (KeyError, ValidationError) as exc:
            raise MalformedResponseError(f"unexpected shape from {path}: {exc}") from None

    async def _paginate(
        self,
        path: str,
        key: str,
        model: type[ModelT],
        params: Mapping[str, QueryValue],
        page_cap: int,
    ) -> AsyncIterator[ModelT]:
        cursor: str | None = None
        seen_cursors: set[str] = set()
        while True:
            body = await self.get_json(path, {**params, "limit": page_cap, "cursor": cursor})
            for item in _as_list(body.get(key), path, key):
                parsed = _validate_item(model, item, path)
                if parsed is not None:
                    yield parsed
            next_cursor = body.get("cursor")
            if not next_cursor or not isinstance(next_cursor, str):
                return
            if next_cursor in seen_cursors:
                logger.error(
                    "Kalshi repeated cursor %r on %s; stopping pagination", next_cursor, path
                )
                return
            seen_cursors.add(next_cursor)
            cursor = next_cursor

    # -- single objects ------------------------------------------------------------------------

    async def get_exchange_status(self) -> KalshiExchangeStatus:
        """``/exchange/status``."""
        return await self._get_model("/exchange/status", "", KalshiExchangeStatus)

    async def get_series(self, series_ticker: str) -> KalshiSeries:
        """``/series/{series_ticker}``."""
        return await self._get_model(f"/series/{series_ticker}", "series", KalshiSeries)

    async def get_event(self, event_ticker: str) -> KalshiEvent:
        """``/events/{event_ticker}`` (its markets are attached as ``markets``)."""
        body = await self.get_json(f"/events/{event_ticker}")
        try:
            event = dict(body["event"])
        except (KeyError, TypeError, ValueError):
            raise MalformedResponseError(f"no event in /events/{event_ticker}") from None
        event.setdefault("markets", body.get("markets"))
        try:
            return KalshiEvent.model_validate(event)
        except ValidationError as exc:
            raise MalformedResponseError(f"unexpected event shape: {exc}") from None

    async def get_market(self, ticker: str) -> KalshiMarket:
        """``/markets/{ticker}``."""
        return await self._get_model(f"/markets/{ticker}", "market", KalshiMarket)

    async def get_historical_market(self, ticker: str) -> KalshiMarket:
        """``/historical/markets/{ticker}``."""
        return await self._get_model(f"/historical/markets/{ticker}", "market", KalshiMarket)

    async def get_orderbook(self, ticker: str, depth: int | None = None) -> KalshiOrderbookResponse:
        """``/markets/{ticker}/orderbook`` (bids only, both sides)."""
        return await self._get_model(
            f"/markets/{ticker}/orderbook", "", KalshiOrderbookResponse, {"depth": depth}
        )

    async def get_candlesticks(
        self,
        series_ticker: str,
        ticker: str,
        start_ts: int,
        end_ts: int,
        period_interval: int = 60,
        *,
        historical: bool = False,
    ) -> KalshiCandlesticks:
        """A market's candlesticks over ``[start_ts, end_ts]`` (unix seconds), period in minutes."""
        path = (
            f"/historical/markets/{ticker}/candlesticks"
            if historical
            else f"/series/{series_ticker}/markets/{ticker}/candlesticks"
        )
        params = {"start_ts": start_ts, "end_ts": end_ts, "period_interval": period_interval}
        return await self._get_model(path, "", KalshiCandlesticks, params)

    async def get_historical_cutoff(self) -> KalshiHistoricalCutoff:
        """``/historical/cutoff``: where the historical tier begins."""
        return await self._get_model("/historical/cutoff", "", KalshiHistoricalCutoff)

    # -- lists ---------------------------------------------------------------------------------

    def iter_markets(
        self,
        *,
        status: str | None = None,
        event_ticker: str | None = None,
        series_ticker: str | None = None,
        tickers: list[str] | None = None,
        min_close_ts: int | None = None,
        max_close_ts: int | None = None,
        historical: bool = False,
    ) -> AsyncIterator[KalshiMarket]:
        """Every market matching the filters (``/markets`` or ``/historical/markets``)."""
        params: dict[str, QueryValue] = {
            "status": status,
            "event_ticker": event_ticker,
            "series_ticker": series_ticker,
            "tickers": ",".join(tickers) if tickers else None,
            "min_close_ts": min_close_ts,
            "max_close_ts": max_close_ts,
        }
        path = "/historical/markets" if historical else "/markets"
        return self._paginate(path, "markets", KalshiMarket, params, MARKETS_PAGE_CAP)

    def iter_historical_markets(self, **filters: Any) -> AsyncIterator[KalshiMarket]:
        """:meth:`iter_markets` on the historical tier."""
        return self.iter_markets(historical=True, **filters)

    def iter_events(
        self,
        *,
        status: str | None = None,
        series_ticker: str | None = None,
        with_nested_markets: bool = False,
    ) -> AsyncIterator[KalshiEvent]:
        """Every event matching the filters."""
        params: dict[str, QueryValue] = {
            "status": status,
            "series_ticker": series_ticker,
            "with_nested_markets": with_nested_markets or None,
        }
        return self._paginate("/events", "events", KalshiEvent, params, EVENTS_PAGE_CAP)

    def iter_trades(
        self,
        *,
        ticker: str | None = None,
        min_ts: int | None = None,
        max_ts: int | None = None,
        historical: bool = False,
    ) -> AsyncIterator[KalshiTrade]:
        """Public trades (``/markets/trades`` or ``/historical/trades``), times in unix seconds."""
        params: dict[str, QueryValue] = {"ticker": ticker, "min_ts": min_ts, "max_ts": max_ts}
        path = "/historical/trades" if historical else "/markets/trades"
        return self._paginate(path, "trades", KalshiTrade, params, TRADES_PAGE_CAP)

    def iter_historical_trades(self, **filters: Any) -> AsyncIterator[KalshiTrade]:
        """:meth:`iter_trades` on the historical tier."""
        return self.iter_trades(historical=True, **filters)


def _query_text(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _as_list(value: object, path: str, key: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        logger.error("%s: %r is not a list; page skipped", path, key)
        return []
    return value


def _validate_item(model: type[ModelT], item: object, path: str) -> ModelT | None:
    try:
        return model.model_validate(item)
    except ValidationError as exc:
        logger.error("%s: skipping an item Kalshi sent in an unexpected shape: %s", path, exc)
        return None
