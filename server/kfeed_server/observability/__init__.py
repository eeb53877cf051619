"""What kfeed tells operators: Prometheus metrics, their scrape endpoint, the access log."""

from kfeed_server.observability.endpoint import MetricsEndpoint
from kfeed_server.observability.interceptor import CallObservation, ObservabilityInterceptor
from kfeed_server.observability.metrics import (
    record_refused_batch,
    record_stored_batch,
    running_backtest,
    watch_hub,
)

__all__ = [
    "CallObservation",
    "MetricsEndpoint",
    "ObservabilityInterceptor",
    "record_refused_batch",
    "record_stored_batch",
    "running_backtest",
    "watch_hub",
]
