"""Deprecated import path, kept for existing code: use ``ws_monitoring.tracer`` and
``ws_monitoring.setup_tracing`` (documented in :mod:`ws_monitoring.tracing.setup`)."""

from __future__ import annotations

from .tracing.setup import setup_tracing, tracer

__all__ = ["setup_tracing", "tracer"]
