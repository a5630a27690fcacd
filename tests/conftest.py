"""Shared fixtures: a private registry, a real metrics server scraped over HTTP, options."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings
from prometheus_client import CollectorRegistry

from tests.helpers.scrape import Samples, scrape
from ws_monitoring import MetricsServer, start_metrics_server

# Tests check correctness, not speed: no per-example deadline, which a loaded 2-core
# machine (CI, the coverage tracer, a subprocess suite) would trip by chance.
settings.register_profile("ws_monitoring", deadline=None)
settings.load_profile("ws_monitoring")


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh registry per test, so counts start at zero."""
    return CollectorRegistry()


@pytest.fixture
def metrics_server(registry: CollectorRegistry) -> Iterator[MetricsServer]:
    """A real metrics HTTP server for ``registry`` on a free loopback port."""
    with start_metrics_server(0, "127.0.0.1", registry=registry) as server:
        yield server


@pytest.fixture
def scrape_metrics(metrics_server: MetricsServer) -> Callable[[], Samples]:
    """Scrape ``metrics_server`` over HTTP: ``scrape_metrics().get(name, **labels)``."""
    return lambda: scrape(metrics_server.url)


@pytest.fixture
def monitoring(registry: CollectorRegistry) -> dict[str, Any]:
    """ws_monitoring options counting into ``registry``, for ``tests.helpers.servers``."""
    return {"registry": registry}
