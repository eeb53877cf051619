"""The Prometheus scrape endpoint: prometheus_client's HTTP server on its own thread.

A thread rather than the event loop, so a scrape never competes with RPCs for the loop and a
stalled event loop still shows up in the metrics it stops updating.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.registry import CollectorRegistry


class MetricsEndpoint:
    """Serves ``/metrics`` on ``HOST:PORT`` (port 0: any free port; see :attr:`port`)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @classmethod
    def start(cls, listen: str, registry: CollectorRegistry = REGISTRY) -> MetricsEndpoint:
        host, separator, port = listen.rpartition(":")
        if not separator or not port.isdigit():
            raise ValueError(f"--metrics-listen must be HOST:PORT, not {listen!r}")
        server, thread = start_http_server(int(port), host.strip("[]") or "0.0.0.0", registry)
        return cls(server, thread)

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
