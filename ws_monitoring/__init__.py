"""ws-monitoring: metrics, traces, logs and alerts for ``websockets`` servers."""

from __future__ import annotations

from .config import Config
from .instrument import instrument, serve, serve_sync
from .metrics_server import MetricsServer, MetricsServerError, start_metrics_server

__all__ = [
    "Config",
    "MetricsServer",
    "MetricsServerError",
    "instrument",
    "serve",
    "serve_sync",
    "start_metrics_server",
]

__version__ = "0.1.0"
