"""Crash storm: what a handler that keeps crashing costs the server, alerting on.

One client makes the handler raise in a loop (bad JSON: ``json.loads`` fails), one
connection after the other, while another connection stays open and pings every 5 ms.
Three servers, each in its own process:

* ``crash-bare``: a plain ``websockets`` server (the floor; websockets logs each crash's
  traceback, as it does for any server);
* ``crash-alerts``: ``ws_monitoring.serve(handler, alerters=[sentry, alertmanager])``,
  a :class:`SentryAlerter` sending envelopes to the local receiver and a
  :class:`PrometheusAlerter` posting to it, everything else at its defaults. This row
  has the budgets: at most 2 ms of server CPU per crash, no loop stall over 10 ms;
* ``crash-everything``: the same plus JSON logs to a file and spans to the local OTLP
  receiver (``setup_logging``, ``setup_tracing``), for reference.

Reported per server: crashes per second, server CPU per crash (every thread: the window
ends once every exporter and alerter has flushed, so the workers' work is charged to
it), the event loop's worst stall (a 1 ms timer in the server,
:class:`benchmarks.server.LagProbe`) and the other connection's ping round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from typing import Any

from .harness import HOST, _lag_summary, _quantile, settle
from .load import EchoClient, masked_frame

__all__ = ["BUDGET_CPU_MS", "BUDGET_STALL_MS", "SERVERS", "VARIANTS", "run", "table"]

#: Server CPU per crash, in milliseconds, with Sentry and Alertmanager on.
BUDGET_CPU_MS = 2.0
#: Worst event-loop stall, in milliseconds.
BUDGET_STALL_MS = 10.0

#: The servers, in the order they are measured: the floor first.
VARIANTS = ("crash-bare", "crash-alerts", "crash-everything")
#: The row the budgets apply to.
BUDGETED = "crash-alerts"

#: A text message the handler cannot parse.
BAD_JSON = masked_frame(b'{"not": json', 0x1)

#: Seconds between two pings of the other connection.
PING_EVERY = 0.005


# -- the servers (run in the server process) ----------------------------------------------


async def parse_or_crash(websocket: Any) -> None:
    """Echoes each message re-encoded as JSON; bad JSON makes it raise."""
    async for message in websocket:
        await websocket.send(json.dumps(json.loads(message)))


Start = Callable[[Any], contextlib.AbstractAsyncContextManager[dict[str, Any]]]


def _bare(options: Any) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
    @contextlib.asynccontextmanager
    async def run() -> AsyncIterator[dict[str, Any]]:
        from websockets.asyncio.server import serve

        async with serve(parse_or_crash, HOST, 0) as server:
            yield {"port": server.sockets[0].getsockname()[1]}

    return run()


def _monitored(everything: bool) -> Start:
    def start(options: Any) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
        @contextlib.asynccontextmanager
        async def run() -> AsyncIterator[dict[str, Any]]:
            import ws_monitoring
            from ws_monitoring.alerting.alertmanager import PrometheusAlerter
            from ws_monitoring.alerting.sentry import SentryAlerter

            from .variants import FLUSHERS

            base = options.alerts or "http://127.0.0.1:9"
            if everything:
                from ws_monitoring.logging.setup import setup_logging
                from ws_monitoring.tracing.setup import setup_tracing

                tracing = setup_tracing(options.service, endpoint=options.otlp)
                logs = setup_logging(filename=options.log_file)
                FLUSHERS.extend([lambda: tracing.force_flush(30.0), logs.flush])
            # The receiver answers any POST to .../envelope/ as Sentry would.
            sentry = SentryAlerter(base.replace("://", "://key@", 1) + "/1")
            alertmanager = PrometheusAlerter(base)
            FLUSHERS.extend([lambda: sentry.flush(30.0), lambda: alertmanager.flush(30.0)])
            async with ws_monitoring.serve(
                parse_or_crash, HOST, 0, alerters=[sentry, alertmanager]
            ) as server:
                yield {"port": server.sockets[0].getsockname()[1]}

        return run()

    return start


#: ``variants.SERVERS`` registers these (asyncio servers).
SERVERS: dict[str, Start] = {
    "crash-bare": _bare,
    "crash-alerts": _monitored(everything=False),
    "crash-everything": _monitored(everything=True),
}


# -- the load (run in the harness process) ------------------------------------------------


async def _crash_loop(port: int, stop: asyncio.Event, crashes: list[float]) -> None:
    """One client: connect, send bad JSON, wait for the server's close; again."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        start = time.perf_counter()
        _, client = await loop.create_connection(lambda: EchoClient("/"), HOST, port)
        await client.handshake_done
        assert client.transport is not None
        client.transport.write(BAD_JSON)
        await client.closed
        crashes.append(time.perf_counter() - start)


async def _pinger(port: int, stop: asyncio.Event, rtts: list[float]) -> None:
    """Another connection, open meanwhile: a ping every 5 ms, its round trip recorded."""
    from websockets.asyncio.client import connect

    async with connect(f"ws://{HOST}:{port}/", ping_interval=None) as ws:
        while not stop.is_set():
            waiter = await ws.ping()
            rtts.append(await waiter)
            await asyncio.sleep(PING_EVERY)


async def _storm(port: int, duration: float, crashes: list[float], rtts: list[float]) -> None:
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(_pinger(port, stop, rtts)),
        asyncio.create_task(_crash_loop(port, stop, crashes)),
    ]
    await asyncio.sleep(duration)
    stop.set()
    await asyncio.gather(*tasks)


async def _measure(server: Any, duration: float, warmup: float) -> dict[str, Any]:
    await settle(server)
    # Imports, first events, caches: not measured.
    await _storm(server.port, warmup, [], [])
    crashes: list[float] = []
    rtts: list[float] = []
    before = await asyncio.to_thread(server.command, "flush")
    await asyncio.to_thread(server.command, "lag_start")
    await _storm(server.port, duration, crashes, rtts)
    lag = await asyncio.to_thread(server.command, "lag_stop")
    # The window ends once every exporter has sent what the crashes queued.
    after = await asyncio.to_thread(server.command, "flush")
    count = len(crashes)
    ping_ms = [r * 1000 for r in rtts]
    return {
        "crashes": count,
        "crashes_per_s": count / duration,
        "cpu_ms_per_crash": (after["cpu"] - before["cpu"]) / count * 1000 if count else None,
        # Full collections of what crashed connections left (cycles through tracebacks).
        "full_gc": after["gc"][2] - before["gc"][2],
        "stall": _lag_summary(lag["lag"]),
        "ping_ms": {
            "samples": len(ping_ms),
            "median": statistics.median(ping_ms) if ping_ms else None,
            "p99": _quantile(ping_ms, 0.99) if ping_ms else None,
            "max": max(ping_ms) if ping_ms else None,
        },
    }


def run(suite: Any, stack: ExitStack) -> dict[str, Any]:
    """The crash-storm section of ``python -m benchmarks`` (``--only crash``)."""
    duration = 1.0 if suite.quick else 5.0
    warmup = 0.3 if suite.quick else 1.0
    out: dict[str, Any] = {"duration": duration}
    for variant in VARIANTS:
        # One process at a time: the server core is the one being measured.
        with ExitStack() as own:
            server = suite.start(own, [variant])[variant]
            row = out[variant] = asyncio.run(_measure(server, duration, warmup))
        if not row["crashes"] or not row["stall"]["samples"] or not row["ping_ms"]["samples"]:
            suite.errors.append(f"crash storm: {variant} produced no numbers")
    return out


def _verdict(value: float | None, budget: float) -> str:
    return "-" if value is None else ("ok" if value <= budget else "OVER")


def table(results: dict[str, Any]) -> str:
    """The report lines of the crash-storm section ("" when it did not run)."""
    storm = results.get("crash_storm")
    if not storm:
        return ""
    lines = [
        "",
        f"Crash storm: one client making the handler raise in a loop for {storm['duration']:g} s"
        f", another connection pinging every {PING_EVERY * 1000:g} ms; budgets (crash-alerts): "
        f"{BUDGET_CPU_MS:g} ms CPU per crash, loop stall {BUDGET_STALL_MS:g} ms",
    ]
    for variant in VARIANTS:
        row = storm.get(variant)
        if not row or not row["crashes"]:
            continue
        cpu, stall, ping = row["cpu_ms_per_crash"], row["stall"], row["ping_ms"]
        budget = ""
        if variant != "crash-bare":
            budget = (
                f" [CPU {_verdict(cpu, BUDGET_CPU_MS)}, "
                f"stall {_verdict(stall['max_ms'], BUDGET_STALL_MS)}]"
            )
        lines.append(
            f"  {variant:16} {row['crashes_per_s']:6.0f} crashes/s, {cpu:6.3f} ms CPU per crash, "
            f"loop stall max {stall['max_ms']:6.2f} ms (p99 {stall['p99_ms']:.2f}, "
            f"{row['full_gc']} full GC), ping p99 {ping['p99']:.2f} ms max {ping['max']:.2f} ms"
            f"{budget}"
        )
    envelopes = results.get("exports", {}).get("envelopes")
    if envelopes is not None:
        lines.append(f"  Sentry envelopes received by the local receiver: {envelopes}")
    return "\n".join(lines)
