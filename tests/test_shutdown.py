"""Closing a server made by ws_monitoring.serve/serve_sync flushes every sink once."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.sync.client import connect as sync_connect

import ws_monitoring
from tests.helpers.leak import ClosedCounter


class FlushRecorder(ClosedCounter):
    """A sink that also records its shutdown calls (and from which thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.shutdowns: list[tuple[float, str]] = []

    def shutdown(self, timeout: float) -> None:
        self.shutdowns.append((timeout, threading.current_thread().name))


async def test_async_server_close_flushes_sinks(registry: CollectorRegistry) -> None:
    sink = FlushRecorder()

    async def echo(ws):  # type: ignore[no-untyped-def]
        async for message in ws:
            await ws.send(message)

    async with ws_monitoring.serve(echo, "127.0.0.1", 0, registry=registry, sinks=[sink]) as srv:
        port = srv.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/") as client:
            await client.send("x")
            await client.recv()
        assert sink.shutdowns == []
    assert sink.closed == 1
    ((timeout, thread),) = sink.shutdowns
    assert timeout > 0
    # Flushing may wait on the network: never on the event loop's thread.
    assert thread != threading.main_thread().name


def test_sync_server_close_flushes_sinks(registry: CollectorRegistry) -> None:
    sink = FlushRecorder()

    def echo(ws):  # type: ignore[no-untyped-def]
        for message in ws:
            ws.send(message)

    with ws_monitoring.serve_sync(echo, "127.0.0.1", 0, registry=registry, sinks=[sink]) as srv:
        thread = threading.Thread(target=srv.serve_forever)
        thread.start()
        port = srv.socket.getsockname()[1]
        with sync_connect(f"ws://127.0.0.1:{port}/") as client:
            client.send("x")
            client.recv()
    thread.join(10)
    assert not thread.is_alive()
    assert len(sink.shutdowns) == 1
