"""The demo behind ``ws-monitoring demo``: an instrumented chat server and synthetic clients.

The clients exercise every metric: text and binary messages, broadcasts, a handler
crash on purpose (1011: one shortly after the start, then one every
:data:`CRASH_INTERVAL` seconds), oversized messages (1009), abrupt disconnects (1006),
application close codes (4xxx), rejected handshakes (404, 401) and keepalive pings.

While it runs, :func:`run_demo` prints a one-line summary every ``summary_interval``
seconds (connections open, messages per second in and out, errors, spans exported) and
a summary table when it stops, read from the Prometheus registry the metrics server
exposes. :func:`demo_tracing` sends every span (``sample_ratio=1.0``) to a local OTLP
receiver it starts, or to a collector, so that exemplars appear in the OpenMetrics
scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import random
import secrets
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response

from .adapters.instrument import serve
from .metrics.server import start_metrics_server

__all__ = ["CRASH_INTERVAL", "OtlpReceiver", "demo_tracing", "run_demo"]

ROUTES = ["/echo", "/chat/{room}"]
MAX_SIZE = 64 * 1024
#: Seconds between two crashes on purpose (the first comes one second after the start).
CRASH_INTERVAL = 30.0


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


async def _client_session(
    base: str, rng: random.Random, kind: float | None = None, app_close: bool = False
) -> None:
    """One synthetic client; ``kind`` (in [0, 1)) picks the scenario, default at random."""
    kind = rng.random() if kind is None else kind
    try:
        if kind < 0.45:
            async with connect(f"{base}/echo") as client:
                for _ in range(rng.randint(3, 20)):
                    if rng.random() < 0.5:
                        await client.send(json.dumps({"n": rng.random()}))
                    else:
                        await client.send(rng.randbytes(rng.choice([16, 300, 5000, 40000])))
                    await client.recv()
        elif kind < 0.75:
            room = rng.choice(["lobby", "random", "dev"])
            async with connect(f"{base}/chat/{room}") as client:
                for _ in range(rng.randint(2, 10)):
                    await client.send(f"hello from {room}")
                    await asyncio.sleep(rng.random() * 0.2)
                code = 4000 + rng.randint(0, 99) if app_close or rng.random() < 0.2 else 1000
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


async def _crasher(url: str, stop: asyncio.Event) -> None:
    """Makes the echo handler crash on purpose: soon after the start, then now and then."""
    delay = 1.0
    while not await _stopped(stop, delay):
        with contextlib.suppress(ConnectionClosed, OSError):
            async with connect(url) as client:
                await client.send("crash")
                await client.wait_closed()
        delay = CRASH_INTERVAL


async def _listener(url: str, stop: asyncio.Event) -> None:
    """A long-lived chat member: receives broadcasts and answers keepalive pings (RTT)."""
    with contextlib.suppress(ConnectionClosed, OSError):
        async with connect(url) as client:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(client.recv(), 0.5)


#: One client of each scenario first, so that every metric moves within a second.
_TOUR = (0.0, 0.5, 0.8, 0.85, 0.95)


async def _clients(base: str, stop: asyncio.Event, rng: random.Random) -> None:
    await asyncio.gather(*(_client_session(base, rng, kind, app_close=True) for kind in _TOUR))
    while not stop.is_set():
        await asyncio.gather(*(_client_session(base, rng) for _ in range(4)))
        await _stopped(stop, 0.3)


async def _stopped(stop: asyncio.Event, delay: float) -> bool:
    """Wait ``delay`` seconds or until ``stop`` is set; whether it is."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()


# -- what the metrics say --------------------------------------------------------------


class Totals:
    """Sums of the registry's samples, read once (a family's samples, by label)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.values: dict[tuple[str, str, str], float] = {}
        for family in registry.collect():
            for sample in family.samples:
                for label in ("", *sample.labels):
                    key = (sample.name, label, sample.labels.get(label, ""))
                    self.values[key] = self.values.get(key, 0.0) + sample.value

    def get(self, name: str, label: str = "", value: str = "") -> float | None:
        """The sum of ``name``'s samples (with ``label=value``); ``None`` if absent."""
        return self.values.get((name, label, value))

    def by(self, name: str, label: str) -> dict[str, float]:
        """``name``'s sums per value of ``label``."""
        return {v: total for (n, lb, v), total in self.values.items() if n == name and lb == label}


def _delta(now: Totals, start: Totals, name: str, label: str = "", value: str = "") -> float:
    return (now.get(name, label, value) or 0.0) - (start.get(name, label, value) or 0.0)


def _spans(now: Totals, start: Totals) -> str:
    if now.get("ws_monitoring_spans_exported_total") is None:
        return "off"
    return f"{_delta(now, start, 'ws_monitoring_spans_exported_total'):.0f}"


def live_line(now: Totals, last: Totals, start: Totals, seconds: float, elapsed: float) -> str:
    """The one-line summary printed every few seconds."""
    received = _delta(now, last, "websocket_messages_total", "direction", "received")
    sent = _delta(now, last, "websocket_messages_total", "direction", "sent")
    return (
        f"[{elapsed:5.0f} s] connections open {now.get('websocket_connections_active') or 0:.0f}"
        f" | messages/s in {received / seconds:.1f} out {sent / seconds:.1f}"
        f" | errors so far {_delta(now, start, 'websocket_errors_total'):.0f}"
        f" | spans exported {_spans(now, start)}"
    )


def summary_table(now: Totals, start: Totals, elapsed: float) -> list[str]:
    """The table printed when the demo stops: what the metrics counted during the run."""

    def breakdown(name: str, label: str) -> str:
        before = start.by(name, label)
        parts = [
            f"{value} {total - before.get(value, 0.0):.0f}"
            for value, total in sorted(now.by(name, label).items())
            if total - before.get(value, 0.0) > 0
        ]
        return f" ({', '.join(parts)})" if parts else ""

    def count(name: str, label: str = "", value: str = "") -> str:
        return f"{_delta(now, start, name, label, value):>8.0f}"

    messages = "websocket_messages_total"
    rows = [
        ("connections", count("websocket_connections_total"), ""),
        ("messages received", count(messages, "direction", "received"), ""),
        ("messages sent", count(messages, "direction", "sent"), ""),
        (
            "handshakes refused",
            count("websocket_handshake_failures_total"),
            breakdown("websocket_handshake_failures_total", "status"),
        ),
        (
            "disconnections",
            count("websocket_disconnections_total"),
            breakdown("websocket_disconnections_total", "code"),
        ),
        ("errors", count("websocket_errors_total"), breakdown("websocket_errors_total", "type")),
        ("spans exported", f"{_spans(now, start):>8}", ""),
    ]
    return [
        f"Summary after {elapsed:.1f} s:",
        *(f"  {title:<20} {value}{extra}" for title, value, extra in rows),
    ]


# -- tracing -----------------------------------------------------------------------------


class OtlpReceiver:
    """A local OTLP/HTTP endpoint for the demo's spans: accepts every export, counts it.

    It stores nothing (``--otlp-endpoint`` sends the spans to a real collector such as
    Jaeger instead). Listens on ``host`` (loopback) on a free port, from a daemon thread.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        receiver = self
        self.requests = 0
        self.bytes = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests += 1
                receiver.bytes += len(body)
                # An empty ExportTraceServiceResponse: every span accepted.
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: one line per export would drown the demo's own lines."""

        self._server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ws-demo-otlp", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def demo_tracing(endpoint: str | None = None, *, enabled: bool = True) -> Iterator[str]:
    """Tracing for the demo, every span sampled; yields the line that describes it.

    The application's tracer provider, when one is set (the container's entry point),
    is kept. Otherwise spans go over OTLP/HTTP to ``endpoint``, or to a local
    :class:`OtlpReceiver` started here. Without OpenTelemetry installed, or with
    ``enabled=False``, there is no tracing. On exit, spans still queued are flushed
    (5 s at most) and the receiver stops.
    """
    if not enabled:
        yield "off (--no-tracing)"
        return
    try:
        from opentelemetry import trace

        from .tracing.setup import setup_tracing
    except ImportError:
        yield "off: OpenTelemetry is not installed (pip install 'ws-monitoring[tracing]')"
        return
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        yield "the application's tracer provider"
        return
    receiver = OtlpReceiver() if endpoint is None else None
    url = receiver.url if receiver is not None else endpoint
    tracing = setup_tracing(
        None if os.environ.get("OTEL_SERVICE_NAME") else "ws-demo",
        endpoint=url,
        sample_ratio=1.0,
        schedule_delay=1.0,
    )
    try:
        if tracing.provider is None:
            yield "off (OTEL_SDK_DISABLED)"
        elif receiver is not None:
            yield f"every span to a local OTLP receiver, {url} (--otlp-endpoint to send elsewhere)"
        else:
            yield f"every span to {url}"
    finally:
        tracing.shutdown(5.0)
        if receiver is not None:
            receiver.close()


# -- the demo ----------------------------------------------------------------------------


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
    stop: asyncio.Event | None = None,
    summary_interval: float | None = 5.0,
    tracing: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Run the demo until ``stop`` is set, cancelled, or for ``duration`` seconds.

    ``print_fn`` receives the banner (URLs, one ``curl`` line), a live summary every
    ``summary_interval`` seconds (``None``: none) and the summary table at the end.
    ``tracing`` is the banner's line about traces (see :func:`demo_tracing`);
    ``options`` go to :func:`ws_monitoring.serve`.

    Raises:
        ws_monitoring.MetricsServerError: the metrics port is taken.
        OSError: the WebSocket port is taken.
    """
    rooms: dict[str, set[ServerConnection]] = {}
    stop = stop if stop is not None else asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        await _chat_handler(ws, rooms)

    serve_options = {
        # Pseudonyms need not survive a demo's restart: no warning about a random key.
        "pseudonym_key": secrets.token_bytes(32),
        **(options or {}),
    }
    start = await asyncio.to_thread(Totals, REGISTRY)
    started = time.monotonic()
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
            **serve_options,
        ) as server:
            ws_port = server.sockets[0].getsockname()[1]
            shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
            base = f"ws://{shown}:{ws_port}"
            print_fn(f"WebSocket server: {base}/echo and {base}/chat/<room>")
            print_fn(f"Health check:     http://{shown}:{ws_port}/healthz")
            print_fn(f"Metrics:          {metrics.url}")
            if tracing is not None:
                print_fn(f"Traces:           {tracing}")
            print_fn(
                "Try:              curl -s -H 'Accept: application/openmetrics-text' "
                f"{metrics.url} | grep -m3 trace_id"
            )
            print_fn(
                "Press Ctrl-C to stop." if duration is None else f"Running for {duration:g} s."
            )
            if ready is not None:
                result = ready(ws_port, metrics.port)
                if result is not None:
                    await result
            tasks = []
            if clients:
                rng = random.Random(8765)
                tasks.append(asyncio.create_task(_clients(base, stop, rng)))
                tasks.append(asyncio.create_task(_listener(f"{base}/chat/lobby", stop)))
                tasks.append(asyncio.create_task(_crasher(f"{base}/echo", stop)))
            try:
                await _run_until(stop, duration, started, summary_interval, start, print_fn)
            finally:
                stop.set()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                        await asyncio.wait_for(task, 10)
        # The server is closed (its spans flushed): the counts are final.
        end = await asyncio.to_thread(Totals, REGISTRY)
        for line in summary_table(end, start, time.monotonic() - started):
            print_fn(line)


async def _run_until(
    stop: asyncio.Event,
    duration: float | None,
    started: float,
    interval: float | None,
    start: Totals,
    print_fn: Callable[[str], object],
) -> None:
    """Wait for ``stop`` or the end of ``duration``, printing the live summary."""
    last, last_at = start, started
    while True:
        now = time.monotonic()
        left = None if duration is None else duration - (now - started)
        if left is not None and left <= 0:
            return
        wait = min(x for x in (left, interval, 3600.0) if x is not None)
        if await _stopped(stop, wait):
            return
        now = time.monotonic()
        if interval is not None and now - last_at >= interval * 0.999:
            current = await asyncio.to_thread(Totals, REGISTRY)
            print_fn(live_line(current, last, start, now - last_at, now - started))
            last, last_at = current, now
