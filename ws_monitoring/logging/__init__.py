"""Logging: set-up, formatters, the lifecycle log sink, and the application's integration.

:mod:`~ws_monitoring.logging.setup` (``setup_logging``, handlers, the background
queue), :mod:`~ws_monitoring.logging.formatters` (JSON, ECS, text),
:mod:`~ws_monitoring.logging.lifecycle` (connection opened/closed, handshake and crash
records) and :mod:`~ws_monitoring.logging.context` (the connection's fields on the
application's own records: :class:`ConnectionContextFilter` for a stdlib formatter,
:func:`add_connection_context` for structlog).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import (
        CONNECTION_FIELDS,
        EVENT_FIELDS,
        ConnectionContextFilter,
        add_connection_context,
    )
    from .setup import LoggingSetup, setup_logging

__all__ = [
    "CONNECTION_FIELDS",
    "EVENT_FIELDS",
    "ConnectionContextFilter",
    "LoggingSetup",
    "add_connection_context",
    "setup_logging",
]

_MODULES = {
    "CONNECTION_FIELDS": "context",
    "EVENT_FIELDS": "context",
    "ConnectionContextFilter": "context",
    "add_connection_context": "context",
    "LoggingSetup": "setup",
    "setup_logging": "setup",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
