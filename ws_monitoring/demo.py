"""The demo behind ``ws-monitoring demo``: an instrumented chat server and synthetic clients.

The clients exercise every metric: text and binary messages, broadcasts, handler
crashes (1011), oversized messages (1009), abrupt disconnects (1006), application close
codes (4xxx), rejected handshakes (404, 401) and keepalive pings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response

from .adapters.instrument import serve
from .metrics.server import start_metrics_server

__all__ = ["run_demo"]

ROUTES = ["/echo", "/chat/{room}"]
MAX_SIZE = 64 * 1024


async def _chat_handler(ws: ServerConnection, rooms: dict[str, set[ServerConnection]]) -> None:
    path = ws.request.path if ws.request else "/"
    if path.startswith("/echo"):
        async for message in ws:
            if message == "crash":
                raise RuntimeError("demo: the handler crashed on purpose")
            await ws.send(message)
        return
    room = rooms.setdefault(path, set())
    room.add(ws)
    try:
        async for message in ws:
            if message == "crash":
                raise RuntimeError("demo: the chat handler crashed on purpose")
            broadcast(room, message)
    finally:
        room.discard(ws)


def _process_request(ws: ServerConnection, request: Request) -> Response | None:
    path = request.path.split("?", 1)[0]
    if path == "/private":
        return ws.respond(401, "Unauthorized\n")
    if not (path == "/echo" or path.startswith("/chat/")):
        return ws.respond(404, "Not Found\n")
    return None


async def _abrupt_disconnect(url: str) -> None:
    """Open a connection, then reset TCP mid-frame: the server sees 1006."""
    async with connect(url) as client:
        sock = client.transport.get_extra_info("socket")
        await client.send("about to vanish")
        await client.recv()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.transport.abort()


async def _client_session(base: str, rng: random.Random) -> None:
    kind = rng.random()
    try:
        if kind < 0.45:
            async with connect(f"{base}/echo") as client:
                for _ in range(rng.randint(3, 20)):
                    if rng.random() < 0.5:
                        await client.send(json.dumps({"n": rng.random()}))
                    else:
                        await client.send(rng.randbytes(rng.choice([16, 300, 5000, 40000])))
                    await client.recv()
                if rng.random() < 0.1:
                    await client.send("crash")
                    await client.wait_closed()
        elif kind < 0.75:
            room = rng.choice(["lobby", "random", "dev"])
            async with connect(f"{base}/chat/{room}") as client:
                for _ in range(rng.randint(2, 10)):
                    await client.send(f"hello from {room}")
                    await asyncio.sleep(rng.random() * 0.2)
                code = 4000 + rng.randint(0, 99) if rng.random() < 0.2 else 1000
                await client.close(code)
        elif kind < 0.83:
            await _abrupt_disconnect(f"{base}/echo")
        elif kind < 0.90:
            async with connect(f"{base}/echo", max_size=None) as client:
                await client.send(b"x" * (MAX_SIZE + 1))
                await client.wait_closed()
        else:
            with contextlib.suppress(InvalidStatus):
                async with connect(f"{base}/{rng.choice(['private', 'nope'])}"):
                    pass
    except (ConnectionClosed, OSError):
        pass


async def _listener(url: str, stop: asyncio.Event) -> None:
    """A long-lived chat member: receives broadcasts and answers keepalive pings (RTT)."""
    with contextlib.suppress(ConnectionClosed, OSError):
        async with connect(url) as client:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(client.recv(), 0.5)


async def _clients(base: str, stop: asyncio.Event, rng: random.Random) -> None:
    while not stop.is_set():
        await asyncio.gather(*(_client_session(base, rng) for _ in range(4)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.3)


async def run_demo(
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    metrics_host: str = "127.0.0.1",
    metrics_port: int = 8001,
    duration: float | None = None,
    clients: bool = True,
    print_fn: Callable[[str], object] = print,
    ready: Callable[[int, int], Awaitable[None] | None] | None = None,
    alerters: Sequence[Any] = (),
) -> None:
    """Run the demo until cancelled or for ``duration`` seconds.

    Raises:
        ws_monitoring.MetricsServerError: the metrics port is taken.
        OSError: the WebSocket port is taken.
    """
    rooms: dict[str, set[ServerConnection]] = {}

    async def handler(ws: ServerConnection) -> None:
        await _chat_handler(ws, rooms)

    with start_metrics_server(metrics_port, metrics_host, alerters=alerters) as metrics:
        async with serve(
            handler,
            host,
            port,
            alerters=alerters,
            routes=ROUTES,
            max_size=MAX_SIZE,
            ping_interval=2,
            process_request=_process_request,
        ) as server:
            ws_port = server.sockets[0].getsockname()[1]
            shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
            print_fn(
                f"WebSocket server: ws://{shown}:{ws_port}/echo and ws://{shown}:{ws_port}/chat/<room>"
            )
            print_fn(f"Health check:     http://{shown}:{ws_port}/healthz")
            print_fn(f"Metrics:          {metrics.url}")
            print_fn(
                "Press Ctrl-C to stop." if duration is None else f"Running for {duration:g} s."
            )
            if ready is not None:
                result = ready(ws_port, metrics.port)
                if result is not None:
                    await result
            stop = asyncio.Event()
            tasks = []
            if clients:
                rng = random.Random(8765)
                base = f"ws://{shown}:{ws_port}"
                tasks.append(asyncio.create_task(_clients(base, stop, rng)))
                tasks.append(asyncio.create_task(_listener(f"{base}/chat/lobby", stop)))
            started = time.monotonic()
            try:
                if duration is None:
                    await asyncio.Event().wait()
                else:
                    await asyncio.sleep(max(0.0, duration - (time.monotonic() - started)))
            finally:
                stop.set()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait_for(task, 10)
