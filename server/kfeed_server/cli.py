"""`kfeed serve`: run the gRPC server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from kfeed_server.app import ServerConfig, ServerFlags, run_until_signalled
from kfeed_server.backtest.loading import StrategyLoadError, load_strategy_modules
from kfeed_server.backtest.service import RunnerConfig
from kfeed_server.logs import LogFormat, configure_logging
from kfeed_server.security import SecurityConfig
from kfeed_server.security.config import SecurityFlags
from kfeed_server.web import WebConfig
from kfeed_server.web.app import DEFAULT_WEB_ROOT
from kfeed_server.workers import check_workers, run_workers
from kfeed_settings import CommandError, CommandSettings


# The server and security flags are defined once, by ServerFlags and SecurityFlags.
class ServeCommand(CommandSettings, SecurityFlags, ServerFlags):
    """Run the kfeed gRPC server. It owns the database and migrates it on start."""

    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")
    log_format: LogFormat = Field(default="text", description="text, or json (one object a line)")
    web_listen: str | None = Field(
        default=None,
        description="HOST:PORT of the browser dashboard and Connect/gRPC-Web (unset: off)",
    )
    web_cors_origins: tuple[str, ...] = Field(
        default=(), description="origins allowed to call the web listener (default: loopback)"
    )
    web_root: Path = Field(default=DEFAULT_WEB_ROOT, description="the built dashboard's folder")
    strategy_module: tuple[str, ...] = Field(
        default=(),
        description="Python module of trusted user backtest strategies to load (repeatable);"
        " installed kfeed.strategies entry points are loaded too",
    )
    backtest_time_limit: float = Field(
        default=3_600.0, gt=0, description="seconds one backtest run may take before it fails"
    )
    workers: int = Field(
        default=1,
        description="server processes sharing the port (SO_REUSEPORT); above 1 needs PostgreSQL"
        " (docs/adr/0018-serve-workers.md)",
    )

    def cli_cmd(self) -> None:
        configure_logging(self.log_level, self.log_format)
        try:
            load_strategy_modules(self.strategy_module)
        except StrategyLoadError as error:
            raise CommandError(str(error)) from error
        config = ServerConfig(
            **_values(self, ServerFlags),
            security=SecurityConfig(**_values(self, SecurityFlags)),
            backtest=RunnerConfig(
                strategy_modules=self.strategy_module, time_limit=self.backtest_time_limit
            ),
            web=(
                WebConfig(self.web_listen, self.web_cors_origins, self.web_root)
                if self.web_listen
                else None
            ),
        )
        check_workers(config, self.workers)
        if self.workers > 1:
            asyncio.run(run_workers(config, self.workers, self.log_level, self.log_format))
        else:
            asyncio.run(run_until_signalled(config))


def _values(command: ServeCommand, flags: type[BaseModel]) -> dict[str, Any]:
    """The values of ``flags``' fields in ``command``."""
    return {name: getattr(command, name) for name in flags.model_fields}
