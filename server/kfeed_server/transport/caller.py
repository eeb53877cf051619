"""Who is calling the RPC being served, as the servicers see it.

The access-control interceptor (kfeed_server.security) sets it for every unary call it admits;
servicers read it to record who created something and to decide who may change it.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    """An admitted caller: its token's name ("anonymous" without authentication)."""

    name: str
    is_admin: bool


_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def set_current_caller(caller: Caller | None) -> None:
    """Make ``caller`` the caller for the rest of this task (one RPC)."""
    _caller.set(caller)


def current_caller() -> Caller | None:
    """The caller of the unary RPC being served (None outside one, and in streaming RPCs,
    which need no caller today: setting it there would cost every message)."""
    return _caller.get()
