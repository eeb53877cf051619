"""The server's security settings, and what they build: interceptors and the listening port."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Self

import grpc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kfeed_server.security.interceptor import AuthInterceptor
from kfeed_server.security.rate_limit import RateLimiter
from kfeed_server.security.tls import TlsFiles
from kfeed_server.security.tokens import TokenTable

log = logging.getLogger(__name__)


class SecurityFlags(BaseModel):
    """Authentication (a tokens file), TLS (certificate files) and the per-token rate limit: the
    `kfeed serve` flags (ServeCommand inherits them) and the fields of :class:`SecurityConfig`.

    Everything is off by default, which is only allowed on loopback.
    """

    auth_tokens_file: Path | None = Field(
        default=None, description="TOML file of bearer tokens and their roles (turns auth on)"
    )
    tls_cert_file: Path | None = Field(
        default=None, description="PEM server certificate (turns TLS on; with --tls-key-file)"
    )
    tls_key_file: Path | None = Field(default=None, description="PEM key of --tls-cert-file")
    tls_client_ca_file: Path | None = Field(
        default=None, description="PEM CA that client certificates must chain to (mutual TLS)"
    )
    rate_limit: float | None = Field(
        default=None, description="calls per second per token (unset: unlimited)"
    )
    rate_limit_burst: int | None = Field(
        default=None, description="calls a token may make at once above --rate-limit"
    )
    token_key_file: Path | None = Field(
        default=None,
        description="file holding the key (16+ bytes) that authenticates page and resume tokens"
        " (unset: a key kept in the database, shared by every replica)",
    )


class SecurityConfig(SecurityFlags):
    """The server's security settings, and what they build: interceptors and the listening port."""

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="after")
    def _tls_files_go_together(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("--tls-cert-file and --tls-key-file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("--tls-client-ca-file (mTLS) needs --tls-cert-file and --tls-key-file")
        return self

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
