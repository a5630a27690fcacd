"""End-to-end smoke: one instrumented asyncio server, one client, one scrape."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect

from tests.helpers.scrape import Samples
from ws_monitoring import serve


async def test_echo_is_counted(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    async def echo(ws):  # type: ignore[no-untyped-def]
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0, registry=registry) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/echo?secret=1") as client:
            await client.send("hello")
            assert await client.recv() == "hello"
    samples = scrape_metrics()
    labels = {"route": "/echo", "direction": "received", "type": "text"}
    assert samples["websocket_messages_total", labels] == 1
    assert samples["websocket_connections_total", {"route": "/echo"}] == 1
    assert samples["websocket_disconnections_total", {"route": "/echo", "code": "1000"}] == 1
