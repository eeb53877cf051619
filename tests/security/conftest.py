"""Fixtures of the security tests (defined in support.py, shared with tests/observability)."""

from tests.security.support import sqlite_url

__all__ = ["sqlite_url"]
