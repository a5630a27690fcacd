"""The load generator: raw WebSocket clients that cost far less than the server they load.

Each client does its own opening handshake over a plain asyncio transport, then keeps
``window`` masked frames in flight: every echo it reads lets it write one more frame,
taken from a frame built once up front. Parsing the server's frames only reads their
headers, so a client costs a small fraction of what the server spends per message and
the server, not the client, is what the numbers measure.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
from collections.abc import Sequence

__all__ = ["EchoClient", "LoadResult", "close_clients", "masked_frame", "open_clients", "run_load"]

_MASK = b"\x9a\x3c\x51\xe7"


def masked_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """A complete, final client frame (masked as RFC 6455 requires)."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = (_MASK * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")
    return header + _MASK + body


class EchoClient(asyncio.Protocol):
    """One WebSocket client connection speaking just enough RFC 6455 for an echo load.

    Counts the complete data messages it receives; answers pings so the server's
    keepalive never closes it; refills its window of in-flight messages as echoes arrive.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.transport: asyncio.Transport | None = None
        self.handshake_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._http = b""
        self._buf = b""
        self._skip = 0  # payload bytes of the current frame still to discard
        self._skip_counts = False  # whether that frame ends a data message
        self.received = 0
        self.sent = 0
        self.frame = b""
        self.in_flight = 0
        self.window = 0
        self.sending = False
        self.idle: asyncio.Future[None] | None = None
        self.close_sent = False

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake_done.done():
            self.handshake_done.set_exception(ConnectionError(f"lost during handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)
        if self.idle is not None and not self.idle.done():
            self.idle.set_exception(ConnectionError(f"connection lost under load: {exc}"))

    def data_received(self, data: bytes) -> None:
        if not self.handshake_done.done():
            self._http += data
            end = self._http.find(b"\r\n\r\n")
            if end < 0:
                return
            head, rest = self._http[:end], self._http[end + 4 :]
            if not head.startswith(b"HTTP/1.1 101"):
                self.handshake_done.set_exception(
                    ConnectionError(f"handshake refused: {head[:80]!r}")
                )
                return
            self.handshake_done.set_result(None)
            data = rest
            if not data:
                return
        self._parse(data)

    # -- frames ---------------------------------------------------------------------------

    def _parse(self, data: bytes) -> None:
        done = 0
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                if self._skip == 0 and self._skip_counts:
                    self._on_messages(1)
                return
            data = data[self._skip :]
            self._skip = 0
            if self._skip_counts:
                done += 1
        buf = self._buf + data if self._buf else data
        pos, end = 0, len(buf)
        while end - pos >= 2:
            b0, n = buf[pos], buf[pos + 1] & 0x7F
            if n < 126:
                start = pos + 2
            elif n == 126:
                if end - pos < 4:
                    break
                n, start = int.from_bytes(buf[pos + 2 : pos + 4], "big"), pos + 4
            else:
                if end - pos < 10:
                    break
                n, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
            opcode, counts = b0 & 0x0F, b0 & 0x80 and b0 & 0x0F <= 2
            if start + n <= end:
                if opcode == 0x9:
                    self._control(0xA, bytes(buf[start : start + n]))
                elif opcode == 0x8:
                    # Answer the server's close frame, as a client must: it then closes TCP.
                    if not self.close_sent:
                        self._control(0x8, bytes(buf[start : start + min(n, 2)]))
                        self.close_sent = True
                elif counts:
                    done += 1
                pos = start + n
            elif opcode >= 0x8:
                break  # a control frame is small: keep it until it is complete
            else:
                # Large payloads are skipped as they arrive, never buffered.
                self._skip, self._skip_counts = start + n - end, bool(counts)
                pos = end
        self._buf = buf[pos:] if pos < end else b""
        if done:
            self._on_messages(done)

    def _control(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(masked_frame(payload, opcode))

    def _on_messages(self, count: int) -> None:
        self.received += count
        self.in_flight -= count
        if self.sending:
            self.transport.write(self.frame * count)  # type: ignore[union-attr]
            self.sent += count
            self.in_flight += count
        elif self.in_flight <= 0 and self.idle is not None and not self.idle.done():
            self.idle.set_result(None)

    # -- driving ------------------------------------------------------------------------

    def start(self, frame: bytes, window: int) -> None:
        """Put ``window`` copies of ``frame`` in flight and keep refilling them."""
        assert self.transport is not None
        self.frame, self.window = frame, window
        self.received = 0
        self.sent = self.in_flight = window
        self.idle = None
        self.sending = True
        self.transport.write(frame * window)

    def stop(self) -> asyncio.Future[None]:
        """Stop refilling; the future resolves when every message in flight came back."""
        self.sending = False
        self.idle = asyncio.get_running_loop().create_future()
        if self.in_flight <= 0:
            self.idle.set_result(None)
        return self.idle

    def send_one(self, payload: bytes) -> None:
        """Send a single message (not part of a load), e.g. to make a connection non-idle."""
        assert self.transport is not None
        self.in_flight += 1
        self.transport.write(masked_frame(payload))

    async def close(self, timeout: float = 5.0) -> None:
        """Close handshake (1000), then wait for the server to close TCP."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self.close_sent:
            self.close_sent = True
            self.transport.write(masked_frame(struct.pack("!H", 1000), 0x8))
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            self.transport.abort()


class LoadResult:
    """Messages echoed (sent and received back) during a load, over ``elapsed`` seconds."""

    __slots__ = ("elapsed", "messages")

    def __init__(self, messages: int, elapsed: float) -> None:
        self.messages = messages
        self.elapsed = elapsed

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed if self.elapsed > 0 else 0.0


async def open_clients(
    host: str, port: int, paths: Sequence[str], *, parallel: int = 100, timeout: float = 30.0
) -> list[EchoClient]:
    """Open one client per entry of ``paths`` (at most ``parallel`` handshakes at a time).

    Raises:
        ConnectionError: a handshake was refused or the connection dropped.
        TimeoutError: the clients were not all open within ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    semaphore = asyncio.Semaphore(parallel)

    async def one(path: str) -> EchoClient:
        async with semaphore:
            _, client = await loop.create_connection(lambda: EchoClient(path), host, port)
            await client.handshake_done
            return client

    async with asyncio.timeout(timeout):
        return list(await asyncio.gather(*(one(p) for p in paths)))


async def close_clients(clients: Sequence[EchoClient], *, parallel: int = 500) -> None:
    """Close every client cleanly, ``parallel`` at a time."""
    for i in range(0, len(clients), parallel):
        await asyncio.gather(*(c.close() for c in clients[i : i + parallel]))


async def run_load(
    clients: Sequence[EchoClient], payload: bytes, *, window: int, duration: float
) -> LoadResult:
    """Echo ``payload`` over every client for ``duration`` seconds, then drain.

    ``elapsed`` runs from the first write to the last echo, so ``messages / elapsed`` is
    the throughput and no message is left in flight when this returns.

    Raises:
        ConnectionError: a connection dropped under load.
        TimeoutError: echoes still missing 30 s after the load stopped.
    """
    frame = masked_frame(payload)
    start = time.perf_counter()
    for client in clients:
        client.start(frame, window)
    await asyncio.sleep(duration)
    async with asyncio.timeout(30.0):
        await asyncio.gather(*(client.stop() for client in clients))
    elapsed = time.perf_counter() - start
    return LoadResult(sum(client.received for client in clients), elapsed)
