"""Placeholder: completed by its own issue."""

from __future__ import annotations

from .config import Config
from .typing import Sink


def build_sink(config: Config) -> Sink | None:
    """No sink yet."""
    return None
