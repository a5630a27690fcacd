"""Turning results into a table on stdout, a JSON file and a PNG chart."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

from .asgi import VARIANTS as ASGI_VARIANTS

__all__ = ["VARIANTS", "Budget", "add_budget", "budgets", "chart", "machine", "table", "write_json"]

#: (variant, label, floor variant, budget ratio or None), in report order.
VARIANTS: tuple[tuple[str, str, str, float | None], ...] = (
    ("bare", "1. bare websockets (floor)", "bare", None),
    ("recipe-1pct", "2. common recipe, 1 % sampled", "bare", None),
    ("recipe-100pct", "2. common recipe, 100 % sampled", "bare", None),
    ("metrics", "3. ws-monitoring metrics only", "bare", 1.04),
    ("defaults", "4. ws-monitoring defaults", "bare", 1.06),
    ("all-spans", "5. ws-monitoring, 100 % spans", "bare", 2.0),
    ("instrument-metrics", "3b. instrument(), metrics only", "bare", 1.05),
    ("instrument-defaults", "4b. instrument(), defaults", "bare", 1.08),
    ("python-metrics", "3c. pure Python, metrics only", "bare", None),
    ("python-defaults", "4c. pure Python, defaults", "bare", 1.20),
    ("sync-bare", "6. threading: bare (floor)", "sync-bare", None),
    ("sync-metrics", "6. threading: metrics only", "sync-bare", None),
    ("sync-defaults", "6. threading: defaults", "sync-bare", None),
    *ASGI_VARIANTS,
)
LABELS = {v: label for v, label, _, _ in VARIANTS}

#: Extra Python heap per idle connection, bytes, for each budgeted variant.
MEMORY_BUDGETS = {"metrics": 1024.0, "defaults": 1024.0}
#: A scrape of the idle connections (p95), and the worst event-loop stall, in ms.
SCRAPE_BUDGET_MS = 50.0
STALL_BUDGET_MS = 10.0


@dataclasses.dataclass(frozen=True)
class Budget:
    """One measured row and its budget (lower is better): what the report checks.

    Any section adds its own with :func:`add_budget` (e.g. the ASGI or label rows);
    the table lists them all and the chart draws each as measured / budget.
    """

    section: str
    label: str
    value: float | None  # None: not measured in this run
    limit: float
    unit: str  # "x" (ratio to the floor), "B", "ms", ...

    @property
    def status(self) -> str:
        if self.value is None:
            return "not measured"
        return "ok" if self.value <= self.limit else "OVER"

    def show(self, value: float | None) -> str:
        if value is None:
            return "-"
        if self.unit == "x":
            return f"{value:.3f}x"
        return f"{value:.0f} {self.unit}" if self.unit == "B" else f"{value:.2f} {self.unit}"


def add_budget(
    results: dict[str, Any],
    section: str,
    label: str,
    value: float | None,
    limit: float,
    unit: str,
) -> None:
    """Record a row with a budget in ``results`` (kept in the JSON, shown by the report)."""
    results.setdefault("budgets", []).append(
        {"section": section, "label": label, "value": value, "limit": limit, "unit": unit}
    )


def budgets(results: dict[str, Any]) -> list[Budget]:
    """Every row of this run that has a budget: the built-in sections, then the added ones."""
    rows: list[Budget] = []
    main = results.get("main") or {}
    for variant, label, _floor, limit in VARIANTS:
        if limit is not None and variant in main:
            ratio = (main[variant].get("ratio") or {}).get("median")
            rows.append(Budget("CPU per message", label, ratio, limit, "x"))
    counted = (results.get("instructions") or {}).get("variants") or {}
    for variant, label, _floor, limit in VARIANTS:
        if limit is not None and variant in counted and counted[variant]["ratio"] is not None:
            value = counted[variant]["ratio"]
            rows.append(Budget("instructions", label, value, limit, "x"))
    memory = results.get("memory") or {}
    bare = memory.get("bare")
    for variant, limit in MEMORY_BUDGETS.items():
        row = memory.get(variant)
        if row and bare:
            extra = row["python_bytes_per_connection"] - bare["python_bytes_per_connection"]
            rows.append(Budget("memory", f"{variant}: heap per idle connection", extra, limit, "B"))
    for variant, row in (results.get("scrape") or {}).items():
        rows.append(
            Budget("scrape", f"{variant}: scrape p95", row["ms"]["p95"], SCRAPE_BUDGET_MS, "ms")
        )
    worst = ((results.get("lag") or {}).get("load+scrapes+alerts") or {}).get("max_ms")
    if results.get("lag"):
        rows.append(Budget("lag", "loop stall, scrapes + crashes", worst, STALL_BUDGET_MS, "ms"))
    rows.extend(_crash_storm_budgets(results))
    rows.extend(Budget(**row) for row in results.get("budgets", []))
    return rows


def _crash_storm_budgets(results: dict[str, Any]) -> list[Budget]:
    from . import crash_storm

    row = (results.get("crash_storm") or {}).get(crash_storm.BUDGETED)
    if not row:
        return []
    label = crash_storm.BUDGETED
    return [
        Budget("crash storm", f"{label}: CPU per crash", row.get("cpu_ms_per_crash"),
               crash_storm.BUDGET_CPU_MS, "ms"),
        Budget("crash storm", f"{label}: loop stall", (row.get("stall") or {}).get("max_ms"),
               crash_storm.BUDGET_STALL_MS, "ms"),
    ]  # fmt: skip


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def machine() -> dict[str, Any]:
    """Where the numbers come from."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "loadavg": list(os.getloadavg()),
        "packages": {
            name: _version(name)
            for name in (
                "websockets",
                "prometheus_client",
                "opentelemetry-sdk",
                "python-json-logger",
                "uvicorn",
                "fastapi",
                "ws-monitoring",
            )
        },
        "git": commit,
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks", *sys.argv[1:]]),
    }


def _fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def table(results: dict[str, Any]) -> str:
    """The human-readable report."""
    lines: list[str] = []
    add = lines.append
    m = results["machine"]
    add(f"Machine: {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}, {m['python']}")
    add(f"Pinning: {results['config']['pinning']}; load average at start {m['loadavg'][0]:.2f}")
    main = results.get("main")
    if main:
        cfg = results["config"]
        add("")
        add(
            f"Server CPU per message: echo of {cfg['shape']}, {cfg['reps']} interleaved rounds "
            f"of {cfg['duration']} s; medians (p25-p75)"
        )
        add(f"{'variant':34} {'µs/msg':>22} {'ratio to floor':>20} {'budget':>8} {'msg/s':>8}")
        for variant, label, _floor, budget in VARIANTS:
            row = main.get(variant)
            if row is None:
                continue
            cpu = row["cpu_us_per_msg"]
            ratio = row.get("ratio") or {}
            ok = ""
            if budget is not None and ratio.get("median") is not None:
                ok = " ok" if ratio["median"] <= budget else " OVER"
            add(
                f"{label:34} "
                f"{_fmt(cpu['median'], '.2f'):>8} ({_fmt(cpu['p25'], '.1f')}-"
                f"{_fmt(cpu['p75'], '.1f')}){'':>2} "
                f"{_fmt(ratio.get('median'), '.3f', 'x'):>8} ({_fmt(ratio.get('p25'), '.2f')}-"
                f"{_fmt(ratio.get('p75'), '.2f')}) "
                f"{(_fmt(budget, '.2f', 'x') + ok) if budget else '':>8} "
                f"{_fmt(row['msgs_per_s']['median'], '.0f'):>8}"
            )
        spans = results.get("exports", {}).get("spans", {})
        if spans:
            add("Spans received by the local OTLP receiver: " + ", ".join(
                f"{k} {v}" for k, v in sorted(spans.items())
            ))  # fmt: skip
    scaling = results.get("scaling")
    if scaling:
        add("")
        add("Cost scaling: server µs per message (ratio to bare, same rounds), medians")
        for shape, rows in scaling.items():
            cells = []
            for variant, row in rows.items():
                med = row["cpu_us_per_msg"]["median"]
                ratio = (row.get("ratio") or {}).get("median")
                cells.append(
                    f"{variant} {_fmt(med, '.2f')}"
                    + ("" if variant == "bare" else f" ({_fmt(ratio, '.3f', 'x')})")
                )
            add(f"  {shape:32} " + "  ".join(cells))
    memory = results.get("memory")
    if memory:
        add("")
        bare = memory.get("bare", {})
        add(
            f"Memory per idle connection ({bare.get('connections', '?')} connections, 100 "
            "routes): RSS growth, and Python heap growth (tracemalloc, another process)"
        )
        for variant, row in memory.items():
            extra = ""
            if bare and variant != "bare":
                rss = row["bytes_per_connection"] - bare["bytes_per_connection"]
                heap = row["python_bytes_per_connection"] - bare["python_bytes_per_connection"]
                extra = (
                    f"  extra vs bare: {rss:+.0f} B RSS, {heap:+.0f} B heap, "
                    f"{row['ws_monitoring_bytes_per_connection']:.0f} B allocated by "
                    "ws_monitoring code (budget +1024 B)"
                )
            add(
                f"  {variant:9} {row['bytes_per_connection']:7.0f} B RSS "
                f"{row['python_bytes_per_connection']:7.0f} B heap{extra}"
            )
    scrape = results.get("scrape")
    if scrape:
        for variant, row in scrape.items():
            add(
                f"Scrape of /metrics, {row['connections']} connections on {row['routes']} "
                f"routes, {variant}: median {row['ms']['median']:.1f} ms, p95 "
                f"{row['ms']['p95']:.1f} ms, max {row['ms']['max']:.1f} ms (budget 50 ms), "
                f"{row['bytes']} bytes"
            )
    lag = results.get("lag")
    if lag:
        add("")
        add(
            f"Event-loop lag (1 ms timer lateness), {lag['shape']}, {lag['idle_connections']} idle:"
        )
        for phase in ("load", "load+scrapes", "load+alerts", "load+scrapes+alerts"):
            row = lag.get(phase)
            if row:
                add(
                    f"  {phase:22} p50 {_fmt(row['p50_ms'], '.2f')} ms, p99 "
                    f"{_fmt(row['p99_ms'], '.2f')} ms, max {_fmt(row['max_ms'], '.2f')} ms, "
                    f"{row.get('over_10ms', 0)} samples > 10 ms; {row['scrapes']} scrapes "
                    f"(max {_fmt(row['scrape_ms_max'], '.1f')} ms), {row['crashes']} crashes, "
                    f"{row.get('full_gc', 0)} full GC"
                )
        alerts = results.get("exports", {}).get("alerts")
        if alerts is not None:
            add(f"  alerts delivered to the local Alertmanager stand-in: {alerts}")
    counted = results.get("instructions")
    if counted:
        add("")
        add(f"Instructions per echoed message under callgrind ({counted['shape']}; load-proof):")
        for variant, row in counted["variants"].items():
            ratio = row["ratio"]
            add(
                f"  {LABELS.get(variant, variant):34} {row['ir_per_msg']:9.0f} Ir/msg  "
                f"{_fmt(ratio, '.4f', 'x')}"
            )
    breakdown = results.get("breakdown")
    if breakdown:
        add("")
        add("Hot path, metrics only (ns per call, best of batches, in-process):")
        for name, row in breakdown.items():
            add(f"  {row['overhead_ns']:7.0f} ns  {name}")
    profile = results.get("profile")
    if profile:
        for variant, info in profile.items():
            add("")
            add(
                f"Profile, {variant} vs bare (cProfile in the event loop; µs are inflated by "
                f"the profiler): {info['calls_per_msg']:.1f} Python calls per message "
                f"(bare {info['bare_calls_per_msg']:.1f})"
            )
            for row in info["top"][:12]:
                add(
                    f"  {row['extra_us_per_msg']:+6.2f} µs {row['extra_calls_per_msg']:+5.2f} "
                    f"calls  {row['function']}"
                )
    rows = budgets(results)
    if rows:
        add("")
        add("Budgets (lower is better; every row of this run that has one):")
        for row in rows:
            add(
                f"  {row.section:16} {row.label:42} {row.show(row.value):>12}  "
                f"budget {row.show(row.limit):>9}  {row.status}"
            )
    if results.get("errors"):
        add("")
        add("ERRORS:")
        for error in results["errors"]:
            add(f"  {error}")
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: str) -> None:
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def chart(results: dict[str, Any], path: str) -> bool:
    """A PNG of the ratios to the floor, with the budgets; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    main = results.get("main") or {}
    rows = [(v, label, budget) for v, label, _f, budget in VARIANTS if v in main]
    scaling = results.get("scaling") or {}
    budgeted = [row for row in budgets(results) if row.value is not None]
    panels = 1 + bool(scaling) + bool(budgeted)
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 5.5), squeeze=False)
    ax = axes[0][0]
    names = [label for _, label, _ in rows]
    medians = [(main[v].get("ratio") or {}).get("median") or 0.0 for v, _, _ in rows]
    lo = [
        m - ((main[v].get("ratio") or {}).get("p25") or m)
        for (v, _, _), m in zip(rows, medians, strict=True)
    ]
    hi = [
        ((main[v].get("ratio") or {}).get("p75") or m) - m
        for (v, _, _), m in zip(rows, medians, strict=True)
    ]
    colors = [
        "#888888" if "bare" in v else "#d62728" if v.startswith("recipe") else "#1f77b4"
        for v, _, _ in rows
    ]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, medians, xerr=[lo, hi], color=colors, capsize=3)
    for yi, (_, _, budget) in zip(y, rows, strict=True):
        if budget is not None:
            ax.plot([budget, budget], [yi - 0.4, yi + 0.4], color="black", linewidth=2)
    for yi, m, h in zip(y, medians, hi, strict=True):
        ax.text((m + h) * 1.03, yi, f"{m:.2f}x", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xscale("log")
    ticks = [1, 1.25, 1.5, 2, 3, 5, 8]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}x" for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlim(0.9, max([*medians, 2.0]) * 1.6)
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("server CPU per message / bare server's (log; black ticks: budgets)")
    ax.set_title(
        f"Cost per 64 B echo, ratio to the bare server\n{results['config']['shape']}", fontsize=9
    )
    if scaling:
        ax2 = axes[0][1]
        shapes = list(scaling)
        for variant, color in (("metrics", "#1f77b4"), ("defaults", "#2ca02c")):
            values = [
                ((scaling[s].get(variant) or {}).get("ratio") or {}).get("median") for s in shapes
            ]
            ax2.plot(
                range(len(shapes)),
                [v or float("nan") for v in values],
                "o-",
                color=color,
                label=variant,
            )
        ax2.axhline(1.0, color="grey", linewidth=0.8)
        ax2.set_xticks(range(len(shapes)))
        ax2.set_xticklabels(shapes, rotation=30, ha="right", fontsize=8)
        ax2.set_ylabel("ratio to bare (same rounds)")
        ax2.set_title("Cost scaling", fontsize=9)
        ax2.legend(fontsize=8)
    if budgeted:
        _budget_panel(axes[0][panels - 1], budgeted)
    m = results["machine"]
    fig.suptitle(f"{m['cpu']}, {m['cpus']} CPUs, {m['python']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return True


def _budget_panel(ax: Any, rows: list[Budget]) -> None:
    """Each budgeted row as measured / budget: 1.0 is the budget (ratios: their excess)."""

    def share(row: Budget) -> float:
        assert row.value is not None
        if row.unit == "x":  # a ratio to the floor: compare what it adds to the floor
            return (row.value - 1) / (row.limit - 1) if row.limit > 1 else row.value / row.limit
        return row.value / row.limit

    shares = [share(row) for row in rows]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, shares, color=["#2ca02c" if v <= 1 else "#d62728" for v in shares])
    ax.axvline(1.0, color="black", linewidth=1.5)
    for yi, row, v in zip(y, rows, shares, strict=True):
        ax.text(v * 1.02 + 0.02, yi, f"{row.show(row.value)} / {row.show(row.limit)}",
                va="center", fontsize=7)  # fmt: skip
    ax.set_yticks(y)
    ax.set_yticklabels([f"{row.section}: {row.label}" for row in rows], fontsize=7)
    ax.set_xlim(0, max([*shares, 1.0]) * 1.45)
    ax.set_xlabel("measured / budget (ratios: overhead / allowed overhead)")
    ax.set_title("Every row with a budget (green: met)", fontsize=9)


def profile_stats(stats_path: str, messages: int) -> dict[str, tuple[float, float]]:
    """``function -> (calls per message, own µs per message)`` from a cProfile dump."""
    import pstats

    stats = pstats.Stats(stats_path)
    out: dict[str, tuple[float, float]] = {}
    n = max(1, messages)
    for (filename, line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        calls, tottime = row[1], row[2]
        short = filename
        for marker in ("site-packages/", "/lib/python3", "/work/main/"):
            if marker in short:
                short = short.split(marker, 1)[1]
        out[f"{name} ({short}:{line})"] = (calls / n, tottime / n * 1e6)
    return out


def profile_diff(
    base: dict[str, tuple[float, float]], other: dict[str, tuple[float, float]], top: int = 15
) -> list[dict[str, Any]]:
    """Functions whose own time per message grew most from ``base`` to ``other``."""
    rows = []
    for function in set(base) | set(other):
        b_calls, b_us = base.get(function, (0.0, 0.0))
        o_calls, o_us = other.get(function, (0.0, 0.0))
        rows.append(
            {
                "function": function,
                "extra_calls_per_msg": o_calls - b_calls,
                "extra_us_per_msg": o_us - b_us,
            }
        )
    rows.sort(key=lambda r: -r["extra_us_per_msg"])
    return rows[:top]
