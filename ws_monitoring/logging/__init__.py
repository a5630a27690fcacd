"""Logging: set-up, formatters and the lifecycle log sink.

:mod:`~ws_monitoring.logging.setup` (``setup_logging``, handlers, the background
queue), :mod:`~ws_monitoring.logging.formatters` (JSON, ECS, text) and
:mod:`~ws_monitoring.logging.lifecycle` (connection opened/closed, handshake and crash
records).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .setup import setup_logging

__all__ = ["setup_logging"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(f"{__name__}.setup"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
