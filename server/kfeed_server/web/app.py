"""The web listener's ASGI application: kfeed.v1 over Connect and gRPC-Web, and the dashboard.

Routes, by path:

- ``/kfeed.v1.MarketService/*``, ``/kfeed.v1.BacktestService/*`` — the RPCs (connectrpc, see
  :mod:`kfeed_server.web.bridge`);
- ``/metrics`` — the Prometheus exposition the dashboard's Status page reads (read role, like
  the RPCs);
- everything else — the built dashboard (``web/dist``), or a page saying how to build it.

CORS: the dashboard is served from the same origin as the RPCs and needs none. Other origins are
refused unless listed (``--web-cors-origins``); by default only loopback origins are allowed,
for a dashboard under development (``npm run dev``) next to a local server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from kfeed.v1 import (
    backtest_service_connect,
    backtest_service_pb2,
    backtest_service_pb2_grpc,
    market_service_connect,
    market_service_pb2,
    market_service_pb2_grpc,
)
from kfeed_server.security import AuthInterceptor
from kfeed_server.transport.errors import ApiError
from kfeed_server.web.bridge import connect_service
from kfeed_server.web.writes import BoundedWrites

# The dashboard's build output (`make web`), next to the sources in the repository.
DEFAULT_WEB_ROOT = Path(__file__).resolve().parents[3] / "web" / "dist"
LOOPBACK_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]+)?"
# What a Connect or gRPC-Web client sends and must be able to read across origins.
_CORS_REQUEST_HEADERS = (
    "authorization",
    "content-type",
    "connect-protocol-version",
    "connect-timeout-ms",
    "grpc-timeout",
    "x-grpc-web",
    "x-user-agent",
    "x-request-id",
)
_CORS_RESPONSE_HEADERS = (
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "x-request-id",
)
# How a refused /metrics scrape answers (the RPCs answer in their protocols' own way).
_HTTP_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
}
_NOT_BUILT = """<!doctype html><meta charset="utf-8"><title>kfeed</title>
<h1>kfeed</h1><p>The dashboard is not built. Run <code>make web</code> (or <code>make demo</code>)
and reload. The Connect and gRPC-Web endpoints are served here all the same.</p>"""


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The web listener: where, which origins may call it, and where the dashboard is."""

    listen: str
    # Origins allowed to call across origins; empty: loopback origins only.
    cors_origins: Sequence[str] = ()
    web_root: Path = field(default=DEFAULT_WEB_ROOT)


def _metrics_route(auth: AuthInterceptor) -> Route:
    async def metrics(request: Request) -> Response:
        try:
            # Same tokens and roles as reading markets over RPC.
            auth.admit(
                "/kfeed.v1.MarketService/ListMarkets",
                [(key.lower(), value) for key, value in request.headers.items()],
            )
        except ApiError as refusal:
            return JSONResponse(
                {"code": refusal.code.name.lower(), "message": refusal.message},
                status_code=_HTTP_STATUS.get(refusal.code, 403),
            )
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", metrics, methods=["GET"])


def build_web_app(
    config: WebConfig,
    market_servicer: market_service_pb2_grpc.MarketServiceServicer,
    backtest_servicer: backtest_service_pb2_grpc.BacktestServiceServicer,
    auth: AuthInterceptor,
    subscriber_idle_timeout: float,
) -> ASGIApp:
    """The ASGI application of the web listener (routes in the module docstring); every RPC
    response write waits at most ``subscriber_idle_timeout`` for the client to read."""
    market = market_service_connect.MarketServiceASGIApplication(
        cast(
            market_service_connect.MarketService,
            connect_service(
                market_servicer,
                market_service_pb2_grpc.MarketServiceServicer,
                market_service_pb2.DESCRIPTOR.services_by_name["MarketService"],
                market_service_connect.MarketService,
                auth,
            ),
        )
    )
    backtests = backtest_service_connect.BacktestServiceASGIApplication(
        cast(
            backtest_service_connect.BacktestService,
            connect_service(
                backtest_servicer,
                backtest_service_pb2_grpc.BacktestServiceServicer,
                backtest_service_pb2.DESCRIPTOR.services_by_name["BacktestService"],
                backtest_service_connect.BacktestService,
                auth,
            ),
        )
    )
    routes: list[Route | Mount] = [
        Mount(market.path, app=BoundedWrites(market, subscriber_idle_timeout)),
        Mount(backtests.path, app=BoundedWrites(backtests, subscriber_idle_timeout)),
        _metrics_route(auth),
    ]
    if (config.web_root / "index.html").is_file():
        routes.append(Mount("/", app=StaticFiles(directory=config.web_root, html=True)))
    else:
        routes.append(Route("/", lambda _: HTMLResponse(_NOT_BUILT), methods=["GET"]))
    cors = Middleware(
        CORSMiddleware,
        allow_origins=list(config.cors_origins),
        allow_origin_regex=None if config.cors_origins else LOOPBACK_ORIGINS,
        allow_methods=["GET", "POST"],
        allow_headers=list(_CORS_REQUEST_HEADERS),
        expose_headers=list(_CORS_RESPONSE_HEADERS),
        max_age=7200,
    )
    return Starlette(routes=routes, middleware=[cors])
