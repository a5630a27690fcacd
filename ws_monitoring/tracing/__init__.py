"""OpenTelemetry tracing: set-up, the tracing sink and the OTLP exporter.

:mod:`~ws_monitoring.tracing.setup` (``setup_tracing``, ``tracer``),
:mod:`~ws_monitoring.tracing.sink` (spans from connection events) and
:mod:`~ws_monitoring.tracing.export` (the OTLP encoder and its export thread). Nothing
here is imported until used, so a metrics-only install never loads OpenTelemetry.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .setup import setup_tracing, tracer

__all__ = ["setup_tracing", "tracer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(f"{__name__}.setup"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
