"""Fixtures of the web listener tests (a SQLite database where the engine does not matter)."""

from tests.security.support import sqlite_url

__all__ = ["sqlite_url"]
