"""The kfeed server process: one grpc.aio server with every kfeed service, health and reflection.

Start-up order: listen with health NOT_SERVING, migrate the database, then SERVING. Shutdown
(SIGTERM/SIGINT): health NOT_SERVING, live streams told to finish, in-flight calls given a grace
period, database closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from kfeed.v1 import (
    backtest_service_pb2,
    backtest_service_pb2_grpc,
    ingest_service_pb2,
    ingest_service_pb2_grpc,
    market_service_pb2,
    market_service_pb2_grpc,
)
from kfeed_server.backtest.service import BacktestRunner, RunnerConfig
from kfeed_server.db import (
    DEFAULT_DATABASE_URL,
    create_engine,
    create_writer_engine,
    normalise_database_url,
    schema_is_current,
    upgrade_to_head,
)
from kfeed_server.db.commits import CommitListener
from kfeed_server.db.repositories import build_repositories
from kfeed_server.gc_tuning import tune_for_throughput
from kfeed_server.observability import MetricsEndpoint, ObservabilityInterceptor, watch_hub
from kfeed_server.observability.metrics import (
    record_refused_batch,
    record_refused_rows,
    record_stored_batch,
)
from kfeed_server.security import SecurityConfig
from kfeed_server.streaming.follower import CommitFollower, DirectPublisher, LivePublisher
from kfeed_server.streaming.hub import SnapshotHub
from kfeed_server.transport.backtest_servicer import BacktestServicer
from kfeed_server.transport.ingest_servicer import IngestServicer
from kfeed_server.transport.interceptors import ErrorMappingInterceptor
from kfeed_server.transport.market_servicer import MarketServicer
from kfeed_server.transport.reflection import enable_reflection
from kfeed_server.transport.requests import RequestTokens, new_token_key
from kfeed_server.transport.snapshot_stream import StreamLimits
from kfeed_server.transport.stream_writer import BoundedStreamWrites
from kfeed_server.web import WebConfig, WebListener, build_web_app
from kfeed_settings import CommandError
from kfeed_settings.stopping import StopSignals

log = logging.getLogger(__name__)

KFEED_SERVICES = (
    market_service_pb2.DESCRIPTOR.services_by_name["MarketService"].full_name,
    backtest_service_pb2.DESCRIPTOR.services_by_name["BacktestService"].full_name,
    ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
)
# The name of the token key in the database's server secrets.
TOKEN_KEY = "request_token_key"
# 8 MiB: a full page of snapshots fits with room to spare.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# Calls gRPC core holds until the server's event loop takes them (grpc.aio takes one at a time):
# above this it sheds some new calls, above twice this every new one. gRPC's defaults cancelled
# two thirds of 10,000 subscribers opening their streams at once (as a restart's reconnections
# do); docs/PERFORMANCE.md.
MAX_PENDING_CALLS = 20_000
# How long such a call may wait (gRPC's default, 30 s, cancelled the last of 10,000 opened at
# once on a loaded machine).
MAX_PENDING_CALL_SECONDS = 300


class ServerFlags(BaseModel):
    """Where the server listens and what database it owns: the `kfeed serve` flags (ServeCommand
    inherits them) and the first fields of :class:`ServerConfig`."""

    listen: str = Field(default="127.0.0.1:50051", description="HOST:PORT of the gRPC server")
    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        description="sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST:PORT/DATABASE"
        " (postgresql:// and sqlite:// get their async driver)",
    )
    migrate: bool = Field(default=True, description="run the database migrations on start")
    grace_period: float = Field(
        default=5.0, description="seconds in-flight calls get to finish on shutdown"
    )
    metrics_listen: str | None = Field(
        default=None, description="HOST:PORT of the Prometheus /metrics endpoint (unset: none)"
    )
    # Live streams: docs/OPERATIONS.md.
    subscriber_queue_capacity: int = Field(
        default=10_000,
        description="live items a stream subscriber may fall behind by before its overflow"
        " policy applies",
    )
    subscriber_idle_timeout: float = Field(
        default=60.0,
        description="seconds a stream response may wait for its subscriber to read before the"
        " stream is ended",
    )
    max_streams_per_peer: int = Field(
        default=1_000, description="open streams one client address may hold at once"
    )
    # Order books: docs/adr/0017-order-book-storage.md.
    book_partition_days_ahead: int = Field(
        default=7,
        ge=0,
        le=366,
        description="PostgreSQL: order-book change partitions (one a UTC day) made this many"
        " days ahead",
    )
    book_retention_days: float = Field(
        default=0.0,
        ge=0,
        description="PostgreSQL: drop order-book change partitions wholly older than this many"
        " days (0: keep forever)",
    )

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, url: str) -> str:
        return normalise_database_url(url)


class ServerConfig(ServerFlags):
    """Everything a :class:`KfeedServer` needs."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    # Backtest worker pool and progress reporting.
    backtest: RunnerConfig = Field(default_factory=RunnerConfig)
    # Tokens, TLS and rate limit; all off by default, which run_until_signalled allows on
    # loopback only.
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    # The browser dashboard and Connect/gRPC-Web (--web-listen); None: not served.
    web: WebConfig | None = None
    # One of several worker processes on the same port (``kfeed serve --workers``, see
    # kfeed_server.workers): the port is bound with SO_REUSEPORT, and the supervisor has already
    # marked the previous run's unfinished backtests FAILED (a worker must not fail another's).
    worker: bool = False


def _shown(url: str) -> str:
    """``url`` without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def _reason(error: BaseException) -> str:
    """The innermost cause's first line: asyncpg's or the OS's words, not SQLAlchemy's wrapping."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def is_loopback_address(listen: str) -> bool:
    """True when ``listen`` (HOST:PORT) binds only to the loopback interface."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class KfeedServer:
    """Owns the gRPC server, the database engine and the services' shared state."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine = create_engine(config.database_url)
        # SQLite: ingest batches are written on the event loop's thread (db.engine).
        self.writer_engine = create_writer_engine(config.database_url)
        self.repositories = build_repositories(self.engine, self.writer_engine)
        self.hub = SnapshotHub(config.subscriber_queue_capacity)
        self._served = False
        watch_hub(self.hub)
        # PostgreSQL may be shared by several servers: batches reach the hub by commit notice.
        self._follower: CommitFollower | None = None
        self._following: asyncio.Task[None] | None = None
        self._partition_upkeep: asyncio.Future[None] | None = None
        live: LivePublisher = DirectPublisher(self.hub)
        if make_url(config.database_url).get_backend_name() == "postgresql":
            repositories = self.repositories
            live = self._follower = CommitFollower(
                self.hub,
                repositories.snapshots,
                repositories.feed_gaps,
                repositories.markets,
                repositories.ingest.origin,
                repositories.trades,
                repositories.books,
            )
        self.metrics_endpoint: MetricsEndpoint | None = None
        # Page and resume tokens; keyed from the database in start() unless configured.
        self.tokens = RequestTokens(config.security.token_key())
        self.health = health.aio.HealthServicer()
        # One instance for both listeners: same tokens, and one rate limit per caller.
        auth = config.security.interceptor()
        self._server = grpc.aio.server(
            # Outermost first: request id and error mapping, then metrics and the access log
            # (so they see refusals too), then authentication, roles and the rate limit, then
            # the bounded writes of streamed responses.
            interceptors=[
                ErrorMappingInterceptor(),
                ObservabilityInterceptor(),
                auth,
                BoundedStreamWrites(config.subscriber_idle_timeout),
            ],
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # Only workers share their port: otherwise a second server on it is an error.
                ("grpc.so_reuseport", 1 if config.worker else 0),
                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
                ("grpc.server_max_unrequested_time_in_server", MAX_PENDING_CALL_SECONDS),
            ],
        )
        market_servicer = MarketServicer(
            self.repositories, self.hub, self.tokens, StreamLimits(config.max_streams_per_peer)
        )
        market_service_pb2_grpc.add_MarketServiceServicer_to_server(market_servicer, self._server)
        ingest_service_pb2_grpc.add_IngestServiceServicer_to_server(
            IngestServicer(
                self.repositories,
                live,
                on_stored=record_stored_batch,
                on_refused=record_refused_batch,
                on_rows_refused=record_refused_rows,
                tokens=self.tokens,
                writing=self.hub.writing,
            ),
            self._server,
        )
        self.backtests = BacktestRunner(self.repositories, config.backtest)
        backtest_servicer = BacktestServicer(self.backtests, self.tokens)
        backtest_service_pb2_grpc.add_BacktestServiceServicer_to_server(
            backtest_servicer, self._server
        )
        # The same servicers over Connect and gRPC-Web for browsers (docs/adr/0011).
        self.web: WebListener | None = None
        if config.web is not None:
            self.web = WebListener(
                build_web_app(
                    config.web,
                    market_servicer,
                    backtest_servicer,
                    auth,
                    config.subscriber_idle_timeout,
                ),
                config.web.listen,
                config.security.tls,
                config.grace_period,
            )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        enable_reflection((*KFEED_SERVICES, health.SERVICE_NAME), self._server)
        self.port = 0

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", *KFEED_SERVICES):
            await self.health.set(service, status)

    async def start(self) -> int:
        """Listen, migrate, then report SERVING. Returns the bound port."""
        try:
            self.port = self.config.security.add_port(self._server, self.config.listen)
        except RuntimeError:  # grpc's "Failed to bind to address"
            self.port = 0
        if self.port == 0:
            raise CommandError(
                f"cannot listen on {self.config.listen}: the port is in use or the address is not"
                " this machine's (--listen / KFEED_LISTEN)"
            )
        if self.config.metrics_listen:
            self.metrics_endpoint = MetricsEndpoint.start(self.config.metrics_listen)
            log.info(
                "metrics on %s (port %d)", self.config.metrics_listen, self.metrics_endpoint.port
            )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        try:
            if self.config.migrate:
                await upgrade_to_head(self.engine)
            current = await schema_is_current(self.engine)
        except (OSError, SQLAlchemyError, asyncpg.PostgresError) as error:
            raise CommandError(
                f"cannot use the database {_shown(self.config.database_url)}: {_reason(error)}"
            ) from error
        if not current:
            log.error("database schema is not at the latest migration; run with --migrate")
            return self.port
        if not self.tokens.has_key:
            self.tokens.set_key(
                await self.repositories.secrets.get_or_create(TOKEN_KEY, new_token_key)
            )
        if not self.config.worker:
            await self.backtests.recover()
        await self._maintain_book_partitions()
        self._partition_upkeep = asyncio.ensure_future(self._keep_book_partitions())
        await self._follow_commits()
        if self.web is not None:
            await self.web.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._served = True
        log.info("kfeed serving on %s", self.listening_on)
        return self.port

    async def _maintain_book_partitions(self) -> None:
        retention_days = self.config.book_retention_days
        created, dropped = await self.repositories.books.maintain_partitions(
            datetime.now(UTC),
            self.config.book_partition_days_ahead,
            timedelta(days=retention_days) if retention_days > 0 else None,
        )
        if created or dropped:
            log.info("order-book partitions: created %s, dropped %s", created, dropped)

    async def _keep_book_partitions(self) -> None:
        """Hourly: partitions stay created ahead of time and retention applies."""
        while True:
            await asyncio.sleep(3600)
            try:
                await self._maintain_book_partitions()
            except Exception:  # the next hour tries again; serving goes on meanwhile
                log.exception("order-book partition upkeep failed")

    async def _follow_commits(self) -> None:
        """Start following commit notices (PostgreSQL); wait a little for listening to start."""
        if self._follower is None:
            return
        notices = CommitListener(self.config.database_url).notices()
        self._following = asyncio.ensure_future(self._follower.follow(notices))
        try:
            await asyncio.wait_for(asyncio.shield(self._follower.listening.wait()), 10)
        except TimeoutError:
            log.warning("not yet listening for commit notices: live streams start when it is")

    @property
    def listening_on(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING first so balancers drain us, streams end, calls finish."""
        await self.health.enter_graceful_shutdown()
        if self._partition_upkeep is not None:
            self._partition_upkeep.cancel()
            await asyncio.gather(self._partition_upkeep, return_exceptions=True)
        if self._following is not None:
            self._following.cancel()
            await asyncio.gather(self._following, return_exceptions=True)
        self.hub.close()
        # Running backtests become FAILED and their watchers get that final state.
        await self.backtests.close()
        await self._server.stop(self.config.grace_period if grace is None else grace)
        if self.web is not None:
            await self.web.stop()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        await self.engine.dispose()
        if self.writer_engine is not None:
            await self.writer_engine.dispose()
        if self._served:  # a start that failed is reported by its error alone
            log.info("kfeed server stopped")


async def prepare_database(config: ServerConfig) -> None:
    """What one process does for several workers before they start: migrate (unless told not
    to), check the schema, make the token key, and mark the previous run's unfinished backtests
    FAILED."""
    engine = create_engine(config.database_url)
    try:
        if config.migrate:
            await upgrade_to_head(engine)
        if not await schema_is_current(engine):
            raise CommandError(
                "the database schema is not at the latest migration; run with --migrate"
            )
        repositories = build_repositories(engine)
        await repositories.secrets.get_or_create(TOKEN_KEY, new_token_key)
        await BacktestRunner(repositories, config.backtest).recover()
    except (OSError, SQLAlchemyError, asyncpg.PostgresError) as error:
        raise CommandError(
            f"cannot use the database {_shown(config.database_url)}: {_reason(error)}"
        ) from error
    finally:
        await engine.dispose()


def check_listen_beyond_loopback(config: ServerConfig) -> None:
    """Refuse (SystemExit) to serve beyond loopback without authentication."""
    if not is_loopback_address(config.listen) and not config.security.authenticates:
        raise SystemExit(
            f"refusing to listen on {config.listen}: beyond loopback kfeed requires "
            "authentication (--auth-tokens-file), which is not configured"
        )
    if (
        config.web is not None
        and not is_loopback_address(config.web.listen)
        and not config.security.authenticates
    ):
        raise SystemExit(
            f"refusing to serve the dashboard on {config.web.listen}: beyond loopback kfeed "
            "requires authentication (--auth-tokens-file), which is not configured"
        )


def warm_up_compiled_reads() -> None:
    """Compiles the numba kernels of columnar reads, or loads them from numba's disk cache:
    PostgreSQL's COPY decoder and the replay encoder (imported here, not at start-up)."""
    from kfeed_server.db import copy_binary
    from kfeed_server.transport import column_frames

    copy_binary.warm_up()
    column_frames.warm_up()


def _warm_up_compiled_reads() -> None:
    """Loads the compiled COPY decoder and replay encoder (numba: seconds) in the background
    after start-up, so the first export or long replay does not wait for them; a failure only
    means that it waits."""
    try:
        warm_up_compiled_reads()
    except Exception:
        log.warning("the compiled column readers were not warmed up", exc_info=True)


async def run_until_signalled(config: ServerConfig) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully."""
    check_listen_beyond_loopback(config)
    try:
        server = KfeedServer(config)
    except OSError as error:  # the SQLite file's folder cannot be made
        raise CommandError(
            f"cannot use the database {_shown(config.database_url)}: {_reason(error)}"
        ) from error
    stop_requested = StopSignals()
    try:
        await server.start()
    except BaseException:
        await server.stop(grace=0)
        raise
    tune_for_throughput()
    threading.Thread(target=_warm_up_compiled_reads, name="kfeed-warm-up", daemon=True).start()
    await stop_requested.wait()
    log.info("shutting down")
    await server.stop()
    stop_requested.raise_if_interrupted()
