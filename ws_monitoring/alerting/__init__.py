"""Alerting: critical failures to Sentry and Alertmanager, never in the way.

:class:`SentryAlerter` (the ``[sentry]`` extra) and :class:`PrometheusAlerter` (the
``[alertmanager]`` extra) are imported on first use, so a metrics-only install loads
neither dependency. The shared worker, fan-out and self-metrics live in
:mod:`ws_monitoring.alerting.sink`; :func:`watch_server` in
:mod:`ws_monitoring.alerting.watchdog`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .alertmanager import PrometheusAlerter
    from .sentry import SentryAlerter
    from .watchdog import watch_server

__all__ = ["PrometheusAlerter", "SentryAlerter", "watch_server"]

_LAZY = {
    "PrometheusAlerter": "alertmanager",
    "SentryAlerter": "sentry",
    "WebsocketsIntegration": "sentry",
    "ServerWatchdog": "watchdog",
    "watch_server": "watchdog",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
