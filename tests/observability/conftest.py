"""Fixtures shared with tests/security (defined in tests/security/support.py)."""

from tests.security.support import sqlite_url

__all__ = ["sqlite_url"]
