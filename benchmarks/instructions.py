"""Instructions per echoed message under callgrind: a load-proof check of the CPU budgets.

Wall-clock ratios need a quiet machine; instruction counts do not: each server variant
runs under ``valgrind --tool=callgrind`` with instrumentation off while it starts and
warms up (CPython specializes its bytecode then), on for one window of echoes, and
the window's instruction count (``Ir``) is divided by the messages it echoed. Counts
say nothing of cache misses or the cost of each instruction: they rank variants and
show what a change saves, reproducibly (two runs of one variant agree within 0.1 %).

``python -m benchmarks --only instructions [--variants bare,metrics,...]``; needs
``valgrind`` (``apt-get install valgrind``): without it the section reports an error.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from .harness import HOST
from .load import close_clients, open_clients, run_load
from .procs import ServerProcess

__all__ = ["instructions"]

#: Connections, messages in flight on each, payload: the main comparison's shape.
SHAPE = (10, 8, 64)


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _total(path: str) -> int:
    """The ``totals:`` line of the window's dump (``path.1``): instructions executed."""
    with open(path + ".1") as f:
        for line in f:
            if line.startswith("totals:"):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}.1")


async def _window(server: ServerProcess, warmup: float, duration: float) -> int:
    connections, window, size = SHAPE
    clients = await open_clients(HOST, server.port, ["/"] * connections, timeout=300)
    try:
        payload = b"\x42" * size
        await run_load(clients, payload, window=window, duration=warmup)
        pid = server.proc.pid
        await asyncio.to_thread(_control, pid, "--instr=on")
        result = await run_load(clients, payload, window=window, duration=duration)
        await asyncio.to_thread(_control, pid, "--dump")
        await asyncio.to_thread(_control, pid, "--instr=off")
    finally:
        await close_clients(clients)
    return result.messages


def instructions(
    variants: Sequence[str],
    start: Callable[..., ServerProcess],
    *,
    floors: dict[str, str] | None = None,
    quick: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Instructions per echoed message of each variant, and the ratio to its floor's.

    ``start(variant, prefix=...)`` starts a server process under that command;
    ``floors`` maps a variant to its floor (default ``bare``; ratios need it measured).
    """
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise RuntimeError("valgrind is not installed (apt-get install valgrind)")
    out: dict[str, Any] = {"shape": "{} conn x {} in flight, {} B".format(*SHAPE), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="ws-monitoring-callgrind-") as tmp:
        for variant in variants:
            path = os.path.join(tmp, variant)
            prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                      f"--callgrind-out-file={path}"]  # fmt: skip
            server = start(variant, prefix=prefix)
            try:
                server.wait_ready(timeout=600)
                messages = asyncio.run(
                    _window(server, 1.0 if quick else 3.0, 1.0 if quick else 4.0)
                )
            finally:
                server.stop()
            if not messages:
                raise RuntimeError(f"{variant}: no message echoed under callgrind")
            out["variants"][variant] = {"messages": messages, "ir_per_msg": _total(path) / messages}
            progress(f"  {variant}: {out['variants'][variant]['ir_per_msg']:.0f} Ir/msg")
    counted = out["variants"]
    for variant, row in counted.items():
        floor = counted.get((floors or {}).get(variant, "bare"))
        row["ratio"] = row["ir_per_msg"] / floor["ir_per_msg"] if floor else None
    return out
