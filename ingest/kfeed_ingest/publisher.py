"""The ``IngestService.Publish`` client: spooled, numbered, windowed, acked batches.

Every batch is appended to the :class:`~kfeed_ingest.spool.Spool` (fsynced, numbered) before it
is sent. At most ``window`` batches are in flight on the stream; an ack (matched by ``batch_id``)
frees a slot and removes the batch from the spool. Rows the server refused (listed in the ack)
and batches it refused whole can never succeed: they go to the dead-letter file with the reason
(:mod:`kfeed_ingest.dead_letters`) and are not resent, so the spool never blocks on data. A
transport failure keeps every unacked batch spooled; the publisher reconnects with backoff and
resends them all, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from kfeed.v1 import ingest_service_pb2, ingest_service_pb2_grpc
from kfeed_ingest.backoff import Backoff
from kfeed_ingest.dead_letters import DeadLetterFile, dead_letters
from kfeed_ingest.spool import Spool

logger = logging.getLogger(__name__)

__all__ = ["Backoff", "PublishStats", "Publisher"]

PublishRequest = ingest_service_pb2.PublishRequest
PublishResponse = ingest_service_pb2.PublishResponse
_OK = 0


@dataclass(slots=True)
class PublishStats:
    """Counters since start."""

    acked: int = 0
    rejected: int = 0
    # Rows the server refused in batches it otherwise stored (kept in the dead-letter file).
    refused_rows: int = 0
    snapshots_stored: int = 0
    trades_stored: int = 0
    connections: int = 0
    # Streams that ended in an error (the server down, say); their batches stay spooled.
    failed_streams: int = 0


class _Connection:
    """One Publish stream: the batches to send on it, in order, and those in flight."""

    def __init__(self, window: int) -> None:
        self.to_send: asyncio.Queue[int] = asyncio.Queue()
        self.in_flight: set[int] = set()
        self.slots = asyncio.Semaphore(window)


class Publisher:
    """Delivers batches to ``kfeed serve`` at least once, in order, surviving restarts.

    Use ``async with Publisher(...)`` or :meth:`start`/:meth:`close`; :meth:`publish` a batch's
    content; :meth:`flush` waits until the server has acknowledged everything.
    """

    def __init__(
        self,
        target: str,
        spool: Spool,
        *,
        producer: str,
        window: int = 16,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        backoff: Backoff | None = None,
        max_pending: int = 100_000,
        dead_letters: DeadLetterFile | None = None,
    ) -> None:
        self.target = target
        self.producer = producer
        self.stats = PublishStats()
        self._spool = spool
        self._dead_letters = dead_letters
        self._window = window
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        # TLS when set (grpc.ssl_channel_credentials); plaintext otherwise.
        self._credentials = credentials
        self._backoff = backoff or Backoff()
        self._unacked: OrderedDict[int, PublishRequest] = OrderedDict(
            (request.batch_id, request) for request in spool.pending()
        )
        self._room = asyncio.Condition()
        self._max_pending = max_pending
        self._drained = asyncio.Event()
        self._connection: _Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._update_drained()

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect in the background; spooled batches from an earlier run are resent first."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"publisher:{self.target}")

    async def close(self) -> None:
        """Stop sending. Unacked batches stay in the spool for the next run."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def spool(self) -> Spool:
        """The journal batches are spooled to (a batch's rows may be recorded there early)."""
        return self._spool

    @property
    def pending(self) -> int:
        """Batches spooled and not yet acked."""
        return len(self._unacked)

    async def publish(self, request: PublishRequest) -> int:
        """Spool ``request`` (its ``batch_id`` and ``producer`` are set here) and queue it.

        Returns the batch id. Waits only when ``max_pending`` batches are already unacked.
        """
        async with self._room:
            await self._room.wait_for(lambda: len(self._unacked) < self._max_pending)
        request.producer = self.producer
        numbered = await asyncio.to_thread(self._spool.append, request)
        self._unacked[numbered.batch_id] = numbered
        self._drained.clear()
        if self._connection is not None:
            self._connection.to_send.put_nowait(numbered.batch_id)
        return numbered.batch_id

    async def flush(self) -> None:
        """Wait until every published batch is acked or refused (wrap in ``asyncio.timeout``)."""
        await self._drained.wait()

    def _update_drained(self) -> None:
        if not self._unacked:
            self._drained.set()

    async def _run(self) -> None:
        failures = 0
        while True:
            connection = _Connection(self._window)
            for batch_id in self._unacked:
                connection.to_send.put_nowait(batch_id)
            self._connection = connection
            try:
                acked_any = await self._stream(connection)
                logger.info("Publish stream to %s ended by the server; reconnecting", self.target)
            except grpc.aio.AioRpcError as exc:
                acked_any = False
                self.stats.failed_streams += 1
                logger.warning(
                    "Publish stream to %s failed (%s: %s); %d batches stay spooled",
                    self.target,
                    exc.code().name,
                    exc.details(),
                    len(self._unacked),
                )
            except Exception:
                # Whatever broke this stream, the batches are safe in the spool: keep going.
                acked_any = False
                self.stats.failed_streams += 1
                logger.exception("Publish stream to %s broke; reconnecting", self.target)
            finally:
                self._connection = None
            failures = 1 if acked_any else failures + 1
            await asyncio.sleep(self._backoff.delay(failures))

    async def _stream(self, connection: _Connection) -> bool:
        """Run one stream until it ends; True when at least one ack arrived on it."""
        channel = (
            grpc.aio.secure_channel(self.target, self._credentials)
            if self._credentials is not None
            else grpc.aio.insecure_channel(self.target)
        )
        async with channel:
            stub = ingest_service_pb2_grpc.IngestServiceStub(channel)
            call = stub.Publish(metadata=self._metadata)
            self.stats.connections += 1
            receiver = asyncio.create_task(self._receive(call, connection))
            sender = asyncio.create_task(self._send(call, connection))
            try:
                done, _ = await asyncio.wait(
                    {receiver, sender}, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for task in (receiver, sender):
                    task.cancel()
                await asyncio.gather(receiver, sender, return_exceptions=True)
                call.cancel()
            if sender in done:
                sender.result()  # the sender only stops by raising: re-raise its failure
            return receiver.result()

    async def _receive(
        self,
        call: grpc.aio.StreamStreamCall[PublishRequest, PublishResponse],
        connection: _Connection,
    ) -> bool:
        acked_any = False
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return acked_any
            assert isinstance(response, PublishResponse)
            acked_any = True
            await self._on_ack(response, connection)

    async def _send(
        self,
        call: grpc.aio.StreamStreamCall[PublishRequest, PublishResponse],
        connection: _Connection,
    ) -> None:
        while True:
            batch_id = await connection.to_send.get()
            request = self._unacked.get(batch_id)
            if request is None:
                continue  # acked on an earlier stream after being queued here
            await connection.slots.acquire()
            connection.in_flight.add(batch_id)
            await call.write(request)

    async def _on_ack(self, response: PublishResponse, connection: _Connection) -> None:
        batch_id = response.batch_id
        if batch_id in connection.in_flight:
            connection.in_flight.discard(batch_id)
            connection.slots.release()
        request = self._unacked.pop(batch_id, None)
        if request is None:
            logger.warning("ack for batch %d, which is not pending; ignored", batch_id)
            return
        if response.code == _OK:
            self.stats.acked += 1
            self.stats.snapshots_stored += response.snapshots_stored
            self.stats.trades_stored += response.trades_stored
            if response.refused_rows:
                self.stats.refused_rows += len(response.refused_rows)
                first = response.refused_rows[0]
                logger.warning(
                    "server refused %d rows of batch %d (first: %s[%d]%s); %s",
                    len(response.refused_rows),
                    batch_id,
                    first.field,
                    first.index,
                    _describe_violations(first.field_violations),
                    self._dead_letter_note,
                )
        else:
            self.stats.rejected += 1
            logger.error(
                "server refused batch %d (code %d: %s)%s; dropped, it cannot succeed; %s",
                batch_id,
                response.code,
                response.message,
                _describe_violations(response.field_violations),
                self._dead_letter_note,
            )
        if self._dead_letters is not None and (response.code != _OK or response.refused_rows):
            await asyncio.to_thread(self._keep_dead_letters, request, response)
        await asyncio.to_thread(self._spool.mark_acked, batch_id)
        self._update_drained()
        async with self._room:
            self._room.notify_all()

    @property
    def _dead_letter_note(self) -> str:
        if self._dead_letters is None:
            return "not kept (no dead-letter file)"
        return f"kept in {self._dead_letters.path}"

    def _keep_dead_letters(self, request: PublishRequest, response: PublishResponse) -> None:
        assert self._dead_letters is not None
        try:
            self._dead_letters.append(dead_letters(request, response))
        except OSError:
            # A full disk must not stop the feed: the log line above still names the refusal.
            logger.exception("cannot write the dead-letter file %s", self._dead_letters.path)


def _describe_violations(violations: Sequence[ingest_service_pb2.FieldViolation]) -> str:
    if not violations:
        return ""
    return " — " + "; ".join(f"{v.field}: {v.description}" for v in violations)
