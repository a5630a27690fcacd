"""Builds the optional C speedups; everything else is in pyproject.toml.

The extension is optional, as in websockets: without a C compiler the package installs
and runs in pure Python. ``WS_MONITORING_REQUIRE_SPEEDUPS=1`` makes a failed build an
error (CI sets it, so a broken build cannot hide behind the fallback).
"""

import os

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ws_monitoring._speedups",
            sources=["ws_monitoring/_speedups.c"],
            optional=not os.environ.get("WS_MONITORING_REQUIRE_SPEEDUPS"),
        )
    ]
)
