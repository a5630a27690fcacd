"""ws-monitoring: metrics, traces, logs and alerts for ``websockets`` servers.

Names that need an optional extra (``[tracing]``, ``[logging]``, ``[sentry]``,
``[alertmanager]``) are imported on first use, so a metrics-only install loads none of
those dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .adapters.instrument import instrument, serve, serve_sync
from .config import Config
from .consent import grant, grant_user, withdraw, withdraw_user
from .metrics.server import MetricsServer, MetricsServerError, start_metrics_server
from .privacy import Consent

if TYPE_CHECKING:
    from .alerting.alertmanager import PrometheusAlerter
    from .alerting.sentry import SentryAlerter
    from .alerting.watchdog import watch_server
    from .logging.setup import setup_logging
    from .tracing.setup import setup_tracing, tracer

__all__ = [
    "Config",
    "Consent",
    "MetricsServer",
    "MetricsServerError",
    "PrometheusAlerter",
    "SentryAlerter",
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
    "PrometheusAlerter": "alerting.alertmanager",
    "SentryAlerter": "alerting.sentry",
    "watch_server": "alerting.watchdog",
    "setup_logging": "logging.setup",
    "setup_tracing": "tracing.setup",
    "tracer": "tracing.setup",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
