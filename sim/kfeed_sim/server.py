"""The simulator process: one starlette app (REST, WebSocket, admin) served by uvicorn.

``running_simulator`` runs it in the current event loop, which is how tests and ``kfeed demo``
embed it; ``kfeed sim`` runs the same thing until a signal arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kfeed_settings import CommandError
from kfeed_sim.auth import SIGNING_HEADERS, Verifier
from kfeed_sim.config import FaultConfig, SimConfig
from kfeed_sim.faults import FaultInjector, RestFault
from kfeed_sim.market_model import Exchange, MarketTruth
from kfeed_sim.rest import REST_PREFIX, ApiError, RestApi, api_error_handler, error_response
from kfeed_sim.shapes import Renderer
from kfeed_sim.truth import truth_json
from kfeed_sim.ws import WS_PATH, WebSocketHub


class Simulator:
    """The exchange model plus everything that serves it; owns the stepping."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.exchange = Exchange(config)
        self.faults = FaultInjector(config.faults, config.seed)
        self.verifier = Verifier(config)
        renderer = Renderer(legacy=config.legacy_integer_fields)
        self.hub = WebSocketHub(
            self.exchange, renderer, self.faults, self.verifier, config.ws_queue_size
        )
        self.rest = RestApi(self.exchange, renderer)

    def advance(self, steps: int = 1) -> None:
        """Take ``steps`` steps now and publish their events."""
        for _ in range(steps):
            self.hub.publish(self.exchange.step())

    async def run_clock(self) -> None:
        """Step every ``tick_interval`` seconds (on a fixed schedule, so no drift builds up)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            deadline += self.config.tick_interval
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            self.advance()

    def app(self) -> ASGIApp:
        """The ASGI application: REST, WebSocket and ``/_sim`` admin routes."""
        routes: list[Route | WebSocketRoute] = [
            *self.rest.routes(),
            WebSocketRoute(WS_PATH, self.hub.endpoint),
            Route("/_sim/faults", self._get_faults, methods=["GET"]),
            Route("/_sim/faults", self._post_faults, methods=["POST"]),
            Route("/_sim/truth", self._truth, methods=["GET"]),
            Route("/_sim/step", self._step, methods=["POST"]),
        ]
        starlette = Starlette(
            routes=routes,
            exception_handlers={ApiError: api_error_handler, HTTPException: api_error_handler},
        )
        return RestGuard(starlette, self.faults, self.verifier)

    async def _get_faults(self, _: Request) -> Response:
        return JSONResponse(self.faults.config.model_dump())

    async def _post_faults(self, request: Request) -> Response:
        """Merge the posted knobs into the current ones (``{}`` keeps everything)."""
        try:
            changes = await request.json()
            faults = FaultConfig.model_validate(self.faults.config.model_dump() | changes)
        except (ValueError, TypeError, ValidationError) as error:
            return error_response(400, "bad_request", str(error))
        self.faults.update(faults)
        return JSONResponse(faults.model_dump())

    async def _truth(self, request: Request) -> Response:
        raw = request.query_params.get("tickers") or request.query_params.get("ticker")
        tickers = set(raw.split(",")) if raw else None
        books = request.query_params.get("books", "").lower() in ("1", "true", "yes")
        return JSONResponse(truth_json(self.exchange, tickers, books))

    async def _step(self, request: Request) -> Response:
        count = int(request.query_params.get("count", "1"))
        self.advance(count)
        return JSONResponse({"step": self.exchange.current_step})


class RestGuard:
    """ASGI middleware for ``/trade-api/v2``: signature checks, then the REST fault knobs."""

    def __init__(self, app: ASGIApp, faults: FaultInjector, verifier: Verifier) -> None:
        self.app, self.faults, self.verifier = app, faults, verifier

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(REST_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if any(name in headers for name in SIGNING_HEADERS):
            failure = self.verifier.failure(headers, scope["method"], scope["path"])
            if failure is not None:
                await error_response(401, "authentication_error", failure)(scope, receive, send)
                return
        knobs = self.faults.config
        if knobs.latency_ms:
            await asyncio.sleep(knobs.latency_ms / 1_000)
        fault = self.faults.rest_fault()
        if fault is RestFault.RATE_LIMITED:
            extra = (
                {}
                if knobs.retry_after_seconds is None
                else {"Retry-After": str(knobs.retry_after_seconds)}
            )
            await JSONResponse({"error": "too many requests"}, 429, headers=extra)(
                scope, receive, send
            )
        elif fault is RestFault.SERVER_ERROR:
            status = self.faults.server_error_status()
            response = error_response(status, "internal_server_error", "simulated server error")
            await response(scope, receive, send)
        elif fault is RestFault.MALFORMED:
            await self.app(scope, receive, _truncating(send))
        else:
            await self.app(scope, receive, send)


def _truncating(send: Send) -> Send:
    """Wrap ``send`` so the body is cut in half (and Content-Length made to match)."""
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            return
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            body = body[: len(body) // 2]
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send(message)

    return wrapped


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the program embedding the sim owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave SIGINT/SIGTERM to the caller (``kfeed sim``, ``kfeed demo``, pytest)."""
        yield


@dataclass
class SimHandle:
    """A running simulator: its URLs, the live model (for truth) and runtime controls."""

    simulator: Simulator
    base_url: str
    server: uvicorn.Server = field(repr=False)
    serving: asyncio.Task[None] = field(repr=False)

    @property
    def rest_url(self) -> str:
        """E.g. ``http://127.0.0.1:8765/trade-api/v2``."""
        return self.base_url + REST_PREFIX

    @property
    def ws_url(self) -> str:
        """E.g. ``ws://127.0.0.1:8765/trade-api/ws/v2``."""
        return "ws" + self.base_url.removeprefix("http") + WS_PATH

    @property
    def exchange(self) -> Exchange:
        """The live model."""
        return self.simulator.exchange

    @property
    def config(self) -> SimConfig:
        """The config the simulator started with (faults may have changed since)."""
        return self.simulator.config

    def set_faults(self, faults: FaultConfig) -> None:
        """Replace the fault knobs (and restart the fault stream from their seed)."""
        self.simulator.faults.update(faults)

    def advance(self, steps: int = 1) -> None:
        """Take steps now (for ``auto_step=False`` runs) and publish them to the sockets."""
        self.simulator.advance(steps)

    def truth(self, books: bool = False) -> dict[str, MarketTruth]:
        """Every state and trade (and with ``books`` book change) published so far, per market."""
        return self.exchange.truth(books)

    async def wait_closed(self) -> None:
        """Return when the HTTP server has stopped (it only stops on its own after an error)."""
        await asyncio.shield(self.serving)


def _plain(error: OSError) -> str:
    """The OS's words for ``error`` without socket.create_server's address suffix."""
    return str(error.strerror or error).split(" (while attempting", 1)[0]


@contextlib.asynccontextmanager
async def running_simulator(
    config: SimConfig, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[SimHandle]:
    """Serve a simulator on ``host:port`` (0 = any free port) for the duration of the block."""
    simulator = Simulator(config)
    server = EmbeddedServer(
        uvicorn.Config(
            simulator.app(),
            host=host,
            port=port,
            ws="websockets-sansio",
            # a load test on loopback: compressing every frame would cost both ends CPU for nothing
            ws_per_message_deflate=not config.firehose,
            ws_ping_interval=config.ping_interval,
            ws_ping_timeout=config.ping_interval * 3,
            lifespan="off",
            log_level="warning",
            timeout_graceful_shutdown=1,
        )
    )
    try:
        listening = socket.create_server((host, port))
    except OSError as error:
        raise CommandError(
            f"cannot listen on {host}:{port}: {_plain(error)} (--listen / KFEED_LISTEN)"
        ) from error
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    while not server.started:
        if serving.done():
            serving.result()  # re-raises why the server could not start
            raise RuntimeError("simulator server exited before starting")
        await asyncio.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    clock = asyncio.create_task(simulator.run_clock()) if config.auto_step else None
    try:
        yield SimHandle(simulator, f"http://{host}:{bound_port}", server, serving)
    finally:
        if clock is not None:
            clock.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await clock
        server.should_exit = True
        await serving
