"""kfeed's Prometheus metrics, and the hooks the rest of the server calls to update them.

gRPC metrics follow go-grpc-prometheus's names and labels (``grpc_server_handled_total`` …) so
existing dashboards and alerts work unchanged. Metrics live in prometheus_client's default
registry, the usual process-wide idiom: one server per process in production; tests compare
values before and after.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from operator import attrgetter

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kfeed_server.db.repositories.ingest import BatchWriteResult
from kfeed_server.streaming.hub import SnapshotHub

_GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _GRPC_LABELS)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    (*_GRPC_LABELS, "grpc_code"),
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its status (streams: their whole life).",
    _GRPC_LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600),
)
INGEST_BATCHES = Counter(
    "kfeed_ingest_batches_total",
    "Ingest batches answered, by outcome (stored: committed and acked; refused: invalid).",
    ("outcome",),
)
INGEST_ROWS_REFUSED = Counter(
    "kfeed_ingest_rows_refused_total",
    "Rows of stored batches refused as invalid (docs/INGEST_RULES.md), by PublishRequest field.",
    ("field",),
)
SNAPSHOTS_STORED = Counter(
    "kfeed_snapshots_stored_total", "Market snapshots committed (duplicates not counted)."
)
TRADES_STORED = Counter("kfeed_trades_stored_total", "Public trades committed.")
FEED_GAPS = Counter(
    "kfeed_feed_gaps_total",
    "Feed sequence-gap reports stored, by whether the gap was recovered.",
    ("recovered",),
)
INGEST_LAG_SECONDS = Histogram(
    "kfeed_ingest_lag_seconds",
    "From the earliest receive_time at the ingest of a stored batch's snapshots to the batch's"
    " commit on the server: one observation per batch with snapshots.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)
BACKTESTS_RUNNING = Gauge("kfeed_backtests_running", "Backtests currently running.")

_receive_time = attrgetter("receive_time")


def record_stored_batch(result: BatchWriteResult, committed_at: datetime | None = None) -> None:
    """Hook: an ingest batch was committed (call right after the commit)."""
    committed_at = committed_at or datetime.now(UTC)
    INGEST_BATCHES.labels("stored").inc()
    SNAPSHOTS_STORED.inc(result.counts.snapshots)
    TRADES_STORED.inc(result.counts.trades)
    if result.stored_snapshots:
        # The batch's worst lag, once: its rows commit together, and an observation per row
        # cost ≈6 ms of a 5,000-row batch's ≈100 ms on the server.
        earliest = min(map(_receive_time, result.stored_snapshots))
        INGEST_LAG_SECONDS.observe(max(0.0, (committed_at - earliest).total_seconds()))
    for gap in result.stored_gaps:
        FEED_GAPS.labels("true" if gap.recovered else "false").inc()


def record_refused_batch() -> None:
    """Hook: an ingest batch was refused as invalid."""
    INGEST_BATCHES.labels("refused").inc()


def record_refused_rows(by_field: Mapping[str, int]) -> None:
    """Hook: rows of an otherwise stored ingest batch were refused as invalid."""
    for field, count in by_field.items():
        INGEST_ROWS_REFUSED.labels(field).inc(count)


@contextmanager
def running_backtest() -> Iterator[None]:
    """Hook: wrap a backtest's run so ``kfeed_backtests_running`` counts it while it runs."""
    BACKTESTS_RUNNING.inc()
    try:
        yield
    finally:
        BACKTESTS_RUNNING.dec()


class _StreamHubCollector(Collector):
    """Reads subscriber counts and queue depths from the live hubs at scrape time."""

    def __init__(self) -> None:
        self.hubs: weakref.WeakSet[SnapshotHub] = weakref.WeakSet()

    def collect(self) -> Iterable[Metric]:
        hubs = list(self.hubs)
        depths = [depth for hub in hubs for depth in hub.queue_depths]
        peaks = [peak for hub in hubs for peak in hub.take_peak_depths()]
        subscribers = GaugeMetricFamily(
            "kfeed_stream_subscribers", "Live stream subscriptions (snapshots and trades)."
        )
        subscribers.add_metric([], sum(hub.subscriber_count for hub in hubs))
        queued = GaugeMetricFamily(
            "kfeed_stream_queued_items", "Items waiting in all subscribers' queues."
        )
        queued.add_metric([], sum(depths))
        # The high-water mark since the previous scrape, so an overflow (which empties the
        # queue it fills) still shows at the depth it reached.
        deepest = GaugeMetricFamily(
            "kfeed_stream_queue_depth_max",
            "Deepest subscriber queue since the previous scrape (an overflow counts with the "
            "depth it reached).",
        )
        deepest.add_metric([], max(peaks, default=0))
        return [subscribers, queued, deepest]


_HUB_COLLECTOR = _StreamHubCollector()
REGISTRY.register(_HUB_COLLECTOR)


def watch_hub(hub: SnapshotHub) -> None:
    """Hook: report ``hub``'s subscribers and queues (until the hub is garbage-collected)."""
    _HUB_COLLECTOR.hubs.add(hub)
