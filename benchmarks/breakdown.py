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


def _frame_cost(protocol: Any, method: str, frame: Any, n: int, batches: int) -> float:
    call = getattr(protocol, method)

    def batch() -> float:
        start = time.perf_counter()
        for _ in range(n):
            call(frame)
        elapsed = time.perf_counter() - start
        # Drain what the calls queued, outside the timed part.
        protocol.events_received()
        protocol.data_to_send()
        return elapsed / n

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
    from websockets.frames import Frame, Opcode

    from ws_monitoring.asyncio_server import _install_recv_hooks
    from ws_monitoring.config import Config
    from ws_monitoring.instrument import build_monitor

    n, batches = (2_000, 5) if quick else (20_000, 15)
    config = Config.from_options(registry=CollectorRegistry(), tracing=False, log_lifecycle=False)
    monitor = build_monitor(config)
    frame = Frame(Opcode.BINARY, b"B" * 64)

    bare_protocol, _ = _open_protocol()
    protocol, request = _open_protocol()
    connection = _Connection(protocol, request)
    record = monitor.open(connection)
    bare_connection = _Connection(*_open_protocol())
    _install_recv_hooks(connection, record)  # type: ignore[arg-type]

    results: dict[str, Any] = {}
    for name, bare, hooked in (
        (
            "recv_frame (frame hook, per received frame)",
            lambda: _frame_cost(bare_protocol, "recv_frame", frame, n, batches),
            lambda: _frame_cost(protocol, "recv_frame", frame, n, batches),
        ),
        (
            "send_frame (frame hook, per sent frame)",
            lambda: _frame_cost(bare_protocol, "send_frame", frame, n, batches),
            lambda: _frame_cost(protocol, "send_frame", frame, n, batches),
        ),
        (
            "recv() (handling-time wrapper, per message)",
            lambda: _recv_cost(bare_connection, n, batches),
            lambda: _recv_cost(connection, n, batches),
        ),
    ):
        b, h = bare(), hooked()
        results[name] = {"bare_ns": b, "instrumented_ns": h, "overhead_ns": h - b}

    def clock_batch() -> float:
        clock = time.perf_counter
        start = clock()
        for _ in range(n):
            clock()
        return (clock() - start) / n

    clock = _best(clock_batch, batches) * 1e9
    results["perf_counter() (2 per message, inside recv())"] = {
        "bare_ns": 0.0,
        "instrumented_ns": clock,
        "overhead_ns": clock,
    }

    def done_batch() -> float:
        clock = time.perf_counter
        start = clock()
        for _ in range(n):
            # A handling time of a few microseconds, as in an echo.
            record.handling_start = clock()
            record.message_done()
        return (clock() - start) / n

    clock_ns = results["perf_counter() (2 per message, inside recv())"]["overhead_ns"]
    done = _best(done_batch, batches) * 1e9 - clock_ns
    results["message_done() (inside recv(): histogram of handling time)"] = {
        "bare_ns": 0.0,
        "instrumented_ns": done,
        "overhead_ns": done,
    }
    per_echo = sum(
        results[k]["overhead_ns"]
        for k in (
            "recv_frame (frame hook, per received frame)",
            "send_frame (frame hook, per sent frame)",
            "recv() (handling-time wrapper, per message)",
        )
    )
    results["total per echoed message"] = {"overhead_ns": per_echo}
    return results
