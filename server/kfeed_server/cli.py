"""`kfeed serve`: run the gRPC server."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kfeed_server.app import ServerConfig, run_until_signalled
from kfeed_server.db import DEFAULT_DATABASE_URL
from kfeed_server.logs import LogFormat, configure_logging
from kfeed_server.security import SecurityConfig
from kfeed_server.web import WebConfig
from kfeed_server.web.app import DEFAULT_WEB_ROOT
from kfeed_settings import CommandSettings


class ServeCommand(CommandSettings):
    """Run the kfeed gRPC server. It owns the database and migrates it on start."""

    listen: str = "127.0.0.1:50051"
    database_url: str = DEFAULT_DATABASE_URL
    migrate: bool = True
    grace_period: float = 5.0
    log_level: str = "INFO"
    log_format: LogFormat = "text"
    # Security and metrics: docs/OPERATIONS.md.
    auth_tokens_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    rate_limit: float | None = None
    rate_limit_burst: int | None = None
    metrics_listen: str | None = None
    # The browser dashboard and Connect/gRPC-Web on HOST:PORT (off unless given); the origins
    # allowed to call it from other pages (default: loopback ones only); the built dashboard.
    web_listen: str | None = None
    web_cors_origins: tuple[str, ...] = ()
    web_root: Path = DEFAULT_WEB_ROOT
    token_key_file: Path | None = None
    # Live streams: docs/OPERATIONS.md.
    subscriber_queue_capacity: int = 10_000
    subscriber_idle_timeout: float = 60.0
    max_streams_per_peer: int = 1_000

    def cli_cmd(self) -> None:
        configure_logging(self.log_level, self.log_format)
        config = ServerConfig(
            listen=self.listen,
            database_url=self.database_url,
            migrate=self.migrate,
            grace_period=self.grace_period,
            security=SecurityConfig(
                auth_tokens_file=self.auth_tokens_file,
                tls_cert_file=self.tls_cert_file,
                tls_key_file=self.tls_key_file,
                tls_client_ca_file=self.tls_client_ca_file,
                rate_limit=self.rate_limit,
                rate_limit_burst=self.rate_limit_burst,
                token_key_file=self.token_key_file,
            ),
            metrics_listen=self.metrics_listen,
            web=(
                WebConfig(self.web_listen, self.web_cors_origins, self.web_root)
                if self.web_listen
                else None
            ),
            subscriber_queue_capacity=self.subscriber_queue_capacity,
            subscriber_idle_timeout=self.subscriber_idle_timeout,
            max_streams_per_peer=self.max_streams_per_peer,
        )
        asyncio.run(run_until_signalled(config))
