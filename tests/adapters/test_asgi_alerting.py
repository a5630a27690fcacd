"""Alerts from ASGI handler crashes: a real Alertmanager receives the aggregated crash
alert, a real sentry-sdk sends one event per crash to a local receiver."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.alerting.test_sink import prom_alerter
from tests.helpers.alertmanager import running_alertmanager
from tests.helpers.asgi import asgi_server
from tests.helpers.asgi_apps import fastapi_app
from tests.helpers.leak import ClosedCounter
from tests.helpers.sentry_receiver import SentryReceiver, reset_sentry, sentry_receiver
from tests.helpers.servers import async_wait_until
from ws_monitoring.alerting import SentryAlerter


async def crash(alerters: list[Any], paths: list[str], server: str = "uvicorn-sansio") -> None:
    """Crash one connection per path on a real FastAPI app; wait until all are closed."""
    closed = ClosedCounter()
    app = fastapi_app([], metrics=False, tracing=False, alerters=alerters, sinks=[closed])
    with asgi_server(app, server) as running:
        for path in paths:
            async with connect(running.url(path)) as client:
                await client.send("hi")
                assert await client.recv() == "hi"
                await client.send("crash")
                with contextlib.suppress(ConnectionClosed):
                    await client.recv()
        await async_wait_until(lambda: closed.closed == len(paths), what="closed connections")


async def test_crashes_become_one_aggregated_alertmanager_alert(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    with (
        running_alertmanager(tmp_path) as am,
        prom_alerter(am.url, registry, crash_quiet_period=3600) as prom,
    ):
        await crash([prom], ["/echo/1", "/echo/2"])
        assert prom.flush(5)
        alerts = am.alerts()
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert["labels"]["alertname"] == "WebSocketHandlerCrashes"
    assert alert["annotations"]["count"] == "2"
    assert alert["annotations"]["routes"] == "/echo/{room} (2)"
    assert alert["annotations"]["exception_types"] == "builtins.ValueError (2)"


@pytest.fixture
def receiver() -> Iterator[SentryReceiver]:
    with sentry_receiver() as running:
        yield running
    reset_sentry()


@pytest.mark.parametrize("server", ["uvicorn-sansio", "hypercorn"])
async def test_a_crash_is_one_sentry_event(
    server: str, receiver: SentryReceiver, registry: CollectorRegistry
) -> None:
    alerter = SentryAlerter(receiver.dsn, environment="test", registry=registry)
    await crash([alerter], ["/echo/9?token=secret"], server)
    events = await asyncio.to_thread(receiver.drain, alerter)
    # The server's own "Exception in ASGI application" log line, and sentry-sdk's
    # Starlette/FastAPI integrations, report the same exception: not a second event.
    assert len(events) == 1, events
    event = events[0]
    exception = event["exception"]["values"][-1]
    assert exception["type"] == "ValueError"
    assert exception["mechanism"]["type"] == "websockets"
    assert event["tags"]["websocket.route"] == "/echo/{room}"
    assert event["tags"]["websocket.close_code"] == "1011"
    assert "secret" not in str(event)
