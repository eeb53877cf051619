"""The web listener: uvicorn on the server's own event loop, serving :func:`build_web_app`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from kfeed_server.security import TlsFiles

log = logging.getLogger(__name__)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: `kfeed serve` owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(listen: str) -> socket.socket:
    host, separator, port = listen.rpartition(":")
    if not separator or not port.isdigit():
        raise ValueError(f"--web-listen must be HOST:PORT, not {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class WebListener:
    """Serves an ASGI app on HOST:PORT (port 0: any free port) until :meth:`stop`."""

    def __init__(self, app: ASGIApp, listen: str, tls: TlsFiles | None, grace: float) -> None:
        self._socket = _bind(listen)
        self.port: int = self._socket.getsockname()[1]
        self.scheme = "https" if tls else "http"
        host = listen.rpartition(":")[0]
        self.url = f"{self.scheme}://{host}:{self.port}/"
        self._server = _EmbeddedUvicorn(
            uvicorn.Config(
                app,
                lifespan="off",
                log_level="warning",
                # Live streams end when the hub closes; this bounds the wait for the rest.
                timeout_graceful_shutdown=max(1, round(grace)),
                ssl_certfile=str(tls.cert_file) if tls else None,
                ssl_keyfile=str(tls.key_file) if tls else None,
                ssl_ca_certs=str(tls.client_ca_file) if tls and tls.client_ca_file else None,
                # Mutual TLS like the gRPC listener when a client CA is configured.
                ssl_cert_reqs=(ssl.CERT_REQUIRED if tls and tls.client_ca_file else ssl.CERT_NONE),
            )
        )
        self._serving: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._serving = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._serving.done():
                self._serving.result()  # re-raises why it could not start
                raise RuntimeError("web listener exited before starting")
            await asyncio.sleep(0.01)
        log.info("dashboard and Connect/gRPC-Web on %s", self.url)

    async def stop(self) -> None:
        if self._serving is not None:
            self._server.should_exit = True
            await self._serving
        self._socket.close()
