"""Locating real external programs for the tests (Prometheus, Alertmanager, promtool...)."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_binary(name: str, package: str) -> str:
    """Path of ``name``; skips the test when missing, but fails it under ``CI=true``."""
    path = shutil.which(name)
    if path is None:
        message = (
            f"{name} not found: install the Debian package {package!r} (make test does as root)"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
