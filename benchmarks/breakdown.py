"""Where ws-monitoring's per-message time goes: each hot-path piece timed in isolation.

End-to-end ratios say how much the instrumentation costs; this says which piece costs
it. Each piece runs in this process on real websockets objects (a ``ServerProtocol``
after a real opening handshake, real frames) with and without the hooks installed by
``Monitor.open``, and the difference is the cost of the hook. Times are the best of
several batches (the least disturbed by other processes), in nanoseconds per call.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from .load import masked_frame

__all__ = ["breakdown"]


def _open_protocol() -> tuple[Any, Any]:
    from websockets.server import ServerProtocol

    protocol = ServerProtocol()
    key = base64.b64encode(os.urandom(16)).decode()
    protocol.receive_data(
        (
            "GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    [request] = protocol.events_received()
    protocol.send_response(protocol.accept(request))
    protocol.data_to_send()
    return protocol, request


class _Connection:
    """What ``Monitor.open`` and the recv hooks read from a connection (plain data)."""

    def __init__(self, protocol: Any, request: Any) -> None:
        self.protocol = protocol
        self.request = request
        self.id = uuid.uuid4()
        self.remote_address = ("127.0.0.1", 40000)
        self.subprotocol = None

    async def recv(self, decode: bool | None = None) -> bytes:
        return b"B" * 64

    async def recv_streaming(self, decode: bool | None = None) -> Any:  # pragma: no cover
        yield b"B" * 64


def _best(run_batch: Callable[[], float], batches: int) -> float:
    return min(run_batch() for _ in range(batches))


def _receive_cost(protocol: Any, data: bytes, n: int, batches: int) -> float:
    """ns to parse one masked 64 B frame (``receive_data`` + ``events_received``)."""
    receive, events = protocol.receive_data, protocol.events_received

    def batch() -> float:
        start = time.perf_counter()
        for _ in range(n):
            receive(data)
            events()
        return (time.perf_counter() - start) / n

    return _best(batch, batches) * 1e9


def _send_cost(protocol: Any, payload: bytes, n: int, batches: int) -> float:
    """ns to serialize one 64 B binary message (``send_binary`` + ``data_to_send``)."""
    send, out = protocol.send_binary, protocol.data_to_send

    def batch() -> float:
        start = time.perf_counter()
        for _ in range(n):
            send(payload)
            out()
        return (time.perf_counter() - start) / n

    return _best(batch, batches) * 1e9


def _recv_cost(connection: Any, n: int, batches: int) -> float:
    async def batch() -> float:
        recv = connection.recv
        start = time.perf_counter()
        for _ in range(n):
            await recv()
        return (time.perf_counter() - start) / n

    async def run() -> float:
        return min([await batch() for _ in range(batches)])

    return asyncio.run(run()) * 1e9


def breakdown(quick: bool = False) -> dict[str, Any]:
    """Nanoseconds per call of each hot-path piece, bare and instrumented (metrics only)."""
    from prometheus_client import CollectorRegistry

    from ws_monitoring.adapters.asyncio import RECORD_ATTR, _connection_class
    from ws_monitoring.adapters.instrument import build_monitor
    from ws_monitoring.config import Config

    n, batches = (2_000, 5) if quick else (20_000, 15)
    config = Config.from_options(registry=CollectorRegistry(), tracing=False, log_lifecycle=False)
    monitor = build_monitor(config)
    payload = b"B" * 64
    data = masked_frame(payload)

    bare_protocol, _ = _open_protocol()
    protocol, request = _open_protocol()
    # The connection class serve() makes: its recv() is the timed one (C when built).
    connection = _connection_class(_Connection, monitor)(protocol, request)
    record = monitor.open(connection)
    setattr(connection, RECORD_ATTR, record)
    bare_connection = _Connection(*_open_protocol())

    results: dict[str, Any] = {}
    for name, bare, hooked in (
        (
            "receive a frame (counter's decode(), per received frame)",
            lambda: _receive_cost(bare_protocol, data, n, 1),
            lambda: _receive_cost(protocol, data, n, 1),
        ),
        (
            "send a message (counter's encode(), per sent frame)",
            lambda: _send_cost(bare_protocol, payload, n, 1),
            lambda: _send_cost(protocol, payload, n, 1),
        ),
        (
            "recv() (timed by the record: clocks and handling-time histogram, per message)",
            lambda: _recv_cost(bare_connection, n, 1),
            lambda: _recv_cost(connection, n, 1),
        ),
    ):
        # Alternate bare and instrumented batches: both see the same machine.
        b = h = float("inf")
        for _ in range(batches):
            b = min(b, bare())
            h = min(h, hooked())
        results[name] = {"bare_ns": b, "instrumented_ns": h, "overhead_ns": h - b}

    per_echo = sum(
        results[k]["overhead_ns"]
        for k in (
            "receive a frame (counter's decode(), per received frame)",
            "send a message (counter's encode(), per sent frame)",
            "recv() (timed by the record: clocks and handling-time histogram, per message)",
        )
    )
    results["total per echoed message"] = {"overhead_ns": per_echo}
    return results
