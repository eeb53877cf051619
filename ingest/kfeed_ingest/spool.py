"""An on-disk journal of batches the server has not acknowledged yet.

One append-only file, ``journal.log``, holds framed records::

    record  = length:u32be  crc32:u32be  payload[length]      (crc32 over payload)
    payload = b"B" + serialized PublishRequest                 a batch to deliver
            | b"A" + batch_id:u64be                             that batch was acked
            | b"N" + next_batch_id:u64be                        numbering high-water mark
            | b"R" + batch_id:u64be + serialized PublishRequest rows of a batch being collected

A batch is fsynced before it may be sent, so a crash between append and ack loses nothing: on
start every batch without an ack record is pending again, in append order. Ack records are only
flushed, not fsynced: losing one merely resends a batch, which the server stores once.

Rows are recorded (``R``) as they are read, while their batch is still being collected (the
ingest writes the rows of one event-loop turn as one record): written to the operating system at
once (no fsync), so killing the process loses none of them.
The batch's ``B`` record supersedes its ``R`` records; on start, ``R`` records without their
``B`` are merged into that batch, which is then pending like any other.

On open the journal is read front to back; the first record that is short or fails its checksum
marks a torn write, and the file is truncated there. Compaction rewrites the pending batches into a
fresh file and atomically renames it over the journal.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from kfeed.v1 import ingest_service_pb2

logger = logging.getLogger(__name__)

JOURNAL_NAME = "journal.log"
_HEADER = struct.Struct(">II")
_BATCH_ID = struct.Struct(">Q")
_BATCH, _ACK, _NEXT_ID, _ROWS = b"B", b"A", b"N", b"R"
# A frame longer than this is not something we wrote: treat it as corruption, not a huge read.
_MAX_RECORD = 256 * 1024 * 1024


def _frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _read_records(handle: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(end offset, payload) of each intact record; stops at the first torn or corrupt one."""
    offset = 0
    while True:
        header = handle.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        length, checksum = _HEADER.unpack(header)
        if length == 0 or length > _MAX_RECORD:
            return
        payload = handle.read(length)
        if len(payload) < length or zlib.crc32(payload) != checksum:
            return
        offset += _HEADER.size + length
        yield offset, payload


class Spool:
    """Batches appended before sending and forgotten once acked; thread-safe.

    Use :meth:`open`. ``pending()`` lists the unacked batches in the order they were appended.
    """

    def __init__(self, directory: Path, compact_after_bytes: int) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_NAME
        self._compact_after_bytes = compact_after_bytes
        self._lock = threading.Lock()
        self._pending: OrderedDict[int, ingest_service_pb2.PublishRequest] = OrderedDict()
        # Rows recorded for batches being collected (no B record yet): their serialized
        # PublishRequests by batch id.
        self._collecting: OrderedDict[int, list[bytes]] = OrderedDict()
        self._next_batch_id = 1
        self._handle: BinaryIO | None = None
        self._size = 0
        self.truncated_bytes = 0
        """How many bytes of torn tail :meth:`open` cut off (0 for a clean journal)."""

    @classmethod
    def open(cls, directory: Path | str, *, compact_after_bytes: int = 64 * 1024 * 1024) -> Spool:
        """Open (creating if needed) the spool in ``directory`` and recover its pending batches."""
        spool = cls(Path(directory), compact_after_bytes)
        spool.directory.mkdir(parents=True, exist_ok=True)
        spool._recover()
        return spool

    def _recover(self) -> None:
        self.path.touch(exist_ok=True)
        good_end = 0
        with self.path.open("rb") as handle:
            for record_end, payload in _read_records(handle):
                self._apply(payload)
                good_end = record_end
        total = self.path.stat().st_size
        if total > good_end:
            self.truncated_bytes = total - good_end
            logger.warning(
                "spool %s: discarding %d bytes of torn or corrupt tail", self.path, total - good_end
            )
            with self.path.open("r+b") as handle:
                handle.truncate(good_end)
                os.fsync(handle.fileno())
        self._size = good_end
        self._handle = self.path.open("ab")
        collected, self._collecting = self._collecting, OrderedDict()
        for batch_id, parts in collected.items():
            # The process stopped while collecting this batch: it is complete now.
            request = ingest_service_pb2.PublishRequest()
            for part in parts:
                request.MergeFromString(part)
            request.batch_id = batch_id
            self._write(_BATCH + request.SerializeToString(), durable=True)
            self._pending[batch_id] = request
        if collected:
            logger.info("spool %s: %d batches being collected recovered", self.path, len(collected))
        if self._pending:
            logger.info("spool %s: %d unacked batches to resend", self.path, len(self._pending))

    def _apply(self, payload: bytes) -> None:
        kind, body = payload[:1], payload[1:]
        if kind == _BATCH:
            request = ingest_service_pb2.PublishRequest.FromString(body)
            self._pending[request.batch_id] = request
            self._collecting.pop(request.batch_id, None)
            self._next_batch_id = max(self._next_batch_id, request.batch_id + 1)
        elif kind == _ROWS:
            batch_id = _BATCH_ID.unpack(body[: _BATCH_ID.size])[0]
            if batch_id not in self._pending:
                self._collecting.setdefault(batch_id, []).append(body[_BATCH_ID.size :])
            self._next_batch_id = max(self._next_batch_id, batch_id + 1)
        elif kind == _ACK:
            self._pending.pop(_BATCH_ID.unpack(body)[0], None)
        elif kind == _NEXT_ID:
            self._next_batch_id = max(self._next_batch_id, _BATCH_ID.unpack(body)[0])
        else:
            logger.warning("spool %s: skipping a record of unknown kind %r", self.path, kind)

    def _write(self, payload: bytes, *, durable: bool) -> None:
        assert self._handle is not None, "spool is closed"
        frame = _frame(payload)
        self._handle.write(frame)
        self._handle.flush()
        if durable:
            os.fsync(self._handle.fileno())
        self._size += len(frame)

    @property
    def next_batch_id(self) -> int:
        """The id the next appended batch will get (ids never repeat, even across compaction)."""
        return self._next_batch_id

    def reserve_batch_id(self) -> int:
        """A new batch id, for a batch whose rows are recorded while it is being collected."""
        with self._lock:
            batch_id = self._next_batch_id
            self._next_batch_id += 1
            return batch_id

    def record_rows(self, batch_id: int, rows: ingest_service_pb2.PublishRequest) -> None:
        """Record rows of the batch ``batch_id`` (reserved) before it is complete: written to the
        operating system at once, so they outlive the process; not fsynced."""
        payload = rows.SerializeToString()
        with self._lock:
            self._write(_ROWS + _BATCH_ID.pack(batch_id) + payload, durable=False)
            self._collecting.setdefault(batch_id, []).append(payload)

    def append(
        self, request: ingest_service_pb2.PublishRequest
    ) -> ingest_service_pb2.PublishRequest:
        """Number ``request`` (keeping a reserved ``batch_id``), write it durably (fsync) and
        return the numbered copy. It supersedes the rows recorded for its id."""
        with self._lock:
            numbered = ingest_service_pb2.PublishRequest()
            numbered.CopyFrom(request)
            if not numbered.batch_id:
                numbered.batch_id = self._next_batch_id
                self._next_batch_id += 1
            self._write(_BATCH + numbered.SerializeToString(), durable=False)
            self._collecting.pop(numbered.batch_id, None)
            self._pending[numbered.batch_id] = numbered
            assert self._handle is not None
            # fsync outside the lock, so rows recorded meanwhile do not wait for the disk. A
            # compaction meanwhile fsyncs its own copy of the batch.
            descriptor = os.dup(self._handle.fileno())
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        return numbered

    def mark_acked(self, batch_id: int) -> None:
        """Forget batch ``batch_id`` (acked, or refused for good); compacts when worthwhile."""
        with self._lock:
            if self._pending.pop(batch_id, None) is None:
                return
            self._write(_ACK + _BATCH_ID.pack(batch_id), durable=False)
            if self._size >= self._compact_after_bytes:
                self._compact_locked()

    def pending(self) -> list[ingest_service_pb2.PublishRequest]:
        """The unacked batches, oldest first."""
        with self._lock:
            return list(self._pending.values())

    def __len__(self) -> int:
        return len(self._pending)

    def compact(self) -> None:
        """Rewrite the journal with only the pending batches (atomic rename, fsynced)."""
        with self._lock:
            self._compact_locked()

    def _compact_locked(self) -> None:
        assert self._handle is not None, "spool is closed"
        temporary = self.path.with_suffix(".compacting")
        with temporary.open("wb") as handle:
            handle.write(_frame(_NEXT_ID + _BATCH_ID.pack(self._next_batch_id)))
            for request in self._pending.values():
                handle.write(_frame(_BATCH + request.SerializeToString()))
            for batch_id, parts in self._collecting.items():
                for part in parts:
                    handle.write(_frame(_ROWS + _BATCH_ID.pack(batch_id) + part))
            handle.flush()
            os.fsync(handle.fileno())
        self._handle.close()
        os.replace(temporary, self.path)
        self._fsync_directory()
        self._handle = self.path.open("ab")
        self._size = self.path.stat().st_size

    def _fsync_directory(self) -> None:
        descriptor = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def close(self) -> None:
        """Flush and close the journal (pending batches stay on disk)."""
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
