"""ASGI: ``MonitoringMiddleware`` for FastAPI, Starlette, Quart and any ASGI 3 application.

The implementation is :mod:`ws_monitoring.adapters.asgi`; the README's "ASGI (FastAPI,
Starlette, Quart)" section shows how to use it.
"""

from __future__ import annotations

from .adapters.asgi import MonitoringMiddleware, route_template

__all__ = ["MonitoringMiddleware", "route_template"]
