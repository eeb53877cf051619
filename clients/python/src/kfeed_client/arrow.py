"""Bulk export as Apache Arrow: ExportSnapshots / ExportTrades into ``pyarrow`` tables.

Needs pyarrow, an optional extra (``pip install 'kfeed-client[arrow]'``): everything else in the
client works without it. The server streams the Arrow IPC schema once, then encapsulated IPC
record batches; each message decodes on its own, zero-copy, into a ``pyarrow.RecordBatch``.
Prices are int64 in 1/10,000 USD, counts int64 in 1/100 contract, times ``timestamp[us, UTC]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from google.protobuf import timestamp_pb2

from kfeed.v1 import market_service_pb2

if TYPE_CHECKING:
    import pyarrow as pa

# Called with the number of rows just received (for a progress bar).
ProgressCallback = Callable[[int], None]


def require_pyarrow() -> None:
    """ImportError saying how to install pyarrow when it is missing."""
    try:
        import pyarrow.ipc  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "Arrow export needs pyarrow: pip install 'kfeed-client[arrow]'"
        ) from error


class ExportMessage(Protocol):
    """What every Export*Response has."""

    @property
    def arrow_schema(self) -> bytes: ...
    @property
    def arrow_record_batch(self) -> bytes: ...
    @property
    def row_count(self) -> int: ...


R = TypeVar(
    "R",
    market_service_pb2.ExportSnapshotsRequest,
    market_service_pb2.ExportTradesRequest,
    market_service_pb2.ExportOrderBookChangesRequest,
)


def export_request(
    request_type: type[R],
    tickers: Iterable[str],
    event_ticker: str | None,
    series_ticker: str | None,
    start: datetime | None,
    end: datetime | None,
) -> R:
    """An Export*Request with the shared filters."""
    request = request_type(
        tickers=list(tickers), event_ticker=event_ticker or "", series_ticker=series_ticker or ""
    )
    for name, value in (("start_time", start), ("end_time", end)):
        if value is not None:
            if value.tzinfo is None or value.utcoffset() is None:
                raise ValueError(f"{name} must be timezone-aware, got {value!r}")
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(value)
            getattr(request, name).CopyFrom(stamp)
    return request


async def record_batches(
    messages: AsyncIterable[ExportMessage], on_rows: ProgressCallback | None = None
) -> AsyncIterator[pa.RecordBatch]:
    """The record batches of an export stream (the first is the schema's, empty)."""
    require_pyarrow()
    import pyarrow as pa
    import pyarrow.ipc

    schema: pa.Schema | None = None
    async for message in messages:
        if message.arrow_schema:
            schema = pa.ipc.read_schema(pa.py_buffer(message.arrow_schema))
            yield pa.RecordBatch.from_pylist([], schema=schema)
        if message.arrow_record_batch:
            if schema is None:
                raise ValueError("the export stream sent a record batch before its schema")
            yield pa.ipc.read_record_batch(pa.py_buffer(message.arrow_record_batch), schema)
            if on_rows is not None:
                on_rows(message.row_count)


async def read_table(batches: AsyncIterator[pa.RecordBatch]) -> pa.Table:
    """The batches of :func:`record_batches` as one ``pyarrow.Table`` (chunked as received,
    not copied)."""
    require_pyarrow()
    import pyarrow as pa

    received = [batch async for batch in batches]
    if not received:
        raise ValueError("the export stream ended before its schema")
    return pa.Table.from_batches(received, schema=received[0].schema)


FILE_FORMATS = ("parquet", "csv", "arrow")


def file_format(path: Path, requested: str | None) -> str:
    """The format to write: ``requested``, else the file's suffix (.parquet, .csv, .arrow /
    .feather / .ipc), else Parquet."""
    if requested:
        if requested not in FILE_FORMATS:
            raise ValueError(f"unknown format {requested!r}; one of {', '.join(FILE_FORMATS)}")
        return requested
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("arrow", "feather", "ipc"):
        return "arrow"
    return suffix if suffix in FILE_FORMATS else "parquet"


class _BatchWriter(Protocol):
    def write_batch(self, batch: pa.RecordBatch) -> None: ...
    def close(self) -> None: ...


def _open_writer(path: Path, schema: pa.Schema, file_type: str) -> _BatchWriter:
    import pyarrow.csv
    import pyarrow.ipc
    import pyarrow.parquet

    if file_type == "parquet":
        return pyarrow.parquet.ParquetWriter(path, schema)
    if file_type == "csv":
        return pyarrow.csv.CSVWriter(path, schema)
    return pyarrow.ipc.new_file(str(path), schema)


async def write_file(batches: AsyncIterator[pa.RecordBatch], path: Path, file_type: str) -> int:
    """Writes an export's batches to ``path`` as Parquet, CSV (times in ISO-8601, prices and
    counts as their integers) or an Arrow IPC file, as they arrive; returns the rows written.
    The file appears only when complete (written beside it, then renamed)."""
    require_pyarrow()
    partial = path.with_name(f".{path.name}.partial")
    rows = 0
    writer: _BatchWriter | None = None
    try:
        async for batch in batches:
            if writer is None:
                writer = _open_writer(partial, batch.schema, file_type)
            if batch.num_rows:
                writer.write_batch(batch)
                rows += batch.num_rows
        if writer is None:
            raise ValueError("the export stream ended before its schema")
        writer.close()
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return rows
