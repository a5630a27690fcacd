"""Real servers and clients for the tests: instrumented or bare, asyncio or threading.

Every server listens on a free loopback port (``port=0``). ``monitoring=None`` starts a
bare ``websockets`` server, a dict starts ``ws_monitoring.serve``/``serve_sync`` with
those options, so the transparency tests can run one scenario against both.

:class:`RawClient` speaks WebSocket byte by byte over a plain asyncio stream, to send
what ``websockets`` clients refuse to send: unmasked frames, bad opcodes, invalid close
codes, half frames followed by a TCP reset, garbage instead of an HTTP request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

import websockets.asyncio.server
import websockets.sync.server

import ws_monitoring
from tests.helpers.scrape import Samples

T = TypeVar("T")

HOST = "127.0.0.1"


class Running:
    """A running server: its ``server`` object, ``port`` and ``url(path)``."""

    def __init__(self, server: Any, port: int) -> None:
        self.server = server
        self.port = port

    def url(self, path: str = "/") -> str:
        return f"ws://{HOST}:{self.port}{path}"


async def echo(ws: websockets.asyncio.server.ServerConnection) -> None:
    """The asyncio echo handler the suites share."""
    async for message in ws:
        await ws.send(message)


def sync_echo(ws: websockets.sync.server.ServerConnection) -> None:
    """The threading echo handler the suites share."""
    for message in ws:
        ws.send(message)


@contextlib.asynccontextmanager
async def async_server(
    handler: Callable[..., Awaitable[None]],
    *,
    monitoring: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> AsyncIterator[Running]:
    """An asyncio server on a free port: bare when ``monitoring`` is None, else instrumented."""
    if monitoring is None:
        serve_cm = websockets.asyncio.server.serve(handler, HOST, 0, **kwargs)
    else:
        serve_cm = ws_monitoring.serve(handler, HOST, 0, **monitoring, **kwargs)
    async with serve_cm as server:
        yield Running(server, server.sockets[0].getsockname()[1])


@contextlib.contextmanager
def sync_server(
    handler: Callable[..., None],
    *,
    monitoring: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Iterator[Running]:
    """A threading server on a free port, serving from a daemon thread until the block ends."""
    if monitoring is None:
        server = websockets.sync.server.serve(handler, HOST, 0, **kwargs)
    else:
        server = ws_monitoring.serve_sync(handler, HOST, 0, **monitoring, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Running(server, server.socket.getsockname()[1])
    finally:
        server.shutdown()
        thread.join(10)


@contextlib.asynccontextmanager
async def sync_server_async(
    handler: Callable[..., None],
    *,
    monitoring: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> AsyncIterator[Running]:
    """:func:`sync_server` for async tests: shutting down happens off the event loop."""
    cm = sync_server(handler, monitoring=monitoring, **kwargs)
    running = cm.__enter__()
    try:
        yield running
    finally:
        await asyncio.to_thread(cm.__exit__, None, None, None)


# -- waiting on conditions --------------------------------------------------------------


def wait_until(predicate: Callable[[], T | None], timeout: float = 10.0, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.005)


async def async_wait_until(
    predicate: Callable[[], T | None], timeout: float = 10.0, what: str = ""
) -> T:
    """:func:`wait_until` that yields to the event loop between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.005)


async def handlers_done(srv: Running) -> None:
    """Wait until every connection handler of ``srv`` so far has returned.

    The server closes a connection's record before its handler task or thread ends
    (the handler's own ``finally``, or the reader thread, which ``close()`` joins): after
    this, a single scrape shows every connection the server has finished, however
    loaded the machine. Bounded by the test's own timeout, not a wall-clock deadline.
    """
    server = srv.server
    if isinstance(server, websockets.sync.server.Server):
        with server.lock:
            threads = list(server.handler_threads)
        for thread in threads:
            await asyncio.to_thread(thread.join)
    elif server.handler_tasks:
        await asyncio.wait(set(server.handler_tasks))


def _closed(
    scrape: Callable[[], Samples], closed: int, handshakes: int | None, prefix: str
) -> Callable[[], Samples | None]:
    def check() -> Samples | None:
        samples = scrape()
        done = samples.total(f"{prefix}_disconnections_total") == closed
        idle = samples.total(f"{prefix}_connections_active") == 0
        timed = handshakes is None or (
            samples.total(f"{prefix}_handshake_duration_seconds_count") == handshakes
        )
        return samples if done and idle and timed else None

    return check


async def settled(
    scrape: Callable[[], Samples],
    closed: int,
    *,
    handshakes: int | None = None,
    prefix: str = "websocket",
) -> Samples:
    """Scrape until exactly ``closed`` connections were closed and none is open.

    With ``handshakes``, also until that many handshakes were timed (a rejected one is
    recorded just after its answer is written, so the client may see it first). The
    server records a close after the client has seen it, so a test polls for it (in a
    thread: the metrics server is scraped over HTTP) instead of sleeping.
    """
    check = _closed(scrape, closed, handshakes, prefix)
    deadline = time.monotonic() + 10.0
    while True:
        samples = await asyncio.to_thread(check)
        if samples is not None:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(_summary(scrape(), closed, handshakes, prefix))
        await asyncio.sleep(0.005)


def _summary(samples: Samples, closed: int, handshakes: int | None, prefix: str) -> str:
    return (
        f"expected {closed} closed connections, none open"
        + ("" if handshakes is None else f", {handshakes} handshakes")
        + "; the scrape has "
        + ", ".join(
            f"{name}={samples.total(f'{prefix}_{name}'):g}"
            for name in (
                "disconnections_total",
                "connections_active",
                "connections_total",
                "handshake_duration_seconds_count",
                "handshake_failures_total",
            )
        )
    )


def settled_sync(
    scrape: Callable[[], Samples],
    closed: int,
    *,
    handshakes: int | None = None,
    prefix: str = "websocket",
) -> Samples:
    """:func:`settled` for threads."""
    try:
        return wait_until(_closed(scrape, closed, handshakes, prefix))
    except AssertionError:
        raise AssertionError(_summary(scrape(), closed, handshakes, prefix)) from None


# -- raw WebSocket over TCP ------------------------------------------------------------------


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
) -> bytes:
    """Serialize a frame without any validation (any opcode, RSV bits, unmasked...)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    length = len(payload)
    mask_bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_frame(code: int | None, reason: bytes = b"") -> bytes:
    """A masked close frame with any code, valid or not (``None``: empty payload)."""
    payload = b"" if code is None else struct.pack("!H", code) + reason
    return frame(0x8, payload)


class RawClient:
    """A WebSocket client made of bytes on an asyncio stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status: int | None = None

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    @classmethod
    async def open(cls, port: int, path: str = "/") -> RawClient:
        """Connect and complete the opening handshake; asserts a 101 answer."""
        client = await cls.connect(port)
        status = await client.handshake(path)
        assert status == 101, f"handshake answered {status}"
        return client

    async def handshake(self, path: str = "/") -> int:
        key = base64.b64encode(os.urandom(16)).decode()
        await self.send(
            f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        return self.status

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self) -> tuple[int, bytes] | None:
        """The next (opcode, payload) from the server, or ``None`` at EOF."""
        try:
            head = await self.reader.readexactly(2)
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            return head[0] & 0x0F, await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def read_close(self) -> tuple[int | None, str] | None:
        """Skip data frames until the server's close frame: (code, reason); ``None`` at EOF."""
        while (got := await self.read_frame()) is not None:
            opcode, payload = got
            if opcode == 0x8:
                if not payload:
                    return None, ""
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode()
        return None

    async def read_eof(self) -> bytes:
        """Everything the server sends until it half-closes the TCP connection; then close.

        Closing matters: after an HTTP answer, the server waits for the client's FIN
        (up to ``close_timeout``) before its ``wait_closed()`` returns.
        """
        data = await self.reader.read()
        await self.aclose()
        return data

    def reset(self) -> None:
        """Abort the TCP connection with an RST (SO_LINGER 0) instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
