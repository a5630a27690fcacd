"""``python -m benchmarks [--quick]``: the benchmark suite (see ``benchmarks/README.md``).

Exit status: 0 when every variant and measurement produced numbers, 1 otherwise. No
time threshold ever fails a run: budgets are reported, not enforced.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from . import crash_storm, harness, labels, report
from .breakdown import breakdown
from .instructions import instructions
from .procs import Receiver, ServerProcess, cpu_plan, raise_fd_limit

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: The variants of the main comparison (report.VARIANTS order).
MAIN = [variant for variant, *_ in report.VARIANTS]
#: Variants of the scaling runs.
SCALING = ["bare", "metrics", "defaults"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: every variant once, small sizes (<60 s)"
    )
    parser.add_argument("--reps", type=int, help="interleaved rounds (default 12, quick 2)")
    parser.add_argument("--duration", type=float, help="seconds per measured window")
    parser.add_argument("--connections", type=int, help="idle connections (default 5000)")
    parser.add_argument(
        "--only",
        default="main,scaling,memory,lag,crash,labels,breakdown",
        help="comma-separated sections: main, scaling, memory (includes scrapes), lag, crash, "
        "labels, breakdown, profile, instructions (callgrind; not in the default set)",
    )
    parser.add_argument("--variants", help="comma-separated subset of the main variants")
    parser.add_argument("--profile", action="store_true", help="also profile the servers")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--out", default=None, help="results directory (default benchmarks/results)"
    )
    return parser.parse_args(argv)


class Suite:
    """One run: child processes, settings, results and the errors met on the way."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.reps: int = args.reps or (2 if self.quick else 12)
        self.duration: float = args.duration or (0.25 if self.quick else 1.0)
        self.idle: int = args.connections or (300 if self.quick else 5000)
        self.sections = set(args.only.split(","))
        if args.profile:
            self.sections.add("profile")
        self.variants = args.variants.split(",") if args.variants else MAIN
        unknown = set(self.variants) - set(MAIN)
        if unknown:
            raise SystemExit(f"unknown variants: {', '.join(sorted(unknown))}")
        self.server_cpus, self.load_cpus = (None, None) if args.no_pin else cpu_plan()
        self.shape = harness.EchoShape(
            connections=10, window=8, size=64, duration=self.duration,
            warmup=0.1 if self.quick else 0.3,
        )  # fmt: skip
        self.errors: list[str] = []
        self.logdir = tempfile.mkdtemp(prefix="ws-monitoring-bench-")
        self.results: dict[str, Any] = {
            "machine": report.machine(),
            "config": {
                "quick": self.quick,
                "reps": self.reps,
                "duration": self.duration,
                "shape": self.shape.label,
                "idle_connections": self.idle,
                "pinning": (
                    f"server on CPU {sorted(self.server_cpus)}, load on CPU "
                    f"{sorted(self.load_cpus)}"
                    if self.server_cpus and self.load_cpus
                    else "none"
                ),
            },
            "errors": self.errors,
        }
        self.receiver: Receiver | None = None

    def say(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def start(self, stack: ExitStack, variants: list[str]) -> dict[str, ServerProcess]:
        """Start ``variants`` in parallel (unpinned while importing), wait, then pin."""
        assert self.receiver is not None
        servers = {}
        for variant in variants:
            server = ServerProcess(
                variant,
                self.server_cpus,
                otlp=self.receiver.url,
                alerts=self.receiver.url,
                log_file=os.path.join(self.logdir, f"{variant}.log"),
            )
            stack.callback(server.stop)
            servers[variant] = server
        for server in servers.values():
            server.wait_ready()
        return servers

    def start_under(self, variant: str, *, prefix: list[str]) -> ServerProcess:
        """One server process (not pinned, not waited for) running under ``prefix``."""
        assert self.receiver is not None
        return ServerProcess(
            variant,
            None,
            otlp=self.receiver.url,
            alerts=self.receiver.url,
            log_file=os.path.join(self.logdir, f"{variant}.callgrind.log"),
            prefix=prefix,
        )

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self.say(f"{name}...")
        try:
            yield
        except Exception as exc:  # one broken section must not hide the others
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            self.say(f"{name} FAILED: {exc!r}")
        self.say(f"{name} done in {time.perf_counter() - start:.1f} s")

    # -- sections -------------------------------------------------------------------------

    def main_comparison(self, stack: ExitStack) -> None:
        servers = self.start(stack, self.variants)
        runs = asyncio.run(
            harness.interleaved(list(servers.values()), self.shape, self.reps, self.say)
        )
        floors = {v: f for v, _, f, _ in report.VARIANTS}
        main = {}
        for variant in self.variants:
            floor = runs.get(floors[variant])
            main[variant] = harness.summarize(runs[variant], floor)
            if not main[variant]["messages"] or main[variant]["cpu_us_per_msg"]["median"] is None:
                self.errors.append(f"main: variant {variant} produced no numbers")
        self.results["main"] = main
        if "profile" in self.sections and "bare" in servers:
            self.results["profile"] = self.profile(servers)

    def profile(self, servers: dict[str, ServerProcess]) -> dict[str, Any]:
        """Python calls and own time per message of each ws-monitoring variant, vs bare."""
        stats = {}
        for variant in ("bare", "metrics", "defaults", "all-spans"):
            if variant in servers:
                path = os.path.join(self.logdir, f"{variant}.pstats")
                messages = asyncio.run(harness.profile_window(servers[variant], self.shape, path))
                stats[variant] = report.profile_stats(path, messages)
        bare = stats.pop("bare")
        return {
            variant: {
                "calls_per_msg": sum(c for c, _ in rows.values()),
                "bare_calls_per_msg": sum(c for c, _ in bare.values()),
                "top": report.profile_diff(bare, rows),
            }
            for variant, rows in stats.items()
        }

    def scaling(self, stack: ExitStack) -> None:
        servers = self.start(stack, SCALING)
        order = [servers[v] for v in SCALING]
        shapes = [
            harness.EchoShape(connections=1, window=80, size=64),
            harness.EchoShape(connections=100, window=1, size=64),
            harness.EchoShape(connections=1000, window=1, size=64),
            harness.EchoShape(connections=10, window=8, size=4096),
            harness.EchoShape(connections=10, window=2, size=256 * 1024),
        ]
        reps = 1 if self.quick else 5
        out: dict[str, Any] = {}
        for base in shapes:
            shape = harness.EchoShape(
                base.connections, base.window, base.size,
                duration=0.2 if self.quick else self.duration,
                warmup=0.05 if self.quick else 0.2,
            )  # fmt: skip
            runs = asyncio.run(harness.interleaved(order, shape, reps))
            rows = {v: harness.summarize(runs[v], runs["bare"]) for v in SCALING}
            for variant, row in rows.items():
                if not row["messages"]:
                    self.errors.append(f"scaling: {variant} at {shape.label} produced no numbers")
            out[f"{shape.connections} conn, {_size(shape.size)}"] = rows
            self.say(f"  {shape.label}")
        self.results["scaling"] = out

    def memory(self, stack: ExitStack) -> None:
        memory: dict[str, Any] = {}
        scrape: dict[str, Any] = {}
        for variant in ("bare", "metrics", "defaults"):
            # A fresh process each: its heap holds nothing but these connections.
            with ExitStack() as own:
                server = self.start(own, [variant])[variant]
                memory[variant], scraped = asyncio.run(self._memory(server))
                if scraped is not None:
                    scrape[variant] = scraped
            # Another one for tracemalloc, whose own bookkeeping would inflate the RSS.
            with ExitStack() as own:
                server = self.start(own, [variant])[variant]
                memory[variant].update(
                    asyncio.run(harness.traced_per_connection(server, self.idle, routes=100))
                )
            row = memory[variant]
            self.say(
                f"  {variant}: {row['bytes_per_connection']:.0f} B RSS, "
                f"{row['python_bytes_per_connection']:.0f} B Python heap per connection"
            )
        self.results["memory"] = memory
        self.results["scrape"] = scrape

    async def _memory(self, server: ServerProcess) -> tuple[dict[str, Any], dict[str, Any] | None]:
        row, clients = await harness.memory_per_connection(server, self.idle, routes=100)
        try:
            if server.metrics_port is None:
                return row, None
            # One message each, so the scrape exposes non-empty series for every route.
            await harness.one_message_each(clients)
            times = await asyncio.to_thread(
                harness.scrape_times, server.metrics_port, 5 if self.quick else 20
            )
            return row, {"connections": self.idle, "routes": 100, **times}
        finally:
            await harness.close_clients(clients)

    def lag(self, stack: ExitStack) -> None:
        server = self.start(stack, ["alerting"])["alerting"]
        # One message in flight per connection: a busy server, not a saturated one, so
        # the lag measured is stalls, not the queueing of a saturated loop.
        shape = harness.EchoShape(
            connections=10, window=1, size=64, duration=1.0 if self.quick else 5.0, warmup=0.2
        )
        self.results["lag"] = asyncio.run(self._lag(server, shape))

    async def _lag(self, server: ServerProcess, shape: harness.EchoShape) -> dict[str, Any]:
        idle = await harness.open_idle(server, self.idle, routes=100)
        try:
            await harness.one_message_each(idle)
            # The full collection that opening them owes (their objects went to the
            # oldest generation uncollected) would otherwise land in a measured window,
            # with or without ws-monitoring: 250-530 ms on the development VM.
            await asyncio.to_thread(server.command, "gc")
            out = await harness.lag_under_load(
                server, shape, scrape_every=0.2, crash_every=0.1, progress=self.say
            )
        finally:
            await harness.close_clients(idle)
        out["idle_connections"] = self.idle
        for phase in harness.LAG_PHASES:
            if not out.get(phase, {}).get("samples"):
                self.errors.append(f"lag: no samples in phase {phase}")
        return out

    def run(self) -> int:
        raise_fd_limit()
        if self.load_cpus:
            os.sched_setaffinity(0, self.load_cpus)
        with ExitStack() as stack:
            self.receiver = Receiver(self.load_cpus)
            stack.callback(self.receiver.stop)
            self.receiver.wait_ready()
            if "main" in self.sections:
                with self.section("main comparison"), ExitStack() as own:
                    self.main_comparison(own)
            if "scaling" in self.sections:
                with self.section("cost scaling"), ExitStack() as own:
                    self.scaling(own)
            if "memory" in self.sections:
                with self.section("memory and scrapes"), ExitStack() as own:
                    self.memory(own)
            if "lag" in self.sections:
                with self.section("event-loop lag"), ExitStack() as own:
                    self.lag(own)
            if "instructions" in self.sections:
                with self.section("instructions under callgrind"):
                    self.results["instructions"] = instructions(
                        self.variants,
                        self.start_under,
                        floors={v: f for v, _, f, _ in report.VARIANTS},
                        quick=self.quick,
                        progress=self.say,
                    )
            if "crash" in self.sections:
                with self.section("crash storm"), ExitStack() as own:
                    self.results["crash_storm"] = crash_storm.run(self, own)
            if "labels" in self.sections:
                with self.section("long labels"), ExitStack() as own:
                    self.results["labels"] = labels.run(self, own)
            exports = self.receiver.command("stats")
            self.results["exports"] = exports
        spans = exports["spans"]
        if "main" in self.sections and "all-spans" in self.variants and not spans.get("all-spans"):
            self.errors.append("main: all-spans exported no span to the OTLP receiver")
        if "breakdown" in self.sections:
            with self.section("hot-path breakdown"):
                self.results["breakdown"] = breakdown(self.quick)
        self.results["machine"]["loadavg_end"] = list(os.getloadavg())
        return self.finish()

    def finish(self) -> int:
        out = self.args.out or RESULTS
        os.makedirs(out, exist_ok=True)
        # Quick runs (CI) must not replace the results the README shows.
        stem = "quick" if self.quick else "latest"
        suffix = ".tmp" if self.quick else ""
        json_path = os.path.join(out, f"{stem}.json{suffix}")
        png_path = os.path.join(out, f"{stem}.png{suffix}")
        report.write_json(self.results, json_path)
        drew = report.chart(self.results, png_path) if "main" in self.sections else False
        print(
            report.table(self.results)
            + crash_storm.table(self.results)
            + labels.table(self.results)
        )
        print(f"\nResults: {json_path}" + (f", chart: {png_path}" if drew else ""))
        return 1 if self.errors else 0


def _size(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def main(argv: list[str] | None = None) -> int:
    return Suite(_parse(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
