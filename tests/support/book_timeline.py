"""A market's true order book over time, and what a recorder that misses part of it publishes
(checkpoints of every kind, changes, LOST and RESYNC windows)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from google.rpc import code_pb2

from kfeed.v1 import ingest_service_pb2, types_pb2
from kfeed_ingest.kalshi.books import (
    LOST,
    PERIODIC,
    RESYNC,
    START,
    BookChange,
    change_columns,
    checkpoint,
    micros,
)
from tests.support.factories import at, make_market
from tests.support.servers import PublishSession

MARKET = make_market("KXBOOK-1")
Book = tuple[dict[int, int], dict[int, int]]
Ladder = tuple[list[tuple[int, int]], list[tuple[int, int]]]


def ladder(book: Book) -> Ladder:
    return sorted(book[0].items(), reverse=True), sorted(book[1].items(), reverse=True)


class Timeline:
    """A market's true book over time and what a recorder that misses part of it publishes."""

    def __init__(self, seed: int, steps: int, ticker: str = MARKET.ticker) -> None:
        rng = random.Random(seed)
        self.truth: list[tuple[datetime, Ladder]] = []
        self.records: list[BookChange | ingest_service_pb2.OrderBookCheckpoint] = []
        self.unknown: list[tuple[datetime, datetime]] = []  # [LOST, RESYNC) windows
        book: Book = ({}, {})
        now = at(0)
        self.records.append(checkpoint(ticker, START, now, now, 1, {}, {}))
        recording, lost_at, sequence, since_checkpoint = True, now, 1, 0
        for _ in range(steps):
            now += timedelta(milliseconds=rng.randint(1, 400))
            changed: list[BookChange] = []
            for _ in range(rng.randint(1, 4)):
                side = rng.randint(0, 1)
                price = rng.choice([5, 10, 4200, 4250, 4300, 9990, 9999 - rng.randint(0, 50)])
                size = rng.choice([0, 0, 1, 50, 12_345, rng.randint(1, 10**9)])
                if size:
                    book[side][price] = size
                else:
                    book[side].pop(price, None)
                sequence += 1
                side_proto = types_pb2.SIDE_YES if side == 0 else types_pb2.SIDE_NO
                micros_now = micros(now)
                changed.append(
                    BookChange(ticker, micros_now, micros_now, sequence, side_proto,
                               price, size)
                )  # fmt: skip
            self.truth.append((now, ladder(book)))
            if recording:
                if since_checkpoint >= 7:  # between instants, as the ingest does
                    previous = self.truth[-2][0] if len(self.truth) > 1 else now
                    self.records.append(
                        checkpoint(ticker, PERIODIC, previous, now, None, *self._at(previous))
                    )
                    since_checkpoint = 0
                self.records += changed
                since_checkpoint += len(changed)
                if rng.random() < 0.05:
                    recording, lost_at = False, now
                    self.records.append(checkpoint(ticker, LOST, now, now, None, book[0], book[1]))
            elif rng.random() < 0.3:
                resync = now + timedelta(microseconds=1)
                self.records.append(
                    checkpoint(ticker, RESYNC, resync, resync, sequence, book[0], book[1])
                )
                self.unknown.append((lost_at, resync))
                recording, since_checkpoint = True, 0
        if not recording:
            self.unknown.append((lost_at, datetime.max.replace(tzinfo=lost_at.tzinfo)))

    def _at(self, moment: datetime) -> Book:
        for when, (yes, no) in reversed(self.truth):
            if when <= moment:
                return dict(yes), dict(no)
        return {}, {}

    def book_at(self, moment: datetime) -> Ladder:
        yes, no = self._at(moment)
        return ladder((yes, no))

    def in_gap(self, moment: datetime) -> bool:
        return any(start <= moment < end for start, end in self.unknown)


def request_of(
    records: list[BookChange | ingest_service_pb2.OrderBookCheckpoint], batch_id: int
) -> ingest_service_pb2.PublishRequest:
    changes = [r for r in records if isinstance(r, BookChange)]
    request = ingest_service_pb2.PublishRequest(
        batch_id=batch_id,
        producer="tests",
        book_checkpoints=[r for r in records if not isinstance(r, BookChange)],
    )
    if changes:
        request.book_changes.CopyFrom(change_columns(changes))
    return request


async def publish_timeline(publisher: PublishSession, timeline: Timeline, per_batch: int) -> int:
    await publisher.publish(markets=[MARKET])
    stored = 0
    for start in range(0, len(timeline.records), per_batch):
        ack = await publisher.send(request_of(timeline.records[start : start + per_batch], 0))
        assert ack.code == code_pb2.OK, ack
        stored += ack.book_changes_stored
    return stored
