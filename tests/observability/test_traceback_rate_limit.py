"""The same failure prints its traceback once per window; its repeats still log their line."""

from __future__ import annotations

import logging

from kfeed_server.logs import JsonFormatter, TracebackRateLimit


class _Lines(logging.Handler):
    def __init__(self, limit: TracebackRateLimit) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.addFilter(limit)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _fail(kind: type[Exception], logger: logging.Logger, request: int) -> None:
    try:
        raise kind(f"request {request}")
    except Exception:
        logger.exception("call %d failed", request)


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"kfeed.test.tracebacks.{id(handler)}")
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    return logger


def test_repeats_within_the_window_lose_their_traceback_but_not_their_line() -> None:
    clock = _Clock()
    lines = _Lines(TracebackRateLimit(window=60, clock=clock))
    logger = _logger(lines)
    for request in range(100):
        _fail(ValueError, logger, request)
    assert len(lines.lines) == 100
    assert [i for i, line in enumerate(lines.lines) if "Traceback" in line] == [0]
    assert lines.lines[1].startswith("call 1 failed (ValueError: traceback shown at most every")
    # Another failure has its own traceback.
    _fail(KeyError, logger, 100)
    assert "Traceback" in lines.lines[-1]
    # After the window the traceback shows again, with the count it stood for.
    clock.now += 61
    _fail(ValueError, logger, 101)
    assert "Traceback" in lines.lines[-1]
    assert "(99 more since the last traceback)" in lines.lines[-1]


def test_records_without_exceptions_pass_untouched() -> None:
    lines = _Lines(TracebackRateLimit(window=60, clock=_Clock()))
    logger = _logger(lines)
    for _ in range(3):
        logger.warning("batch %d refused", 7)
    assert lines.lines == ["batch 7 refused"] * 3


def test_json_lines_keep_one_exception_field_per_window() -> None:
    lines = _Lines(TracebackRateLimit(window=60, clock=_Clock()))
    lines.setFormatter(JsonFormatter())
    logger = _logger(lines)
    for request in range(5):
        _fail(RuntimeError, logger, request)
    assert sum('"exception"' in line for line in lines.lines) == 1
