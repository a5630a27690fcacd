"""Shared fixtures: a private registry, a real metrics server scraped over HTTP, options."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings
from prometheus_client import CollectorRegistry

from tests.helpers.scrape import Samples, scrape
from ws_monitoring import MetricsServer, start_metrics_server

# No timed assertions: hypothesis' default 200 ms per-example deadline fails property
# tests on a loaded 2-core machine (seen in the version matrix); speed lives in benchmarks/.
settings.register_profile("no-deadline", deadline=None)
settings.load_profile("no-deadline")


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
