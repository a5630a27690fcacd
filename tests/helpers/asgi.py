"""Real ASGI servers for the tests: uvicorn (three WebSocket implementations) and hypercorn.

Each server runs in this process, on a thread with its own event loop (so coverage sees
the adapter), on a loopback socket that is bound and listening before the server starts:
no port race, and clients may connect at once. Logs go to the standard ``logging``
loggers (``uvicorn.error``, ``hypercorn.error``); neither server configures logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

from tests.helpers.servers import HOST, wait_until

#: uvicorn's ``ws=`` implementations (``websockets`` is its legacy-API one), and hypercorn.
SERVERS = ("uvicorn-websockets", "uvicorn-sansio", "uvicorn-wsproto", "hypercorn")
_UVICORN_WS = {
    "uvicorn-websockets": "websockets",
    "uvicorn-sansio": "websockets-sansio",
    "uvicorn-wsproto": "wsproto",
}
#: Headers that differ between two runs of the same request.
VOLATILE_HEADERS = frozenset({"date"})


def upgrade_request(path: str) -> bytes:
    """A WebSocket opening handshake request for ``path``, as bytes on the wire."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class RunningASGI:
    """A running ASGI server: ``host``, ``port``, ``url(path)`` (ws://), ``get(path)`` (HTTP)."""

    def __init__(self, server: str, port: int) -> None:
        self.server = server
        self.host = HOST
        self.port = port

    def url(self, path: str = "/") -> str:
        return f"ws://{HOST}:{self.port}{path}"

    def get(
        self, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """GET ``path``: (status, headers but ``VOLATILE_HEADERS``, body)."""
        connection = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            connection.request("GET", path, headers=headers or {})
            response = connection.getresponse()
            kept = [(k.lower(), v) for k, v in response.getheaders()]
            kept = [(k, v) for k, v in kept if k not in VOLATILE_HEADERS]
            return response.status, kept, response.read()
        finally:
            connection.close()


def _listening() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(128)
    return sock


@contextlib.contextmanager
def _uvicorn(
    app: Any, ws: str, sock: socket.socket, lifespan: bool, options: dict[str, Any]
) -> Iterator[None]:
    import uvicorn

    config = uvicorn.Config(
        app,
        ws=ws,  # type: ignore[arg-type]
        http="h11",
        loop="asyncio",
        lifespan="on" if lifespan else "off",
        log_config=None,
        access_log=False,
        **options,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), what="uvicorn started")
        assert server.started, "uvicorn did not start"
        yield
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "uvicorn did not stop"


@contextlib.contextmanager
def _hypercorn(app: Any, sock: socket.socket) -> Iterator[None]:
    import logging

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    # hypercorn closes the descriptor it serves: give it its own.
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = None
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve(app, config, shutdown_trigger=stop.wait))
        finally:
            loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        assert not thread.is_alive(), "hypercorn did not stop"


@contextlib.contextmanager
def asgi_server(
    app: Any, server: str, *, lifespan: bool = False, **uvicorn_options: Any
) -> Iterator[RunningASGI]:
    """Serve ``app`` with ``server`` (one of :data:`SERVERS`) until the block ends.

    Leaving the block stops the server, which waits for every connection's application
    call: what the application saw is complete then. hypercorn always runs the lifespan
    protocol; uvicorn only with ``lifespan=True``. ``uvicorn_options``: more
    ``uvicorn.Config`` arguments (``ws_max_size``...).
    """
    sock = _listening()
    try:
        if server == "hypercorn":
            cm = _hypercorn(app, sock)
        else:
            cm = _uvicorn(app, _UVICORN_WS[server], sock, lifespan, uvicorn_options)
        with cm:
            yield RunningASGI(server, sock.getsockname()[1])
    finally:
        sock.close()
