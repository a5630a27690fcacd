"""The measurements: server CPU per message, memory per connection, scrapes, loop lag.

Everything runs in the harness process (pinned to the load core), which drives server
processes (pinned to the server core) over their stdin/stdout and loads them with the
raw clients of :mod:`benchmarks.load`. Server CPU is read by the server itself
(``time.process_time()``: user + system, every thread, nanosecond clock) right before
and right after a window, after flushing its exporters, so what a window caused is
charged to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .load import EchoClient, close_clients, open_clients, run_load
from .procs import ServerProcess

__all__ = [
    "EchoShape",
    "Window",
    "echo_window",
    "interleaved",
    "lag_under_load",
    "memory_per_connection",
    "profile_window",
    "scrape_times",
    "summarize",
    "traced_per_connection",
]

HOST = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class EchoShape:
    """What a load looks like: connections, messages in flight on each, payload size."""

    connections: int = 10
    window: int = 8
    size: int = 64
    duration: float = 1.0
    warmup: float = 0.3

    @property
    def label(self) -> str:
        return f"{self.connections} conn x {self.window} in flight, {self.size} B"


@dataclasses.dataclass
class Window:
    """One measured window against one server."""

    variant: str
    messages: int
    elapsed: float
    cpu: float
    user: float
    sys: float

    @property
    def cpu_per_message(self) -> float:
        """Server CPU seconds per echoed message (NaN when nothing was echoed)."""
        return self.cpu / self.messages if self.messages else float("nan")

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed if self.elapsed > 0 else 0.0


async def settle(server: ServerProcess, quiet: float = 0.002, timeout: float = 10.0) -> None:
    """Wait until the server spends less than ``quiet`` CPU seconds per 50 ms.

    A client sees the 101 response before the server has finished what follows a
    handshake (logs, spans, starting the handler): that work belongs to no window.
    """
    deadline = time.monotonic() + timeout
    last = (await asyncio.to_thread(server.command, "stats"))["cpu"]
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        cpu = (await asyncio.to_thread(server.command, "stats"))["cpu"]
        if cpu - last < quiet:
            return
        last = cpu


async def echo_window(server: ServerProcess, shape: EchoShape) -> Window:
    """Open ``shape.connections`` fresh clients, warm up, measure one window, close them."""
    paths = ["/"] * shape.connections
    clients = await open_clients(HOST, server.port, paths)
    try:
        await settle(server)
        payload = b"\x42" * shape.size
        if shape.warmup > 0:
            await run_load(clients, payload, window=shape.window, duration=shape.warmup)
        before = await asyncio.to_thread(server.command, "flush")
        result = await run_load(clients, payload, window=shape.window, duration=shape.duration)
        after = await asyncio.to_thread(server.command, "flush")
    finally:
        await close_clients(clients)
    return Window(
        server.variant,
        result.messages,
        result.elapsed,
        after["cpu"] - before["cpu"],
        after["user"] - before["user"],
        after["sys"] - before["sys"],
    )


async def profile_window(server: ServerProcess, shape: EchoShape, path: str) -> int:
    """One window of ``shape`` under cProfile in the server's event loop; stats to ``path``.

    Returns the messages echoed while profiling.
    """
    clients = await open_clients(HOST, server.port, ["/"] * shape.connections)
    try:
        await settle(server)
        payload = b"\x42" * shape.size
        await run_load(clients, payload, window=shape.window, duration=shape.warmup)
        await asyncio.to_thread(server.command, "profile_start")
        result = await run_load(clients, payload, window=shape.window, duration=shape.duration)
        await asyncio.to_thread(server.command, f"profile_stop {path}")
    finally:
        await close_clients(clients)
    return result.messages


async def interleaved(
    servers: Sequence[ServerProcess],
    shape: EchoShape,
    reps: int,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, list[Window]]:
    """``reps`` rounds over every server (A B C, B C A, ...): every variant sees the same
    machine conditions, in every position of the round."""
    results: dict[str, list[Window]] = {s.variant: [] for s in servers}
    for rep in range(reps):
        order = list(servers[rep % len(servers) :]) + list(servers[: rep % len(servers)])
        for server in order:
            window = await echo_window(server, shape)
            results[server.variant].append(window)
        progress(f"round {rep + 1}/{reps}")
    return results


def _quantile(values: Sequence[float], q: float) -> float:
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(windows: Sequence[Window], floor: Sequence[Window] | None) -> dict[str, Any]:
    """Medians and spread of one variant; ratios paired with ``floor``'s same rounds."""
    cpu = [w.cpu_per_message * 1e6 for w in windows if w.messages]
    rates = [w.rate for w in windows if w.messages]
    out: dict[str, Any] = {
        "windows": len(windows),
        "messages": sum(w.messages for w in windows),
        "cpu_us_per_msg": {
            "median": statistics.median(cpu) if cpu else None,
            "p25": _quantile(cpu, 0.25) if cpu else None,
            "p75": _quantile(cpu, 0.75) if cpu else None,
            "min": min(cpu) if cpu else None,
            "max": max(cpu) if cpu else None,
        },
        "user_share": (
            sum(w.user for w in windows) / max(1e-12, sum(w.user + w.sys for w in windows))
        ),
        "msgs_per_s": {"median": statistics.median(rates) if rates else None},
        "samples_us": [round(c, 3) for c in cpu],
    }
    if floor is not None:
        ratios = [
            w.cpu_per_message / f.cpu_per_message
            for w, f in zip(windows, floor, strict=False)
            if w.messages and f.messages
        ]
        out["ratio"] = {
            "median": statistics.median(ratios) if ratios else None,
            "p25": _quantile(ratios, 0.25) if ratios else None,
            "p75": _quantile(ratios, 0.75) if ratios else None,
            "samples": [round(r, 4) for r in ratios],
        }
    return out


# -- memory -------------------------------------------------------------------------------


async def open_idle(server: ServerProcess, count: int, routes: int) -> list[EchoClient]:
    """``count`` connections spread over ``routes`` paths, doing nothing."""
    paths = [f"/rooms/{i % routes}" for i in range(count)]
    return await open_clients(HOST, server.port, paths, parallel=200, timeout=120.0)


async def primed(server: ServerProcess) -> list[EchoClient]:
    """One connection opened alone, before a measured burst: see the README (memory).

    On CPython 3.11 and 3.12 a burst of connections accepted before the first one of a
    class is set up can leave every connection of that class with its own combined
    instance dict (+1.5 KiB). A bare server meets that race or not at random; serve()'s
    connections keep their attributes in slots and never do. One connection first, and
    the bare server is measured at its best, every time.
    """
    return await open_idle(server, 1, 1)


async def memory_per_connection(
    server: ServerProcess, count: int, routes: int
) -> tuple[dict[str, Any], list[EchoClient]]:
    """RSS growth per idle connection (bytes); returns the still-open clients too."""
    first = await primed(server)
    before = await asyncio.to_thread(server.command, "gc")
    clients = first + await open_idle(server, count, routes)
    # Let the server finish what follows each handshake before reading its memory.
    await asyncio.sleep(0.5)
    after = await asyncio.to_thread(server.command, "gc")
    return (
        {
            "connections": count,
            "rss_before": before["rss"],
            "rss_after": after["rss"],
            "bytes_per_connection": (after["rss"] - before["rss"]) / count,
        },
        clients,
    )


async def traced_per_connection(server: ServerProcess, count: int, routes: int) -> dict[str, Any]:
    """Python heap growth per idle connection, by tracemalloc in the server.

    Exact where RSS is noisy (allocator arenas), but without what the kernel and the
    allocator add: use a fresh process, not the one RSS is read from.
    """
    first = await primed(server)
    await asyncio.to_thread(server.command, "trace_start", 120)
    clients = first + await open_idle(server, count, routes)
    try:
        await asyncio.sleep(0.5)
        grown = await asyncio.to_thread(server.command, "trace_stop", 120)
    finally:
        await close_clients(clients)
    ours = grown["ws_monitoring_bytes"]
    top = sorted(ours.items(), key=lambda kv: -kv[1])[:12]
    return {
        "connections": count,
        "python_bytes_per_connection": grown["traced_bytes"] / count,
        "ws_monitoring_bytes_per_connection": sum(ours.values()) / count,
        "ws_monitoring_top": [(where, size / count) for where, size in top],
    }


async def one_message_each(clients: Sequence[EchoClient], size: int = 64) -> None:
    """Every client echoes one message: each connection then has non-zero histograms."""
    loop = asyncio.get_running_loop()
    for client in clients:
        client.sending = False
        client.idle = loop.create_future()
        client.send_one(b"\x42" * size)
    async with asyncio.timeout(60):
        await asyncio.gather(*(c.idle for c in clients if c.idle is not None))


# -- scrapes ---------------------------------------------------------------------------------


def scrape_once(port: int, accept: str | None = None) -> tuple[float, int]:
    """(seconds, body bytes) of one ``GET /metrics`` from the server's metrics port."""
    request = urllib.request.Request(f"http://{HOST}:{port}/metrics")
    if accept:
        request.add_header("Accept", accept)
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return time.perf_counter() - start, len(body)


def scrape_times(port: int, count: int) -> dict[str, Any]:
    """``count`` sequential scrapes: durations (ms) and the size of the exposition."""
    durations, size = [], 0
    for _ in range(count):
        seconds, size = scrape_once(port)
        durations.append(seconds * 1000)
    return {
        "scrapes": count,
        "ms": {
            "median": statistics.median(durations),
            "p95": _quantile(durations, 0.95),
            "max": max(durations),
        },
        "bytes": size,
    }


# -- event-loop lag -------------------------------------------------------------------------


def _lag_summary(samples: Sequence[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in samples]
    if not ms:
        return {"samples": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "samples": len(ms),
        "p50_ms": _quantile(ms, 0.5),
        "p99_ms": _quantile(ms, 0.99),
        "max_ms": max(ms),
        "over_10ms": sum(1 for m in ms if m > 10),
    }


#: Phases of the lag test: the load alone, then with scrapes, alerts, both.
LAG_PHASES = ("load", "load+scrapes", "load+alerts", "load+scrapes+alerts")


async def _scraper(port: int, every: float, stop: asyncio.Event, out: list[float]) -> None:
    with ThreadPoolExecutor(1) as pool:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            seconds, _ = await loop.run_in_executor(pool, scrape_once, port)
            out.append(seconds * 1000)
            await asyncio.sleep(every)


async def _crasher(port: int, every: float, stop: asyncio.Event, out: list[int]) -> None:
    while not stop.is_set():
        [client] = await open_clients(HOST, port, ["/crash"])
        out.append(1)
        await client.closed
        await asyncio.sleep(every)


async def lag_under_load(
    server: ServerProcess,
    shape: EchoShape,
    *,
    scrape_every: float,
    crash_every: float,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Event-loop lag while echoing ``shape``: alone, then with scrapes and crash alerts.

    The server samples how late a 1 ms timer fires. Scrapes run from a thread of this
    process every ``scrape_every`` seconds; a client connects to ``/crash`` every
    ``crash_every`` seconds, whose handler raises, so the alerter delivers to the local
    Alertmanager stand-in.
    """
    assert server.metrics_port is not None
    out: dict[str, Any] = {"shape": shape.label}
    clients = await open_clients(HOST, server.port, ["/"] * shape.connections)
    payload = b"\x42" * shape.size
    try:
        await run_load(clients, payload, window=shape.window, duration=shape.warmup)
        for phase in LAG_PHASES:
            stop = asyncio.Event()
            scrapes: list[float] = []
            crashes: list[int] = []
            gc_before = (await asyncio.to_thread(server.command, "stats"))["gc"]
            await asyncio.to_thread(server.command, "lag_start")
            tasks = []
            if "scrapes" in phase:
                tasks.append(
                    asyncio.create_task(_scraper(server.metrics_port, scrape_every, stop, scrapes))
                )
            if "alerts" in phase:
                tasks.append(asyncio.create_task(_crasher(server.port, crash_every, stop, crashes)))
            result = await run_load(clients, payload, window=shape.window, duration=shape.duration)
            stop.set()
            await asyncio.gather(*tasks)
            lag = await asyncio.to_thread(server.command, "lag_stop")
            gc_after = (await asyncio.to_thread(server.command, "stats"))["gc"]
            out[phase] = {
                # Full collections walk every object of every connection, holding the GIL.
                "full_gc": gc_after[2] - gc_before[2],
                **_lag_summary(lag["lag"]),
                "messages": result.messages,
                "msgs_per_s": result.rate,
                "scrapes": len(scrapes),
                "scrape_ms_max": max(scrapes) if scrapes else None,
                "crashes": len(crashes),
            }
            progress(phase)
    finally:
        await close_clients(clients)
    return out
