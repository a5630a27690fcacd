"""Entry points: the three ways to call instrument(), errors, and monitor assembly."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.sync.client import connect as sync_connect
from websockets.sync.server import ServerConnection as SyncServerConnection

import ws_monitoring
from tests.helpers.scrape import Samples, scrape
from tests.helpers.servers import async_server, settled, settled_sync, sync_server
from ws_monitoring.adapters.instrument import build_monitor
from ws_monitoring.config import Config
from ws_monitoring.core import ConnectionRecord, HandshakeRecord, Monitor
from ws_monitoring.metrics import MetricsSink


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


def sync_echo(ws: SyncServerConnection) -> None:
    ws.send("ready")  # the client waits for it: the handler is hooked by then
    for message in ws:
        ws.send(message)


async def exchange(url: str) -> None:
    async with connect(url) as client:
        await client.send("one")
        assert await client.recv() == "one"
        await client.send(b"two")
        assert await client.recv() == b"two"


def exchange_sync(url: str) -> None:
    """:func:`exchange` with the threading client, after ``sync_echo``'s greeting."""
    with sync_connect(url) as client:
        assert client.recv() == "ready"
        client.send("one")
        assert client.recv() == "one"
        client.send(b"two")
        assert client.recv() == b"two"


def assert_echo_counted(samples: Samples, route: str = "/", handshakes: float | None = 0) -> None:
    def messages(direction: str, kind: str) -> float | None:
        return samples.get("websocket_messages_total", route=route, direction=direction, type=kind)

    assert samples["websocket_connections_total", {"route": route}] == 1
    assert messages("received", "text") == 1
    assert messages("received", "binary") == 1
    assert messages("sent", "binary") == 1
    assert samples["websocket_disconnections_total", {"route": route, "code": "1000"}] == 1
    # Only ws_monitoring.serve sees handshakes; instrument() alone starts at the handler.
    if handshakes is not None:
        assert samples["websocket_handshake_duration_seconds_count"] == handshakes


async def test_instrument_as_a_plain_decorator() -> None:
    @ws_monitoring.instrument
    async def handler(ws: ServerConnection) -> None:
        await echo(ws)

    assert handler.__name__ == "handler"
    assert isinstance(handler.__ws_monitoring__, Monitor)  # type: ignore[attr-defined]
    assert handler.__ws_monitoring__.config == Config()  # type: ignore[attr-defined]
    # Without options it counts into prometheus_client's default registry, which
    # outlives this test: the route is unique to it.
    with ws_monitoring.start_metrics_server(0, "127.0.0.1") as metrics:
        async with async_server(handler, monitoring={}) as srv:
            await exchange(srv.url("/plain-decorator"))
        samples = scrape(metrics.url)
    assert_echo_counted(samples, route="/plain-decorator", handshakes=None)


async def test_instrument_as_a_decorator_with_options(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    @ws_monitoring.instrument(registry=registry, routes=["/rooms/{id}"])
    async def handler(ws: ServerConnection) -> None:
        await echo(ws)

    # Given to websockets' own serve: no handshake hooks, everything else counted.
    import websockets.asyncio.server

    async with websockets.asyncio.server.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        await exchange(f"ws://127.0.0.1:{port}/rooms/7")
        samples = await settled(scrape_metrics, 1)
    assert_echo_counted(samples, route="/rooms/{id}")


async def test_instrument_called_with_the_handler(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    handler = ws_monitoring.instrument(echo, registry=registry)
    assert handler.__wrapped__ is echo  # type: ignore[attr-defined]
    async with async_server(handler, monitoring={}) as srv:
        await exchange(srv.url("/x"))
        samples = await settled(scrape_metrics, 1)
    # ws_monitoring.serve reuses the handler's monitor, handshake hooks included.
    assert_echo_counted(samples, route="/x", handshakes=1)


async def test_instrument_an_object_with_async_call(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    class Handler:
        async def __call__(self, ws: ServerConnection) -> None:
            await echo(ws)

    handler = ws_monitoring.instrument(Handler(), registry=registry)
    partial = ws_monitoring.instrument(functools.partial(echo), registry=registry)
    for instrumented in (handler, partial):
        async with async_server(instrumented, monitoring={}) as srv:
            await exchange(srv.url("/obj"))
    samples = await settled(scrape_metrics, 2)
    assert samples["websocket_connections_total", {"route": "/obj"}] == 2
    assert samples.total("websocket_messages_total", direction="received") == 4


def test_instrument_a_sync_handler_for_websockets_sync_serve(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    handler = ws_monitoring.instrument(sync_echo, registry=registry)
    with sync_server(handler) as srv:
        exchange_sync(srv.url("/sync"))
    samples = settled_sync(scrape_metrics, 1)
    assert_echo_counted(samples, route="/sync")
    sent = {"route": "/sync", "direction": "sent", "type": "text"}
    assert samples["websocket_messages_total", sent] == 2


def test_double_instrumentation_raises() -> None:
    once = ws_monitoring.instrument(echo, registry=CollectorRegistry())
    with pytest.raises(TypeError, match="already instrumented"):
        ws_monitoring.instrument(once)
    with pytest.raises(TypeError, match="already instrumented"):
        ws_monitoring.instrument(registry=CollectorRegistry())(once)


def test_options_twice_raise() -> None:
    once = ws_monitoring.instrument(echo, registry=CollectorRegistry())
    with pytest.raises(TypeError, match=r"not both \(got health_path, routes\)"):
        ws_monitoring.serve(once, "127.0.0.1", 0, routes=["/x"], health_path=None)
    sync_once = ws_monitoring.instrument(sync_echo, registry=CollectorRegistry())
    with pytest.raises(TypeError, match="not both"):
        ws_monitoring.serve_sync(sync_once, "127.0.0.1", 0, max_routes=3)


@pytest.mark.parametrize(
    "call",
    [
        lambda: ws_monitoring.instrument(echo, colour="blue"),
        lambda: ws_monitoring.instrument(colour="blue"),
    ],
    ids=["direct", "decorator"],
)
def test_unknown_option_raises_type_error(call: Callable[[], Any]) -> None:
    with pytest.raises(TypeError, match="unknown ws_monitoring option\\(s\\): colour"):
        call()


async def test_serve_passes_unknown_keywords_to_websockets() -> None:
    # What is not a ws_monitoring option goes to websockets' serve, which refuses it.
    with pytest.raises(TypeError, match="colour"):
        async with ws_monitoring.serve(echo, "127.0.0.1", 0, colour="blue"):
            pass


def test_invalid_option_value_raises_value_error() -> None:
    with pytest.raises(ValueError, match="max_routes"):
        ws_monitoring.instrument(echo, max_routes=0)


def test_not_a_handler_raises() -> None:
    with pytest.raises(TypeError, match="expected a connection handler, got 42"):
        ws_monitoring.instrument(42)  # type: ignore[call-overload]


# -- build_monitor -----------------------------------------------------------------------------


class ExtraSink:
    def handshake_finished(self, handshake: HandshakeRecord) -> None: ...
    def connection_opened(self, connection: ConnectionRecord) -> None: ...
    def handler_failed(self, connection: ConnectionRecord, exc: BaseException) -> None: ...
    def connection_closed(self, connection: ConnectionRecord) -> None: ...
    def shutdown(self, timeout: float) -> None: ...


def test_build_monitor_puts_metrics_first_and_extra_sinks_last() -> None:
    extra = ExtraSink()
    registry = CollectorRegistry()
    monitor = build_monitor(Config(registry=registry, sinks=[extra]))
    assert isinstance(monitor.sinks[0], MetricsSink)
    assert monitor.sinks[-1] is extra
    # The same registry and namespace share one collector.
    again = build_monitor(Config(registry=registry))
    assert again.sinks[0] is monitor.sinks[0]


def test_build_monitor_without_metrics() -> None:
    extra = ExtraSink()
    monitor = build_monitor(
        Config(metrics=False, tracing=False, log_lifecycle=False, sinks=[extra])
    )
    assert not any(isinstance(s, MetricsSink) for s in monitor.sinks)
    assert monitor.sinks[-1] is extra


def test_serve_sync_accepts_an_instrumented_handler(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    handler = ws_monitoring.instrument(sync_echo, registry=registry)
    with sync_server(handler, monitoring={}) as srv:
        exchange_sync(srv.url("/s"))
    samples = settled_sync(scrape_metrics, 1)
    assert_echo_counted(samples, route="/s", handshakes=1)
