"""Deprecated import path, kept for existing code: use ``ws_monitoring.setup_logging``."""

from __future__ import annotations

from .logging.setup import setup_logging

__all__ = ["setup_logging"]
