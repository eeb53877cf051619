"""Logging set-up: one line per record, JSON or text, carrying the request id of the RPC.

Tracebacks are rate-limited: the same failure (exception type and the line that raised it)
prints its traceback once per window; repeats within the window log their line without it and
the next traceback says how many were shortened. A flood of identical failures (a fuzzer, a
broken dependency) then costs a line per request, not a screen.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

LogFormat = Literal["json", "text"]


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


TRACEBACK_WINDOW_SECONDS = 60.0
# Distinct failures remembered; beyond it the oldest are forgotten (and print again).
_MAX_TRACKED_FAILURES = 1024


class TracebackRateLimit(logging.Filter):
    """Keeps one traceback per failure per ``window`` seconds; repeats lose their traceback
    (the record still logs, with its request id) and say so."""

    def __init__(
        self,
        window: float = TRACEBACK_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._window = window
        self._clock = clock
        # failure -> (when its traceback was last printed, repeats shortened since)
        self._seen: dict[tuple[str, str, int], tuple[float, int]] = {}

    @staticmethod
    def _failure(record: logging.LogRecord) -> tuple[str, str, int] | None:
        if not record.exc_info or record.exc_info[1] is None:
            return None
        error = record.exc_info[1]
        frames = traceback.extract_tb(error.__traceback__)
        where = frames[-1] if frames else None
        return (
            type(error).__qualname__,
            where.filename if where else "",
            (where.lineno or 0) if where else 0,
        )

    def filter(self, record: logging.LogRecord) -> bool:
        failure = self._failure(record)
        if failure is None:
            return True
        now = self._clock()
        printed, shortened = self._seen.get(failure, (None, 0))
        if printed is not None and now - printed < self._window:
            self._seen[failure] = (printed, shortened + 1)
            record.exc_info = None
            record.exc_text = None
            record.msg = f"{record.msg} ({failure[0]}: traceback shown at most every " + (
                f"{self._window:g} s)"
            )
            return True
        if shortened:
            record.msg = f"{record.msg} ({shortened} more since the last traceback)"
        self._seen.pop(failure, None)
        self._seen[failure] = (now, 0)
        if len(self._seen) > _MAX_TRACKED_FAILURES:
            del self._seen[next(iter(self._seen))]
        return True


class JsonFormatter(logging.Formatter):
    """Structured logs for machines: time, level, logger, message, request id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            entry["request_id"] = request_id
        # Structured fields passed as logging's extra={"fields": {...}} (e.g. the access log).
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """Configure the root logger once for a kfeed process."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.addFilter(TracebackRateLimit())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
