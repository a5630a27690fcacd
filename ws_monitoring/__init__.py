"""ws-monitoring: metrics, traces, logs and alerts for ``websockets`` servers.

Names that need an optional extra (``[tracing]``, ``[logging]``, ``[sentry]``,
``[alertmanager]``) are imported on first use, so a metrics-only install loads none of
those dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import Config
from .instrument import instrument, serve, serve_sync
from .metrics_server import MetricsServer, MetricsServerError, start_metrics_server
from .privacy import Consent, grant, grant_user, withdraw, withdraw_user

if TYPE_CHECKING:
    from .alerting import (
        PrometheusAlerter,
        SentryAlerter,
        ServerWatchdog,
        WebsocketsIntegration,
        fire_all,
        watch_server,
    )
    from .logging_config import setup_logging
    from .opentelemetry_tracing import setup_tracing, tracer

__all__ = [
    "Config",
    "Consent",
    "MetricsServer",
    "MetricsServerError",
    "PrometheusAlerter",
    "SentryAlerter",
    "ServerWatchdog",
    "WebsocketsIntegration",
    "fire_all",
    "grant",
    "grant_user",
    "instrument",
    "serve",
    "serve_sync",
    "setup_logging",
    "setup_tracing",
    "start_metrics_server",
    "tracer",
    "watch_server",
    "withdraw",
    "withdraw_user",
]

__version__ = "0.1.0"

_LAZY = {
    "PrometheusAlerter": "alerting",
    "SentryAlerter": "alerting",
    "ServerWatchdog": "alerting",
    "WebsocketsIntegration": "alerting",
    "fire_all": "alerting",
    "watch_server": "alerting",
    "setup_logging": "logging_config",
    "setup_tracing": "opentelemetry_tracing",
    "tracer": "opentelemetry_tracing",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
