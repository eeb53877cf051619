"""Fixtures shared with tests/security (defined in tests/security/support.py)."""

from tests.security.support import json_log_lines, sqlite_url

__all__ = ["json_log_lines", "sqlite_url"]
