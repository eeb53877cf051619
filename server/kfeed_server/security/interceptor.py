"""The access-control interceptor: bearer token -> caller -> role check -> rate limit.

A refused call never reaches its servicer: its handler is replaced by one that raises the
refusal, which :class:`~kfeed_server.transport.interceptors.ErrorMappingInterceptor` turns into
the status (with the request id) like any other API error. Messages name the caller, never the
token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from kfeed_server.security.policy import allowed_roles
from kfeed_server.security.rate_limit import RateLimited, RateLimiter
from kfeed_server.security.tokens import ANONYMOUS, Principal, Role, TokenTable
from kfeed_server.transport.caller import Caller, set_current_caller
from kfeed_server.transport.errors import ApiError, PermissionDenied
from kfeed_server.transport.handlers import (
    Behavior,
    BehaviorInterceptor,
    BehaviorTransform,
    RpcType,
)

AUTHORIZATION_KEY = "authorization"
_BEARER_PREFIX = "bearer "

Metadata = Sequence[tuple[str, str | bytes]]


class Unauthenticated(ApiError):
    """No valid bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


def bearer_token(metadata: Metadata | None) -> str | None:
    """The token of the first ``authorization: Bearer <token>`` entry, if any."""
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY and isinstance(value, str):
            if value[: len(_BEARER_PREFIX)].lower() == _BEARER_PREFIX:
                return value[len(_BEARER_PREFIX) :].strip() or None
            return None
    return None


class AuthInterceptor(BehaviorInterceptor):
    """Authenticates, authorises and rate-limits each call before it reaches its servicer.

    With ``tokens`` None authentication is off and every caller is :data:`ANONYMOUS` (the server
    only allows that on loopback); a ``rate_limiter`` then limits all callers together.
    """

    def __init__(self, tokens: TokenTable | None, rate_limiter: RateLimiter | None = None):
        self._tokens = tokens
        self._rate_limiter = rate_limiter

    def admit(self, method: str, metadata: Metadata | None) -> Principal | None:
        """The caller of ``method`` (None for open methods); raises the refusal otherwise."""
        roles = allowed_roles(method)
        if roles is None:
            return None
        principal = self._authenticate(metadata)
        if not any(principal.has_role(role) for role in roles):
            needed = " or ".join(repr(role.value) for role in sorted(roles))
            raise PermissionDenied(f"{principal.name!r} lacks the {needed} role for {method}")
        if self._rate_limiter is not None:
            retry_after = self._rate_limiter.acquire(principal.name)
            if retry_after > 0:
                raise RateLimited(principal.name, retry_after)
        return principal

    def _authenticate(self, metadata: Metadata | None) -> Principal:
        if self._tokens is None:
            return ANONYMOUS
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        principal = self._tokens.authenticate(token)
        if principal is None:
            raise Unauthenticated("invalid bearer token")
        return principal

    def transform_for(self, details: grpc.HandlerCallDetails) -> BehaviorTransform | None:
        try:
            principal = self.admit(details.method, details.invocation_metadata)
        except ApiError as refusal:
            return _refusing(refusal)
        return None if principal is None else _as_caller(principal)


def as_caller(principal: Principal) -> Caller:
    """The transport's view of ``principal``: its name, and whether it is an admin."""
    return Caller(principal.name, principal.has_role(Role.ADMIN))


def _as_caller(principal: Principal) -> BehaviorTransform:
    """Unary behaviours run with ``current_caller()`` returning ``principal``."""
    caller = as_caller(principal)

    def transform(behavior: Behavior, kind: RpcType) -> Behavior:
        if kind != "unary":
            return behavior

        async def unary(request: Any, context: Any) -> Any:
            # Each RPC runs in its own task: the value is scoped to this call.
            set_current_caller(caller)
            return await behavior(request, context)

        return unary

    return transform


def _refusing(refusal: ApiError) -> BehaviorTransform:
    def transform(behavior: Behavior, kind: RpcType) -> Behavior:
        async def refuse(request: Any, context: Any) -> None:
            raise refusal

        return refuse

    return transform
