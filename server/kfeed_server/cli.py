"""`kfeed serve`: run the gRPC server."""

from __future__ import annotations

import asyncio

from kfeed_cli.settings import CommandSettings
from kfeed_server.app import ServerConfig, run_until_signalled
from kfeed_server.db import DEFAULT_DATABASE_URL
from kfeed_server.logs import LogFormat, configure_logging


class ServeCommand(CommandSettings):
    """Run the kfeed gRPC server. It owns the database and migrates it on start."""

    listen: str = "127.0.0.1:50051"
    database_url: str = DEFAULT_DATABASE_URL
    migrate: bool = True
    grace_period: float = 5.0
    log_level: str = "INFO"
    log_format: LogFormat = "text"

    def cli_cmd(self) -> None:
        configure_logging(self.log_level, self.log_format)
        config = ServerConfig(
            listen=self.listen,
            database_url=self.database_url,
            migrate=self.migrate,
            grace_period=self.grace_period,
        )
        asyncio.run(run_until_signalled(config))
