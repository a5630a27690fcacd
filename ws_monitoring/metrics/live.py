"""The live page of the metrics server: ``/`` (also ``/live``) and ``/live.json``.

A look at what the server does now, for whoever has no Grafana at hand: open
connections, rates, handling-time quantiles, errors, recent crashes and the sinks'
state, as numbers and small sparklines, refreshed every :data:`INTERVAL` seconds.

**Where the numbers come from.** A sample collects the registry the metrics server
serves, as a scrape does (the same collectors reading the same records), and keeps the
values the page needs: no second counting path, nothing on the per-message hot path.
In multiprocess mode that registry is the workers' mmap aggregate, so the page shows
what ``/metrics`` shows and says what does not exist there (crashes, exemplars).
Samples are taken only while someone polls ``/live.json``, at most one per
:data:`INTERVAL` however many viewers there are; the last :data:`HISTORY` are kept, none
older than :data:`MAX_AGE` (a ring buffer: memory stays bounded however long it runs).

**Nothing personal.** Route, close code, error type and status labels and counts, as a
scrape shows them; for a crash, the exception's class name, as the logs show it.

The JSON document is described in :meth:`LivePage.document`.
"""

from __future__ import annotations

import gc
import json
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .sink import Crash, MetricsSink

__all__ = ["HISTORY", "INTERVAL", "LivePage", "quantile"]

#: Seconds between two samples (the page polls as often).
INTERVAL = 1.0
#: Samples kept: five minutes at one per second.
HISTORY = 300
#: Seconds of history: older samples (from before nobody watched) are dropped too.
MAX_AGE = 300.0
#: Routes with per-route sparklines (the busiest); every route has its numbers.
ROUTES_CHARTED = 10
#: Quantiles of the message handling time the page shows.
QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
#: Counts the page shows as totals and per-interval increases.
_TOTALS = ("opened", "closed", "messages_in", "messages_out", "bytes_in", "bytes_out")
_BY_LABEL = ("errors", "close_codes", "handshake_failures")

_Labels = tuple[tuple[str, str], ...]


class _Sample:
    """The values of one collection that the page needs, and their increase since the last."""

    __slots__ = (
        "active",
        "buckets",
        "bytes_in",
        "bytes_out",
        "close_codes",
        "closed",
        "crashes",
        "dt",
        "errors",
        "exemplars",
        "handshake_failures",
        "latency",
        "messages_in",
        "messages_out",
        "mono",
        "opened",
        "own",
        "row",
        "tracing",
        "unix",
    )

    def __init__(self, mono: float, unix: float) -> None:
        self.mono = mono
        self.unix = unix
        # Cumulative values, by route (or by label for close codes, errors, statuses).
        self.active: dict[str, float] = {}
        self.opened: dict[str, float] = {}
        self.closed: dict[str, float] = {}
        self.messages_in: dict[str, float] = {}
        self.messages_out: dict[str, float] = {}
        self.bytes_in: dict[str, float] = {}
        self.bytes_out: dict[str, float] = {}
        self.close_codes: dict[str, float] = {}
        self.errors: dict[str, float] = {}
        self.handshake_failures: dict[str, float] = {}
        #: Message handling time per route: (upper bound, cumulative count), +Inf last.
        self.buckets: dict[str, list[tuple[float, float]]] = {}
        #: (seconds, trace id, unix time, route) of every exemplar.
        self.exemplars: list[tuple[float, str, float, str]] = []
        #: ws_monitoring's own series: (sample name, labels) -> value.
        self.own: dict[tuple[str, _Labels], float] = {}
        self.tracing = False
        #: None: no sink to ask (another registry, multiprocess mode).
        self.crashes: list[Crash] | None = None
        # Set by LivePage._derive: handling-time quantiles since the previous sample, and
        # this sample's history entries, ready for the JSON: (series, label...) -> value.
        self.latency: dict[str, dict[str, float | None]] = {}
        self.row: dict[tuple[str, ...], float | int | None] = {}
        #: Seconds since the previous sample (None for the first).
        self.dt: float | None = None


def _add(table: dict[str, float], key: str, value: float) -> None:
    table[key] = table.get(key, 0.0) + value


def _read(families: Iterable[Metric], namespace: str, sample: _Sample) -> None:
    """Keep what the page needs from collected families, by sample name and labels."""
    ns = namespace
    simple = {
        f"{ns}_connections_active": (sample.active, "route"),
        f"{ns}_connections_total": (sample.opened, "route"),
        f"{ns}_errors_total": (sample.errors, "type"),
        f"{ns}_handshake_failures_total": (sample.handshake_failures, "status"),
    }
    by_direction = {
        f"{ns}_messages_total": (sample.messages_in, sample.messages_out),
        f"{ns}_message_size_bytes_sum": (sample.bytes_in, sample.bytes_out),
    }
    disconnections = f"{ns}_disconnections_total"
    duration = f"{ns}_message_duration_seconds_bucket"
    for family in families:
        if family.name.startswith("ws_monitoring_"):
            if family.name.startswith(("ws_monitoring_spans_", "ws_monitoring_trace_")):
                sample.tracing = True
            for s in family.samples:
                if not s.name.endswith("_created"):
                    key = (s.name, tuple(sorted(s.labels.items())))
                    sample.own[key] = sample.own.get(key, 0.0) + s.value
            continue
        for s in family.samples:
            name, labels = s.name, s.labels
            route = labels.get("route", "")
            if name in simple:
                table, label = simple[name]
                _add(table, labels.get(label, ""), s.value)
            elif name in by_direction:
                received, sent = by_direction[name]
                _add(received if labels.get("direction") == "received" else sent, route, s.value)
            elif name == disconnections:
                _add(sample.closed, route, s.value)
                _add(sample.close_codes, labels.get("code", ""), s.value)
            elif name == duration:
                bound = float(labels.get("le", "+Inf"))
                sample.buckets.setdefault(route, []).append((bound, s.value))
                if s.exemplar is not None:
                    sample.exemplars.append(
                        (
                            s.exemplar.value,
                            s.exemplar.labels.get("trace_id", ""),
                            float(s.exemplar.timestamp or 0.0),
                            route,
                        )
                    )
    for route, buckets in sample.buckets.items():
        # One series per tenant when there is a tenant label: summed by bound.
        merged: dict[float, float] = {}
        for bound, count in buckets:
            merged[bound] = merged.get(bound, 0.0) + count
        sample.buckets[route] = sorted(merged.items())


def _namespace(families: list[Metric]) -> str | None:
    """The namespace of the connection metrics collected (``websocket`` if there)."""
    found = sorted(
        f.name.removesuffix("_connections_active")
        for f in families
        if f.type == "gauge"
        and f.name.endswith("_connections_active")
        and not f.name.startswith("ws_monitoring_")
    )
    if not found:
        return None
    return "websocket" if "websocket" in found else found[0]


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a histogram, estimated as PromQL's ``histogram_quantile``.

    ``buckets``: (upper bound, cumulative count), +Inf last. Linear interpolation in the
    bucket holding the rank (from 0 in the first); the last finite bound when the rank
    falls in +Inf; None without observations.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower
            if cumulative == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    return lower  # pragma: no cover - the +Inf bucket holds every observation


def _increase(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """Per key, the increase of a counter; a key new since ``before`` (or reset) from 0."""
    out: dict[str, float] = {}
    for key, value in now.items():
        previous = before.get(key, 0.0)
        out[key] = value - previous if value >= previous else value
    return out


def _num(value: float) -> float | int:
    """A count as an int in the JSON (counts are floats in prometheus_client)."""
    return int(value) if float(value).is_integer() else value


def _nums(table: dict[str, float]) -> dict[str, float | int]:
    return {key: _num(value) for key, value in sorted(table.items())}


class LivePage:
    """The live page of one metrics server: its samples and its two documents.

    Args:
        registry: What the metrics server serves (the object a scrape collects).
        multiprocess: Whether it is a multiprocess aggregate.
    """

    def __init__(self, registry: Collector, *, multiprocess: bool) -> None:
        self._registry = registry
        self.multiprocess = multiprocess
        self._lock = threading.Lock()
        self._samples: deque[_Sample] = deque(maxlen=HISTORY)
        self._namespace: str | None = None
        self._html: bytes | None = None

    def html(self) -> bytes:
        """The page: the package data file ``live.html``."""
        if self._html is None:
            self._html = resources.files(__package__).joinpath("live.html").read_bytes()
        return self._html

    def json(self, since: float | None = None) -> bytes:
        """``/live.json``: :meth:`document` as UTF-8 JSON."""
        document = self.document(since)
        return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()

    def document(self, since: float | None = None) -> dict[str, Any]:
        """A sample if the last is :data:`INTERVAL` old, then the page's data.

        Keys: ``version`` (1), ``time`` (of the latest sample, unix), ``namespace``,
        ``multiprocess``, ``interval_s``, ``history_size``, ``max_age_s``,
        ``metrics_path``; ``unavailable`` ({figure:
        why} for what this mode or setup lacks: ``crashes``, ``slowest``, ``logging``);
        ``totals`` (cumulative: ``connections`` open, ``opened``, ``closed``,
        ``messages_in``/``_out``, ``bytes_in``/``_out``, and by label ``errors``,
        ``close_codes``, ``handshake_failures``); ``routes`` ({route: those counts and
        ``p50``/``p95``/``p99``, the handling time quantiles of the last interval in
        seconds, or null}); ``history`` (oldest sample first: ``t`` unix times, ``dt``
        seconds since the sample before; for each total and by label, the increase
        since the sample before; ``connections`` open and ``latency`` quantiles for the
        :data:`ROUTES_CHARTED` busiest routes; the first entry of every increase and
        quantile is null); ``crashes`` (newest first: ``time``, ``route``,
        ``error_type``, ``close_code``); ``sinks`` (ws_monitoring's own series by group:
        ``tracing``, ``alerting``, ``logging``, ``metrics_server``, ``other``; each
        ``metric``, ``labels``, ``value``); ``slowest`` (the slowest message with a trace
        id among the exemplars of the last :data:`MAX_AGE` seconds: ``trace_id``,
        ``seconds``, ``route``, ``time``; or null).

        With ``since`` (``?since=``), the ``time`` of a sample still kept: ``history``
        holds only the samples after it, increases and quantiles included, and
        ``partial`` is true (a page that polls appends them to what it has). Otherwise
        the whole history, and ``partial`` is false.
        """
        with self._lock:
            now = time.monotonic()
            samples = self._samples
            if not samples or now - samples[-1].mono >= INTERVAL * 0.95:
                sample = self._take(now)
                self._derive(sample, samples[-1] if samples else None)
                samples.append(sample)
            # After a gap (nobody watched), only recent samples make a history.
            while now - samples[0].mono > MAX_AGE:
                samples.popleft()
            kept = list(samples)
        return self._describe(kept, since)

    # -- sampling --------------------------------------------------------------------------

    def _take(self, mono: float) -> _Sample:
        sample = _Sample(mono, time.time())
        # The GC paused, as for a scrape (see server._without_gc).
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            families = list(self._registry.collect())
        finally:
            if was_enabled:
                gc.enable()
        namespace = self._namespace = _namespace(families) or self._namespace
        _read(families, namespace or "websocket", sample)
        registry = self._registry
        if not self.multiprocess and isinstance(registry, CollectorRegistry):
            sinks = [
                s for s in MetricsSink.of_registry(registry) if s.config.namespace == namespace
            ]
            if sinks:
                sample.crashes = sorted(c for sink in sinks for c in sink.recent_crashes())
        return sample

    @staticmethod
    def _derive(sample: _Sample, previous: _Sample | None) -> None:
        """What happened between ``previous`` and ``sample``: increases, quantiles.

        Computed once per sample, so that each ``/live.json`` only gathers them.
        """
        row = sample.row
        for route, value in sample.active.items():
            row["connections", route] = _num(value)
        if previous is None:
            return
        sample.dt = sample.mono - previous.mono
        for key in _TOTALS:
            increase = _increase(getattr(sample, key), getattr(previous, key))
            row[(key,)] = _num(sum(increase.values()))
        for key in _BY_LABEL:
            for label, value in _increase(getattr(sample, key), getattr(previous, key)).items():
                row[key, label] = _num(value)
        for route, buckets in sample.buckets.items():
            before = dict(previous.buckets.get(route, ()))
            window = [(bound, count - before.get(bound, 0.0)) for bound, count in buckets]
            if any(count < 0 for _, count in window):
                window = buckets  # reset: a worker's files were removed
            latency = sample.latency[route] = {k: quantile(q, window) for k, q in QUANTILES.items()}
            for k, seconds in latency.items():
                row["latency", route, k] = seconds

    # -- the document ----------------------------------------------------------------------

    def _describe(self, samples: list[_Sample], since: float | None) -> dict[str, Any]:
        last = samples[-1]
        times = [s.unix for s in samples]
        partial = since is not None and since in times
        shown = samples[times.index(since) + 1 :] if since is not None and partial else samples
        unavailable: dict[str, str] = {}
        if self.multiprocess:
            unavailable["crashes"] = "multiprocess mode: each worker keeps its own (see its logs)"
            unavailable["slowest"] = "multiprocess mode: exemplars do not exist there"
        else:
            if last.crashes is None:
                unavailable["crashes"] = "no ws_monitoring metrics sink counts into this registry"
            if not (last.tracing or last.exemplars):
                unavailable["slowest"] = "tracing is off"
        if not any(name.startswith("ws_monitoring_log") for name, _ in last.own):
            unavailable["logging"] = "no log metrics in this registry"

        routes: dict[str, dict[str, Any]] = {}
        for route in sorted(set(last.active) | set(last.opened) | set(last.buckets)):
            entry: dict[str, Any] = {"connections": _num(last.active.get(route, 0.0))}
            for key in _TOTALS:
                entry[key] = _num(getattr(last, key).get(route, 0.0))
            entry.update(last.latency.get(route, dict.fromkeys(QUANTILES)))
            routes[route] = entry
        totals: dict[str, Any] = {"connections": _num(sum(last.active.values()))}
        for key in _TOTALS:
            totals[key] = _num(sum(getattr(last, key).values()))
        for key in _BY_LABEL:
            totals[key] = _nums(getattr(last, key))
        return {
            "version": 1,
            "time": last.unix,
            "namespace": self._namespace,
            "multiprocess": self.multiprocess,
            "interval_s": INTERVAL,
            "history_size": HISTORY,
            "max_age_s": MAX_AGE,
            "metrics_path": "/metrics",
            "unavailable": unavailable,
            "totals": totals,
            "routes": routes,
            "partial": partial,
            "history": _history(shown, routes, partial=partial),
            "crashes": [c._asdict() for c in reversed(last.crashes or [])],
            "sinks": _sinks(last.own),
            "slowest": _slowest(last, last.unix - MAX_AGE),
        }


def _history(
    samples: list[_Sample], routes: dict[str, dict[str, Any]], *, partial: bool
) -> dict[str, Any]:
    """The history columns of ``samples`` (those after the client's last, if ``partial``).

    In a whole history, increases and quantiles start at the second sample: the first
    one's are since a sample no longer shown. A series absent from a sample counts 0
    (a quantile: null).
    """
    first: list[None] = [] if partial else [None]
    later = samples if partial else samples[1:]
    keys = {key for s in samples for key in s.row}
    history: dict[str, Any] = {
        "t": [s.unix for s in samples],
        "dt": [*first, *(s.dt for s in later)],
    }
    for name in _TOTALS:
        history[name] = [*first, *(s.row.get((name,), 0) for s in later)]
    for name in _BY_LABEL:
        labels = sorted(key[1] for key in keys if key[0] == name)
        history[name] = {
            label: [*first, *(s.row.get((name, label), 0) for s in later)] for label in labels
        }
    charted = sorted(
        sorted(routes, key=lambda r: (-routes[r]["connections"], -routes[r]["messages_in"], r))[
            :ROUTES_CHARTED
        ]
    )
    history["connections"] = {
        route: [s.row.get(("connections", route), 0) for s in samples] for route in charted
    }
    history["latency"] = {
        route: {q: [*first, *(s.row.get(("latency", route, q)) for s in later)] for q in QUANTILES}
        for route in charted
        if ("latency", route, "p50") in keys
    }
    return history


#: Groups of ws_monitoring's own series on the page, by name prefix.
_SINK_GROUPS = (
    ("tracing", ("ws_monitoring_spans_", "ws_monitoring_trace_")),
    ("alerting", ("ws_monitoring_alert",)),
    ("logging", ("ws_monitoring_log",)),
    ("metrics_server", ("ws_monitoring_metrics_server_",)),
)


def _sinks(values: dict[tuple[str, _Labels], float]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for (name, labels), value in sorted(values.items()):
        group = next((g for g, prefixes in _SINK_GROUPS if name.startswith(prefixes)), "other")
        out.setdefault(group, []).append(
            {"metric": name, "labels": dict(labels), "value": _num(value)}
        )
    return out


def _slowest(sample: _Sample, since: float) -> dict[str, Any] | None:
    recent = [e for e in sample.exemplars if e[2] >= since]
    if not recent:
        return None
    seconds, trace_id, ts, route = max(recent)
    return {"trace_id": trace_id, "seconds": seconds, "route": route, "time": ts}
