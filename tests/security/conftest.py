"""Fixtures of the security tests (defined in support.py, shared with tests/observability)."""

from tests.security.support import json_log_lines, sqlite_url

__all__ = ["json_log_lines", "sqlite_url"]
