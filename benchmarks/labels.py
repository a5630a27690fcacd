"""Long labels: what connections to ~8 KB paths do to a scrape (issue 19, item 1).

Before label values were capped, 100 connections to ~8 KB paths grew one scrape from
5.6 KB to 64 MB (median 155 ms) and the server's RSS from 35 to 161 MB. Two servers, each
in its own process, with metrics only (and the ``/metrics`` server):

* ``labels-default``: ``ws_monitoring.serve(echo)``: the safe route grouping makes each
  path ``/x/{id}``. This row has the budgets: the scrape stays within
  :data:`BUDGET_BYTES` and :data:`BUDGET_SCRAPE_MS` (both in the report's Budgets list,
  registered with :func:`~benchmarks.report.add_budget`);
* ``labels-raw``: ``route_from_path=True`` (unsafe): every path is a route, capped at
  128 characters; half of ``max_routes`` get a series (routes seen once admit no more).

Reported per server: the scrape's size and time after one connection to a short path,
then after :data:`PATHS` connections to paths of :data:`PATH_LENGTH` bytes, and how much
the server's RSS grew meanwhile. Sizes are asserted in the tests
(``tests/test_labels.py``); times are only reported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import string
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from typing import Any

from .crash_storm import _verdict
from .harness import HOST, scrape_times, settle
from .report import add_budget

__all__ = ["BUDGET_BYTES", "BUDGET_SCRAPE_MS", "SERVERS", "VARIANTS", "run", "table"]

#: Scrape size after the long paths, with the default configuration.
BUDGET_BYTES = 16 * 1024
#: Median scrape time after the long paths (the README's scrape budget).
BUDGET_SCRAPE_MS = 50.0

#: The servers, in the order they are measured.
VARIANTS = ("labels-default", "labels-raw")
#: The row the budgets apply to.
BUDGETED = "labels-default"
#: Connections to long paths, and their length (websockets reads lines up to 8 KiB).
PATHS = 100
PATH_LENGTH = 8000


# -- the servers (run in the server process) ----------------------------------------------


async def _echo(websocket: Any) -> None:
    async for message in websocket:
        await websocket.send(message)


Start = Callable[[Any], contextlib.AbstractAsyncContextManager[dict[str, Any]]]


def _server(raw: bool) -> Start:
    def start(options: Any) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
        @contextlib.asynccontextmanager
        async def run() -> AsyncIterator[dict[str, Any]]:
            import ws_monitoring

            with ws_monitoring.start_metrics_server(0, HOST) as metrics:
                async with ws_monitoring.serve(
                    _echo, HOST, 0, route_from_path=raw, tracing=False, log_lifecycle=False
                ) as server:
                    yield {
                        "port": server.sockets[0].getsockname()[1],
                        "metrics_port": metrics.port,
                    }

        return run()

    return start


#: ``variants.SERVERS`` registers these (asyncio servers).
SERVERS: dict[str, Start] = {"labels-default": _server(False), "labels-raw": _server(True)}


# -- the load (run in the harness process) ------------------------------------------------


def _long_path(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + "-_"
    return "/x/" + "".join(rng.choices(alphabet, k=PATH_LENGTH - 3))


async def _connect(port: int, path: str) -> None:
    from websockets.asyncio.client import connect

    async with connect(f"ws://{HOST}:{port}{path}", ping_interval=None) as ws:
        await ws.send("x")
        await ws.recv()


async def _measure(server: Any, scrapes: int) -> dict[str, Any]:
    await settle(server)
    await _connect(server.port, "/x/1")
    baseline = await asyncio.to_thread(scrape_times, server.metrics_port, scrapes)
    before = await asyncio.to_thread(server.command, "gc")
    rng = random.Random(19)
    for _ in range(PATHS):
        await _connect(server.port, _long_path(rng))
    after = await asyncio.to_thread(server.command, "gc")
    scraped = await asyncio.to_thread(scrape_times, server.metrics_port, scrapes)
    return {
        "paths": PATHS,
        "path_bytes": PATH_LENGTH,
        "baseline": baseline,
        "after": scraped,
        "rss_growth_bytes": after["rss"] - before["rss"],
    }


def run(suite: Any, stack: ExitStack) -> dict[str, Any]:
    """The long-labels section of ``python -m benchmarks`` (``--only labels``)."""
    out: dict[str, Any] = {}
    for variant in VARIANTS:
        with ExitStack() as own:
            server = suite.start(own, [variant])[variant]
            row = out[variant] = asyncio.run(_measure(server, 5 if suite.quick else 20))
        if not row["after"]["bytes"]:
            suite.errors.append(f"long labels: {variant} produced no numbers")
    # The budgeted row's two numbers; None ("not measured") when it produced none.
    after = out[BUDGETED]["after"]
    measured = bool(after["bytes"])
    label = f"{BUDGETED}: scrape after {PATHS} long paths"
    add_budget(
        suite.results,
        "long labels",
        f"{label}, size",
        after["bytes"] if measured else None,
        BUDGET_BYTES,
        "B",
    )
    add_budget(
        suite.results,
        "long labels",
        f"{label}, median",
        after["ms"]["median"] if measured else None,
        BUDGET_SCRAPE_MS,
        "ms",
    )
    return out


def table(results: dict[str, Any]) -> str:
    """The report lines of the long-labels section ("" when it did not run)."""
    rows = results.get("labels")
    if not rows:
        return ""
    lines = [
        "",
        f"Long labels: {PATHS} connections to {PATH_LENGTH}-byte paths; budgets "
        f"({BUDGETED}): scrape {BUDGET_BYTES // 1024} KiB, {BUDGET_SCRAPE_MS:g} ms",
    ]
    for variant in VARIANTS:
        row = rows.get(variant)
        if not row:
            continue
        size, ms = row["after"]["bytes"], row["after"]["ms"]["median"]
        budget = ""
        if variant == BUDGETED:
            budget = (
                f" [size {_verdict(size, BUDGET_BYTES)}, time {_verdict(ms, BUDGET_SCRAPE_MS)}]"
            )
        lines.append(
            f"  {variant:16} scrape {row['baseline']['bytes']:>8} B -> {size:>8} B, "
            f"median {row['baseline']['ms']['median']:.2f} -> {ms:.2f} ms, "
            f"RSS +{row['rss_growth_bytes'] / 1e6:.1f} MB{budget}"
        )
    return "\n".join(lines)
