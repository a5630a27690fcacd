"""Prometheus metrics: the sink that aggregates records, its exposition and its HTTP server.

:mod:`~ws_monitoring.metrics.sink` sums the core's records at scrape time,
:mod:`~ws_monitoring.metrics.exposition` writes them as text or OpenMetrics,
:mod:`~ws_monitoring.metrics.server` serves ``/metrics`` from its own threads, and
:mod:`~ws_monitoring.metrics.multiprocess` publishes them in prometheus_client's
multiprocess mode.
"""

from __future__ import annotations

from .server import MetricsServer, MetricsServerError, start_metrics_server
from .sink import MetricsSink, Snapshot

__all__ = ["MetricsServer", "MetricsServerError", "MetricsSink", "Snapshot", "start_metrics_server"]
