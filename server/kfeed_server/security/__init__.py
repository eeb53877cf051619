"""Who may call kfeed: bearer tokens with roles, TLS (optionally mutual), per-token rate limits."""

from kfeed_server.security.config import SecurityConfig
from kfeed_server.security.interceptor import (
    AuthInterceptor,
    Unauthenticated,
    as_caller,
)
from kfeed_server.security.rate_limit import RateLimited, RateLimiter
from kfeed_server.security.tls import TlsFiles
from kfeed_server.security.tokens import Principal, Role, TokensFileError, TokenTable
from kfeed_server.transport.errors import PermissionDenied

__all__ = [
    "AuthInterceptor",
    "PermissionDenied",
    "Principal",
    "RateLimited",
    "RateLimiter",
    "Role",
    "SecurityConfig",
    "TlsFiles",
    "TokenTable",
    "TokensFileError",
    "Unauthenticated",
    "as_caller",
]
