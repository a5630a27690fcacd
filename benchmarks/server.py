"""The server process of a benchmark: one echo server variant, driven over stdin/stdout.

Run as ``python -m benchmarks.server VARIANT [--otlp URL] [--log-file PATH]``. It prints
one JSON line when ready (``{"ready": true, "port": ..., "metrics_port": ...}``), then
answers one JSON line per command read on stdin:

``stats``  CPU seconds of this process (user + system, every thread), RSS bytes.
``flush``  flush exporters and log handlers first, then ``stats``: work a measured
           window caused is charged to that window, not to the next one.
``gc``     a full garbage collection, then ``stats`` (for memory readings).
``lag_start`` / ``lag_stop``  start / stop sampling event-loop lag (asyncio variants).
``quit``   exit.

Commands are read by a thread blocked in ``read()``: it costs nothing between commands.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import resource
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from . import variants

__all__ = ["main"]


def rss_bytes() -> int:
    """Resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def stats() -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        # CLOCK_PROCESS_CPUTIME_ID: nanosecond resolution, user + system, all threads.
        "cpu": time.process_time(),
        "user": usage.ru_utime,
        "sys": usage.ru_stime,
        "rss": rss_bytes(),
        "threads": threading.active_count(),
        "gc": [g["collections"] for g in gc.get_stats()],
    }


def flush() -> None:
    for flusher in variants.FLUSHERS:
        flusher()


class LagProbe:
    """Samples how late a 1 ms timer fires on the event loop (seconds)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.001) -> None:
        self.loop = loop
        self.interval = interval
        self.samples: list[float] = []
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop, interval, samples = self.loop, self.interval, self.samples
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            samples.append(loop.time() - before - interval)

    def start(self) -> None:
        self.samples.clear()
        self.task = self.loop.create_task(self._run())

    def stop(self) -> list[float]:
        if self.task is not None:
            self.task.cancel()
            self.task = None
        return list(self.samples)


def _in_loop(loop: asyncio.AbstractEventLoop, func: Callable[[], list[float]]) -> list[float]:
    """Run ``func`` in the event loop's thread and return its result."""
    return asyncio.run_coroutine_threadsafe(_call(func), loop).result(10)


async def _call(func: Callable[[], list[float]]) -> list[float]:
    return func()


def _traced_growth(before: tracemalloc.Snapshot) -> dict[str, Any]:
    """Python heap growth since ``before``: total, ws_monitoring's lines, the top lines."""
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    total = 0
    ours: dict[str, int] = {}
    lines: dict[str, int] = {}
    for stat in after.compare_to(before, "lineno"):
        total += stat.size_diff
        frame = stat.traceback[0]
        lines[f"{frame.filename}:{frame.lineno}"] = stat.size_diff
        if "ws_monitoring" in frame.filename:
            where = f"{frame.filename.rsplit('ws_monitoring/', 1)[-1]}:{frame.lineno}"
            ours[where] = ours.get(where, 0) + stat.size_diff
    # Every file's lines, not only ours: where the server's memory went, for the README.
    top = dict(sorted(lines.items(), key=lambda kv: -abs(kv[1]))[:60])
    return {"traced_bytes": total, "ws_monitoring_bytes": ours, "top_lines": top}


def serve_commands(
    reply: Callable[[dict[str, Any]], None], loop: asyncio.AbstractEventLoop | None, done: Any
) -> None:
    """Answer commands from stdin until ``quit`` or EOF; then call ``done()``."""
    probe = LagProbe(loop) if loop is not None else None
    # cProfile follows the thread that enables it: the event loop's, for asyncio servers.
    profiler: cProfile.Profile | None = None
    traced: tracemalloc.Snapshot | None = None
    for line in sys.stdin:
        command = line.strip()
        if command == "stats":
            reply(stats())
        elif command == "flush":
            flush()
            reply(stats())
        elif command == "gc":
            gc.collect()
            reply(stats())
        elif command == "lag_start":
            if probe is not None:
                assert loop is not None
                loop.call_soon_threadsafe(probe.start)
            reply({"ok": probe is not None})
        elif command == "lag_stop":
            samples = _in_loop(loop, probe.stop) if probe is not None and loop else []
            reply({"lag": samples})
        elif command == "profile_start" and loop is not None:
            profiler = cProfile.Profile()
            _in_loop(loop, lambda p=profiler: (p.enable(), [])[1])
            reply({"ok": True})
        elif command.startswith("profile_stop ") and loop is not None and profiler is not None:
            _in_loop(loop, lambda p=profiler: (p.disable(), [])[1])
            profiler.dump_stats(command.split(" ", 1)[1])
            profiler = None
            reply({"ok": True})
        elif command == "trace_start":
            gc.collect()
            tracemalloc.start(1)
            traced = tracemalloc.take_snapshot()
            reply({"ok": True})
        elif command == "trace_stop" and traced is not None:
            reply(_traced_growth(traced))
            traced = None
        elif command == "quit":
            break
        else:
            reply({"error": f"unknown command {command!r}"})
    done()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server")
    parser.add_argument("variant", choices=sorted(variants.SERVERS))
    parser.add_argument("--otlp", default=None, help="OTLP/HTTP base URL (http://host:port)")
    parser.add_argument("--alerts", default=None, help="Alertmanager base URL")
    parser.add_argument("--log-file", default=os.devnull)
    args = parser.parse_args(argv)
    # Thousands of idle connections need as many descriptors.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    out = sys.stdout
    lock = threading.Lock()

    def reply(message: dict[str, Any]) -> None:
        with lock:
            out.write(json.dumps(message) + "\n")
            out.flush()

    spec = variants.SERVERS[args.variant]
    options = variants.Options(
        otlp=args.otlp, alerts=args.alerts, log_file=args.log_file, service=args.variant
    )
    if spec.sync:
        server, info = spec.start_sync(options)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        reply({"ready": True, **info})
        serve_commands(reply, None, server.shutdown)
        thread.join(10)
        return

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        async with spec.start_async(options) as info:
            reply({"ready": True, **info})
            threading.Thread(
                target=serve_commands,
                args=(reply, loop, lambda: loop.call_soon_threadsafe(stopped.set)),
                daemon=True,
            ).start()
            await stopped.wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
