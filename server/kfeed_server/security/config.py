"""The server's security settings, and what they build: interceptors and the listening port."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from kfeed_server.security.interceptor import AuthInterceptor
from kfeed_server.security.rate_limit import RateLimiter
from kfeed_server.security.tls import TlsFiles
from kfeed_server.security.tokens import TokenTable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """Authentication (a tokens file), TLS (certificate files) and the per-token rate limit.

    Everything is off by default, which is only allowed on loopback.
    """

    auth_tokens_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # When set, clients must present a certificate signed by this CA (mutual TLS).
    tls_client_ca_file: Path | None = None
    # Calls per second per token (None: unlimited), and the burst allowed above that rate.
    rate_limit: float | None = None
    rate_limit_burst: int | None = None
    # A file holding the key that authenticates page and resume tokens (at least 16 bytes);
    # None: a key kept in the database, shared by every replica
    # (docs/adr/0012-request-tokens-and-hostile-input.md).
    token_key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("--tls-cert-file and --tls-key-file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("--tls-client-ca-file (mTLS) needs --tls-cert-file and --tls-key-file")

    @property
    def authenticates(self) -> bool:
        """True when callers must present a token (required beyond loopback)."""
        return self.auth_tokens_file is not None

    @property
    def tls(self) -> TlsFiles | None:
        """The TLS files, when TLS is configured."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        return TlsFiles(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)

    def token_key(self) -> bytes | None:
        """The configured token key (None: use the database's)."""
        if self.token_key_file is None:
            return None
        key = self.token_key_file.read_bytes().strip()
        if len(key) < 16:
            raise ValueError(f"{self.token_key_file}: a token key needs at least 16 bytes")
        return key

    def interceptor(self) -> AuthInterceptor:
        """The access-control interceptor (the tokens file is read here, once)."""
        tokens = TokenTable.from_file(self.auth_tokens_file) if self.auth_tokens_file else None
        if tokens is not None:
            log.info("authentication on: %d tokens from %s", len(tokens), self.auth_tokens_file)
        limiter = RateLimiter(self.rate_limit, self.rate_limit_burst) if self.rate_limit else None
        return AuthInterceptor(tokens, limiter)

    def add_port(self, server: grpc.aio.Server, listen: str) -> int:
        """Listen on ``listen`` with TLS when configured; the bound port (0 on failure)."""
        tls = self.tls
        if tls is None:
            return server.add_insecure_port(listen)
        return server.add_secure_port(listen, tls.server_credentials())
