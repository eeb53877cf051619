"""A StreamSnapshots (or StreamTrades, or StreamOrderBooks) subscription that survives
disconnects with no gap and no duplicate.

Every message the server sends carries a resume token: the position right after that message.
The subscriber remembers the last token it saw; when the stream breaks it reconnects (with
exponential backoff and jitter) asking to continue after that token, so the server replays
exactly what was missed and then goes live again. A status that retrying cannot fix
(INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, …) ends the iteration with that error.

Snapshots may arrive batched (``max_batch_size``: many per message, far cheaper to send and to
read); the iterator hands them out one message per snapshot all the same, each with the token
that resumes right after it. Trades arrive as the server sends them (a ``trade_batch`` carries one
token, resuming after its last trade). Order-book batches are handed out one book or change a
message; the batch's token rides on its last (the others carry none).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar, overload

import grpc
from google.rpc import error_details_pb2, status_pb2

from kfeed.v1 import market_service_pb2 as pb
from kfeed.v1 import market_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # server down, restarting, or the connection dropped
        grpc.StatusCode.CANCELLED,  # the server cancelled the stream (e.g. on shutdown)
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,  # includes RST_STREAM from a proxy or a dying peer
        grpc.StatusCode.UNKNOWN,
        # A slow subscriber that chose OVERFLOW_POLICY_RESOURCE_EXHAUSTED, or a rate limit:
        # both are resolved by resuming later from the last token.
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
"""Status codes after which the stream is resumed; any other status ends it."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff between reconnection attempts.

    The n-th consecutive failed attempt waits ``initial_backoff * multiplier**(n-1)`` seconds,
    capped at ``max_backoff``, randomised by ±``jitter`` (a fraction) so that many subscribers
    cut off together do not reconnect in lockstep. A received message resets the count.
    ``max_attempts`` bounds consecutive failures (None: retry forever). When the server sends
    google.rpc.RetryInfo (rate limits), its delay is waited at least.
    """

    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    max_attempts: int | None = None
    retryable_codes: frozenset[grpc.StatusCode] = field(default=RETRYABLE_CODES)

    def backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failed attempts (``failures`` >= 1)."""
        base = min(self.initial_backoff * self.multiplier ** (failures - 1), self.max_backoff)
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)

    def gives_up_after(self, failures: int) -> bool:
        """True when ``failures`` consecutive failures exhaust the policy."""
        return self.max_attempts is not None and failures > self.max_attempts


DEFAULT_RETRY = RetryPolicy()
"""Retry forever: 0.1 s, 0.2 s, 0.4 s … up to 5 s between consecutive failed attempts."""


def server_retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The delay the server asked for in google.rpc.RetryInfo, in seconds, if it sent one."""
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            retry_info = error_details_pb2.RetryInfo()
            if detail.Unpack(retry_info):
                delay = retry_info.retry_delay
                return float(delay.seconds + delay.nanos / 1e9)
    return None


DEFAULT_MAX_BATCH_SIZE = 500
"""Snapshots per message the client asks for: the server batches whatever is ready together."""


def unbatched(message: pb.StreamSnapshotsResponse) -> list[pb.StreamSnapshotsResponse]:
    """``message`` as one message per snapshot (a ``snapshot_batch`` split, anything else as is).

    Each snapshot of a batch becomes a ``snapshot`` message with the update's own resume token,
    so a caller that stops in the middle of a batch can still resume exactly after the last
    snapshot it took."""
    if not message.HasField("snapshot_batch"):
        return [message]
    split: list[pb.StreamSnapshotsResponse] = []
    for update in message.snapshot_batch.updates:
        single = pb.StreamSnapshotsResponse(resume_token=update.resume_token)
        single.snapshot.CopyFrom(update)
        single.snapshot.ClearField("resume_token")
        split.append(single)
    return split


def unbatched_books(message: pb.StreamOrderBooksResponse) -> list[pb.StreamOrderBooksResponse]:
    """``message`` as one message per book or change (a ``batch`` split, anything else as is);
    the batch's resume token goes with its last update (the others carry none: with
    conflation, resuming after only some of an interval's books would skip changes)."""
    if not message.HasField("batch"):
        return [message]
    updates = message.batch.updates
    return [
        pb.StreamOrderBooksResponse(
            resume_token=message.resume_token if index == len(updates) - 1 else "",
            book=update.book if update.HasField("book") else None,
            change=update.change if update.HasField("change") else None,
            coalesced_count=update.coalesced_count,
        )
        for index, update in enumerate(updates)
    ]


StreamRequest = TypeVar(
    "StreamRequest",
    bound=pb.StreamSnapshotsRequest | pb.StreamTradesRequest | pb.StreamOrderBooksRequest,
)


def resumed_request(request: StreamRequest, resume_token: str) -> StreamRequest:
    """``request`` continuing after ``resume_token``.

    A snapshot or trade stream keeps its start time: with a token it no longer says where to
    start but still which rows to deliver (those at or after it), so the resumed stream leaves
    out what the first one left out. The latest-snapshot preamble is dropped (repeating it
    would deliver those snapshots twice), and so is an order-book stream's start time: its
    starting books are behind the token already.
    """
    resumed = copy.deepcopy(request)
    resumed.resume_token = resume_token
    if isinstance(resumed, pb.StreamOrderBooksRequest):
        resumed.ClearField("start_time")
    if isinstance(resumed, pb.StreamSnapshotsRequest):
        resumed.include_latest = False
    return resumed


def _open(
    stub: pb_grpc.MarketServiceAsyncStub,
    request: pb.StreamSnapshotsRequest | pb.StreamTradesRequest | pb.StreamOrderBooksRequest,
) -> (
    grpc.aio.UnaryStreamCall[pb.StreamSnapshotsRequest, pb.StreamSnapshotsResponse]
    | grpc.aio.UnaryStreamCall[pb.StreamTradesRequest, pb.StreamTradesResponse]
    | grpc.aio.UnaryStreamCall[pb.StreamOrderBooksRequest, pb.StreamOrderBooksResponse]
):
    """The call of the stream ``request`` asks for."""
    if isinstance(request, pb.StreamTradesRequest):
        return stub.StreamTrades(request)
    if isinstance(request, pb.StreamOrderBooksRequest):
        return stub.StreamOrderBooks(request)
    return stub.StreamSnapshots(request)


@overload
def resumable_stream(
    stub: pb_grpc.MarketServiceAsyncStub,
    request: pb.StreamSnapshotsRequest,
    *,
    retry: RetryPolicy = DEFAULT_RETRY,
    resume_on_gap: bool = True,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncGenerator[pb.StreamSnapshotsResponse, None]: ...


@overload
def resumable_stream(
    stub: pb_grpc.MarketServiceAsyncStub,
    request: pb.StreamTradesRequest,
    *,
    retry: RetryPolicy = DEFAULT_RETRY,
    resume_on_gap: bool = True,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncGenerator[pb.StreamTradesResponse, None]: ...


@overload
def resumable_stream(
    stub: pb_grpc.MarketServiceAsyncStub,
    request: pb.StreamOrderBooksRequest,
    *,
    retry: RetryPolicy = DEFAULT_RETRY,
    resume_on_gap: bool = True,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncGenerator[pb.StreamOrderBooksResponse, None]: ...


async def resumable_stream(
    stub: pb_grpc.MarketServiceAsyncStub,
    request: pb.StreamSnapshotsRequest | pb.StreamTradesRequest | pb.StreamOrderBooksRequest,
    *,
    retry: RetryPolicy = DEFAULT_RETRY,
    resume_on_gap: bool = True,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncGenerator[
    pb.StreamSnapshotsResponse | pb.StreamTradesResponse | pb.StreamOrderBooksResponse, None
]:
    """Yield the messages of StreamSnapshots(``request``) (StreamTrades for a trades request,
    StreamOrderBooks for an order-book one), reconnecting and resuming as needed.

    With ``resume_on_gap`` a subscriber-gap marker (the server dropped live snapshots because
    this subscriber fell behind) is not passed on: the stream is reopened from the marker's
    token, which replays the dropped snapshots from the database — no gap reaches the caller.
    Caught-up markers are passed on, so after a reconnection the caller sees another one once
    the replay of what it missed is over.
    """
    failures = 0
    while True:
        call = _open(stub, request)
        last_error: grpc.aio.AioRpcError | None = None
        fell_behind = False
        try:
            async for message in call:
                failures = 0
                if message.resume_token:
                    request = resumed_request(request, message.resume_token)
                if resume_on_gap and message.HasField("subscriber_gap"):
                    log.info(
                        "fell behind by %d messages; resuming to fill the gap",
                        message.subscriber_gap.dropped_count,
                    )
                    fell_behind = True
                    break
                if isinstance(message, pb.StreamTradesResponse):
                    yield message
                    continue
                if isinstance(message, pb.StreamOrderBooksResponse):
                    for book_message in unbatched_books(message):
                        yield book_message
                    continue
                for single in unbatched(message):
                    yield single
        except grpc.aio.AioRpcError as error:
            if error.code() not in retry.retryable_codes:
                raise
            log.info("stream interrupted (%s); resuming", error.code().name)
            last_error = error
        finally:
            # Also runs when the caller stops iterating: the server frees the subscription.
            call.cancel()
        if fell_behind:
            continue  # the server is healthy: resume at once
        # An error, or the server ended the stream (it does so only when shutting down).
        failures += 1
        if retry.gives_up_after(failures):
            if last_error is not None:
                raise last_error
            return
        delay = retry.backoff(failures)
        if last_error is not None:
            delay = max(delay, server_retry_delay(last_error) or 0.0)
        await sleep(delay)
