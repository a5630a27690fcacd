"""Deprecated import path, kept for existing code: use ``ws_monitoring.setup_logging``
(and :mod:`ws_monitoring.logging` for the rest)."""

from __future__ import annotations

from .logging.context import current_connection
from .logging.formatters import ECS_VERSION, FORMATS
from .logging.setup import LoggingSetup, setup_logging

__all__ = ["ECS_VERSION", "FORMATS", "LoggingSetup", "current_connection", "setup_logging"]
