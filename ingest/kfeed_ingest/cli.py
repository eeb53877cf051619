"""``kfeed ingest``: read Kalshi (or the simulator) and feed ``kfeed serve``.

Every flag is also an environment variable ``KFEED_<FLAG>`` (``--kalshi-url`` is
``KFEED_KALSHI_URL``); list flags take comma-separated values in either place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Coroutine
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import grpc
from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from kfeed_ingest.dead_letters import DeadLetterFile
from kfeed_ingest.kalshi.books import CheckpointPolicy
from kfeed_ingest.kalshi.rest import (
    PRODUCTION_REST_URL,
    READS_PER_SECOND,
    KalshiRestClient,
    RateTier,
    TokenBucket,
)
from kfeed_ingest.kalshi.signing import KalshiCredentials
from kfeed_ingest.kalshi.websocket import PRODUCTION_WS_URL
from kfeed_ingest.publisher import Publisher
from kfeed_ingest.runner import (
    Ingestor,
    MarketSelection,
    RunOptions,
    default_backfill_range,
)
from kfeed_ingest.server_state import ServerState
from kfeed_ingest.spool import Spool
from kfeed_settings import CommandSettings
from kfeed_settings.stopping import StopSignals

logger = logging.getLogger("kfeed_ingest")

CommaList = Annotated[list[str], NoDecode]
"""A list flag: ``--tickers A,B`` or ``KFEED_TICKERS=A,B``."""

_SHUTDOWN_GRACE = 2.0  # seconds to wait for in-flight acks on SIGTERM before leaving them spooled


def derive_ws_url(rest_url: str) -> str:
    """The WebSocket URL that goes with a REST base URL.

    Production has its own WebSocket host; anywhere else (the simulator, a proxy) the scheme
    becomes ws/wss and ``/trade-api/v2`` becomes ``/trade-api/ws/v2``.
    """
    if rest_url.rstrip("/") == PRODUCTION_REST_URL:
        return PRODUCTION_WS_URL
    scheme, _, rest = rest_url.partition("://")
    ws_scheme = {"https": "wss", "http": "ws"}.get(scheme, scheme)
    return f"{ws_scheme}://{rest.rstrip('/').replace('/trade-api/v2', '/trade-api/ws/v2')}"


class IngestCommand(CommandSettings):
    """Feed the kfeed server from Kalshi: poll, stream (ws) or backfill the selected markets."""

    server: str = Field(default="127.0.0.1:50051", description="kfeed serve HOST:PORT")
    server_token: str | None = Field(
        default=None, description="bearer token with the ingest role", repr=False
    )
    server_tls: bool = Field(
        default=False, description="TLS to the server (implied by any --server-tls-* file)"
    )
    server_tls_ca_file: Path | None = Field(
        default=None, description="PEM CA that signed the server's certificate (default: system)"
    )
    server_tls_cert_file: Path | None = Field(
        default=None, description="PEM client certificate, when the server requires mTLS"
    )
    server_tls_key_file: Path | None = Field(
        default=None, description="PEM key of --server-tls-cert-file"
    )
    kalshi_url: str = Field(default=PRODUCTION_REST_URL, description="Kalshi REST base URL")
    kalshi_ws_url: str | None = Field(
        default=None, description="Kalshi WebSocket URL (default: derived from --kalshi-url)"
    )
    mode: Literal["poll", "ws", "backfill"] = Field(default="poll", description="what to run")
    once: bool = Field(default=False, description="one pass; exit 0 when all of it is acked")
    spool_dir: Path = Field(default=Path("data/spool"), description="journal of unacked batches")
    dead_letter_file: Path = Field(
        default=Path("data/dead-letter.jsonl"),
        description="rows the server refused, with the reason (JSON lines; never resent)",
    )
    api_key_id: str | None = Field(default=None, description="Kalshi API key id")
    api_private_key_file: Path | None = Field(
        default=None, description="PEM file of the Kalshi API key's private key"
    )
    series: CommaList = Field(default_factory=list, description="series tickers to follow")
    events: CommaList = Field(default_factory=list, description="event tickers to follow")
    tickers: CommaList = Field(default_factory=list, description="market tickers to follow")
    statuses: CommaList = Field(
        default_factory=list, description="status filters: unopened, open, paused, closed, settled"
    )
    poll_interval: float = Field(default=5.0, gt=0, description="seconds between poll passes")
    discovery_interval: float = Field(
        default=60.0, gt=0, description="ws mode: seconds between REST market discovery passes"
    )
    start: datetime | None = Field(default=None, description="backfill from (default: end - 1 day)")
    end: datetime | None = Field(default=None, description="backfill until (default: now)")
    candle_period: Literal[1, 60, 1440] = Field(default=60, description="backfill candle minutes")
    rate_tier: RateTier = Field(default=RateTier.BASIC, description="Kalshi API tier")
    rate_limit: float | None = Field(
        default=None, gt=0, description="requests per second (overrides --rate-tier)"
    )
    producer: str = Field(
        default_factory=lambda: f"ingest-{socket.gethostname()}",
        description="this process's name on the server",
    )
    batch_rows: int = Field(default=500, ge=1, description="rows per published batch")
    linger: float = Field(
        default=0.2,
        gt=0,
        description="seconds a batch collects rows before it is sent (rows are spooled at once)",
    )
    poll_books: bool = Field(
        default=True,
        description="--mode poll and backfill: read each open market's order book (every pass)",
    )
    book_checkpoint_changes: int = Field(
        default=1000, ge=1, description="a full order book every N changes of a market"
    )
    book_checkpoint_seconds: float = Field(
        default=60.0, gt=0, description="... or every T seconds of its changes, if sooner"
    )
    repair_grace: float = Field(
        default=2.0,
        ge=0,
        description="ws mode, on stopping: seconds pending gap-repair reads may still take",
    )
    window: int = Field(default=16, ge=1, description="batches in flight before waiting for acks")
    flush_timeout: float = Field(
        default=60.0, gt=0, description="--once: seconds to wait for the last acks"
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")

    @field_validator("series", "events", "tickers", "statuses", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        return value

    @field_validator("kalshi_url", "kalshi_ws_url")
    @classmethod
    def _absolute_url(cls, value: str | None) -> str | None:
        schemes = ("http", "https", "ws", "wss")
        if value is not None and (
            urlsplit(value).scheme not in schemes or not urlsplit(value).netloc
        ):
            raise ValueError("expected an absolute URL such as https://HOST/trade-api/v2")
        return value

    @property
    def ws_url(self) -> str:
        """``--kalshi-ws-url``, or the one derived from ``--kalshi-url``."""
        return self.kalshi_ws_url or derive_ws_url(self.kalshi_url)

    @model_validator(mode="after")
    def _signing_flags(self) -> IngestCommand:
        if (self.api_key_id is None) != (self.api_private_key_file is None):
            raise ValueError("--api-key-id and --api-private-key-file go together")
        if self.mode == "ws" and self.api_key_id is None:
            raise ValueError(
                "--mode ws needs --api-key-id and --api-private-key-file: Kalshi accepts only "
                "signed WebSocket connections"
            )
        return self

    def credentials(self) -> KalshiCredentials | None:
        """The signing credentials, when the key id and the key file are given."""
        if self.api_key_id is None or self.api_private_key_file is None:
            return None
        return KalshiCredentials.from_files(self.api_key_id, self.api_private_key_file)

    def server_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials for the server connection; None for plaintext."""
        files = (self.server_tls_ca_file, self.server_tls_cert_file, self.server_tls_key_file)
        if not self.server_tls and all(file is None for file in files):
            return None
        if (self.server_tls_cert_file is None) != (self.server_tls_key_file is None):
            raise ValueError("--server-tls-cert-file and --server-tls-key-file go together")
        ca, cert, key = (file.read_bytes() if file else None for file in files)
        return grpc.ssl_channel_credentials(ca, key, cert)

    def selection(self) -> MarketSelection:
        """The markets the flags select."""
        return MarketSelection(
            series=tuple(self.series),
            events=tuple(self.events),
            tickers=tuple(self.tickers),
            statuses=tuple(self.statuses),
        )

    def cli_cmd(self) -> None:
        """Run the chosen mode until done (``--once``) or until SIGINT/SIGTERM."""
        logging.basicConfig(
            level=self.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if logging.getLogger().level > logging.DEBUG:
            # httpx logs every request at INFO: thousands an hour, drowning what matters.
            logging.getLogger("httpx").setLevel(logging.WARNING)
        code = asyncio.run(self.run())
        if code:
            raise SystemExit(code)

    async def run(self) -> int:
        """The command's body; the exit status (0 = everything read was acknowledged)."""
        credentials = self.credentials()
        rate = self.rate_limit or READS_PER_SECOND[self.rate_tier]
        with Spool.open(self.spool_dir) as spool:
            rest = KalshiRestClient(
                self.kalshi_url, credentials=credentials, rate_limiter=TokenBucket(rate)
            )
            publisher = Publisher(
                self.server,
                spool,
                producer=self.producer,
                window=self.window,
                token=self.server_token,
                credentials=self.server_credentials(),
                dead_letters=DeadLetterFile(self.dead_letter_file, self.producer),
            )
            async with rest, publisher:
                options = RunOptions(
                    poll_interval=self.poll_interval,
                    discovery_interval=self.discovery_interval,
                    batch_rows=self.batch_rows,
                    linger=self.linger,
                    candle_period_minutes=self.candle_period,
                    flush_timeout=self.flush_timeout,
                    poll_books=self.poll_books,
                    repair_grace=self.repair_grace,
                    book_checkpoints=CheckpointPolicy(
                        self.book_checkpoint_changes, self.book_checkpoint_seconds
                    ),
                )
                # poll and ws follow the markets an earlier process left unfinished.
                stored = (
                    None
                    if self.mode == "backfill"
                    else ServerState(
                        self.server,
                        token=self.server_token,
                        credentials=self.server_credentials(),
                    )
                )
                ingestor = Ingestor(rest, publisher, self.selection(), options, stored)
                stopped = await self._until_signal(self._mode(ingestor, credentials))
                if stopped is not None:
                    await self._drain(ingestor, publisher)
                    stopped.raise_if_interrupted()
                    return 0
                report = await ingestor.finish()
                logger.info(
                    "done: %d rows read, %d refused, %d unacked, %d read errors",
                    report.rows,
                    report.rejected,
                    report.unacked,
                    report.read_errors,
                )
                return 0 if report.ok else 1

    async def _mode(self, ingestor: Ingestor, credentials: KalshiCredentials | None) -> None:
        if self.mode == "poll":
            await ingestor.run_poll(self.once)
        elif self.mode == "ws":
            await ingestor.run_ws(self.ws_url, credentials, self.once)
        else:
            start, end = default_backfill_range(self.start, self.end)
            await ingestor.backfill(start, end)

    @staticmethod
    async def _until_signal(work: Coroutine[Any, Any, None]) -> StopSignals | None:
        """Run ``work``; the signals that stopped it first, or None when it finished."""
        stop = StopSignals()
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Stopped from outside (an embedding caller, a test): the work stops too, before
            # the clients it uses are closed under it.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise
        finally:
            stop.remove()
            stopper.cancel()
        if task.done():
            task.result()
            return None
        logger.info("signal received: stopping")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return stop

    @staticmethod
    async def _drain(ingestor: Ingestor, publisher: Publisher) -> None:
        """Spool what was read, give in-flight batches a moment, leave the rest spooled."""
        await ingestor.sink.flush()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_SHUTDOWN_GRACE):
                await publisher.flush()
        if publisher.pending:
            logger.info("%d batches stay spooled for the next run", publisher.pending)
