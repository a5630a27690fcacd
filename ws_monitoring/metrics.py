"""Prometheus metrics: a sink that aggregates records, read by a collector at scrape time.

The hot path only bumps plain counters on each connection's record (see
:mod:`ws_monitoring.core`); this module sums them when Prometheus scrapes. Per
connection it costs a lock twice (open, close), never per message.

In ``prometheus_client`` multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) a custom
collector cannot be read by the process that serves ``/metrics``, so the same
aggregates are written as deltas into mmap-backed ``prometheus_client`` metrics by
:mod:`ws_monitoring.multiprocess` instead.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from . import multiprocess
from .config import Config
from .core import ConnectionRecord, HandshakeRecord, HistogramLayout
from .labels import close_code_label, handshake_status_label
from .metrics_server import MetricsServer, start_metrics_server

__all__ = ["MetricsServer", "MetricsSink", "Snapshot", "start_metrics_server"]


class _Histogram:
    """Bucket counts (per bucket, +Inf last) and a sum: a tiny mutable histogram."""

    __slots__ = ("counts", "sum")

    def __init__(self, n_bounds: int) -> None:
        self.counts = [0] * (n_bounds + 1)
        self.sum = 0.0

    def observe(self, bounds: Sequence[float], value: float) -> None:
        self.counts[bisect_left(bounds, value)] += 1
        self.sum += value


class RouteTotals:
    """Counters of one route: closed connections' final values, plus live ones at scrape."""

    __slots__ = (
        "exemplars",
        "h",
        "handling_sum",
        "in_binary",
        "in_bytes",
        "in_text",
        "out_binary",
        "out_bytes",
        "out_text",
        "rtt_sum",
    )

    def __init__(self, length: int) -> None:
        self.in_text = self.in_binary = self.out_text = self.out_binary = 0
        self.in_bytes = self.out_bytes = 0
        self.handling_sum = self.rtt_sum = 0.0
        self.h = [0] * length
        self.exemplars: dict[int, tuple[str, float, float]] = {}

    def add(self, record: ConnectionRecord | RouteTotals) -> None:
        self.in_text += record.in_text
        self.in_binary += record.in_binary
        self.out_text += record.out_text
        self.out_binary += record.out_binary
        self.in_bytes += record.in_bytes
        self.out_bytes += record.out_bytes
        self.handling_sum += record.handling_sum
        self.rtt_sum += record.rtt_sum
        h = record.h
        if h is not None:
            self.h = [a + b for a, b in zip(self.h, h, strict=True)]
        if record.exemplars:
            self.exemplars.update(record.exemplars)

    def add_all(self, records: list[ConnectionRecord]) -> None:
        """:meth:`add` for many records at once: column sums in C, one list per route.

        A scrape with thousands of open connections spends its time here; adding them one
        by one would build a new list per connection.
        """
        self.in_text += sum([r.in_text for r in records])
        self.in_binary += sum([r.in_binary for r in records])
        self.out_text += sum([r.out_text for r in records])
        self.out_binary += sum([r.out_binary for r in records])
        self.in_bytes += sum([r.in_bytes for r in records])
        self.out_bytes += sum([r.out_bytes for r in records])
        self.handling_sum += sum([r.handling_sum for r in records])
        self.rtt_sum += sum([r.rtt_sum for r in records])
        hs = [r.h for r in records if r.h is not None]
        if hs:
            self.h = list(map(sum, zip(self.h, *hs, strict=True)))
        for record in records:
            if record.exemplars:
                self.exemplars.update(record.exemplars)

    def copy(self) -> RouteTotals:
        other = RouteTotals(len(self.h))
        other.add(self)
        return other


class Snapshot:
    """Every metric value at one instant, as plain data (what a scrape exposes)."""

    def __init__(self) -> None:
        self.active: dict[str, int] = {}
        self.opened: dict[str, int] = {}
        self.routes: dict[str, RouteTotals] = {}
        self.conn_duration: dict[str, _Histogram] = {}
        self.disconnections: dict[tuple[str, str], int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.handshake_failures: dict[str, int] = {}
        self.handshake_duration = _Histogram(0)


class MetricsSink:
    """Aggregates connection records into Prometheus metrics; also the registry collector.

    One instance per (registry, namespace), shared by every server instrumented with
    them, so two servers in one process expose one set of series. Obtain it with
    :meth:`for_config`.

    Raises:
        ValueError: from :meth:`for_config`, when a second server asks for the same
            registry and namespace with different buckets.
    """

    _instances: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, dict[str, MetricsSink]]] = (
        weakref.WeakKeyDictionary()
    )
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, config: Config) -> None:
        self.config = config
        self.layout = HistogramLayout(config)
        ns = config.namespace
        self._names = {
            "active": f"{ns}_connections_active",
            "opened": f"{ns}_connections",
            "conn_duration": f"{ns}_connection_duration_seconds",
            "disconnections": f"{ns}_disconnections",
            "handshake_failures": f"{ns}_handshake_failures",
            "handshake_duration": f"{ns}_handshake_duration_seconds",
            "messages": f"{ns}_messages",
            "size": f"{ns}_message_size_bytes",
            "duration": f"{ns}_message_duration_seconds",
            "errors": f"{ns}_errors",
            "rtt": f"{ns}_ping_rtt_seconds",
        }
        self._lock = threading.Lock()
        self._live: set[ConnectionRecord] = set()
        self._closed: dict[str, RouteTotals] = {}
        self._opened: dict[str, int] = {}
        self._conn_duration: dict[str, _Histogram] = {}
        self._disconnections: dict[tuple[str, str], int] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._handshake_failures: dict[str, int] = {}
        self._handshake_duration = _Histogram(len(config.handshake_buckets))
        self._bridge: multiprocess.MultiprocessBridge | None = None

    @classmethod
    def for_config(cls, config: Config) -> MetricsSink:
        """The shared sink for ``config``'s registry and namespace, registering it once."""
        registry = config.registry if config.registry is not None else REGISTRY
        with cls._instances_lock:
            per_registry = cls._instances.setdefault(registry, {})
            sink = per_registry.get(config.namespace)
            if sink is None:
                sink = cls(config)
                if multiprocess.enabled():
                    # Other workers' values live in their own memory: publish through
                    # prometheus_client's mmap files instead of a collector.
                    sink._bridge = multiprocess.MultiprocessBridge(sink)
                else:
                    registry.register(sink)
                per_registry[config.namespace] = sink
            elif any(
                getattr(sink.config, name) != getattr(config, name)
                for name in (
                    "size_buckets",
                    "duration_buckets",
                    "connection_duration_buckets",
                    "handshake_buckets",
                    "rtt_buckets",
                )
            ):
                raise ValueError(
                    f"metrics namespace {config.namespace!r} is already registered with other "
                    "buckets; use the same buckets or another namespace"
                )
            return sink

    # -- Sink ------------------------------------------------------------------------------

    def handshake_finished(self, handshake: HandshakeRecord) -> None:
        if handshake.health_check:
            return
        with self._lock:
            self._handshake_duration.observe(self.config.handshake_buckets, handshake.duration)
            if handshake.outcome != "accepted":
                status = handshake_status_label(handshake.status, handshake.failure)
                self._handshake_failures[status] = self._handshake_failures.get(status, 0) + 1

    def connection_opened(self, connection: ConnectionRecord) -> None:
        route = connection.route
        with self._lock:
            self._live.add(connection)
            self._opened[route] = self._opened.get(route, 0) + 1

    def handler_failed(self, connection: ConnectionRecord, exc: BaseException) -> None:
        self._count_error(connection.route, "handler_exception")

    def connection_closed(self, connection: ConnectionRecord) -> None:
        route = connection.route
        code = close_code_label(connection.close_code)
        with self._lock:
            self._live.discard(connection)
            totals = self._closed.get(route)
            if totals is None:
                totals = self._closed[route] = RouteTotals(self.layout.length)
            totals.add(connection)
            hist = self._conn_duration.get(route)
            if hist is None:
                hist = self._conn_duration[route] = _Histogram(
                    len(self.config.connection_duration_buckets)
                )
            hist.observe(self.config.connection_duration_buckets, connection.age)
            key = (route, code)
            self._disconnections[key] = self._disconnections.get(key, 0) + 1
            kind = connection.error_type
            # Under the same lock: a scrape sees the close and its error together.
            if kind is not None and kind != "handler_exception":
                key = (route, kind)
                self._errors[key] = self._errors.get(key, 0) + 1

    def shutdown(self, timeout: float) -> None:
        """In multiprocess mode, publish the last values; otherwise nothing to flush."""
        if self._bridge is not None:
            self._bridge.flush()

    def _count_error(self, route: str, kind: str) -> None:
        with self._lock:
            key = (route, kind)
            self._errors[key] = self._errors.get(key, 0) + 1

    # -- reading -----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """A consistent copy of every value: closed connections plus live ones."""
        snap = Snapshot()
        with self._lock:
            live = list(self._live)
            snap.routes = {route: totals.copy() for route, totals in self._closed.items()}
            snap.opened = dict(self._opened)
            snap.conn_duration = {}
            for route, hist in self._conn_duration.items():
                copy = _Histogram(0)
                copy.counts, copy.sum = list(hist.counts), hist.sum
                snap.conn_duration[route] = copy
            snap.disconnections = dict(self._disconnections)
            snap.errors = dict(self._errors)
            snap.handshake_failures = dict(self._handshake_failures)
            hs = _Histogram(0)
            hs.counts, hs.sum = list(self._handshake_duration.counts), self._handshake_duration.sum
            snap.handshake_duration = hs
        length = self.layout.length
        by_route: dict[str, list[ConnectionRecord]] = {}
        for record in live:
            by_route.setdefault(record.route, []).append(record)
        for route, records in by_route.items():
            snap.active[route] = len(records)
            totals = snap.routes.get(route)
            if totals is None:
                totals = snap.routes[route] = RouteTotals(length)
            totals.add_all(records)
        for route in snap.opened:
            snap.active.setdefault(route, 0)
        return snap

    def collect(self) -> Iterator[Metric]:
        """prometheus_client collector protocol: the metric families at this instant."""
        return iter(self.families(self.snapshot()))

    def describe(self) -> Iterable[Metric]:
        # Returning no description keeps registration cheap and lets two namespaces coexist.
        return ()

    def families(self, snap: Snapshot) -> list[Metric]:
        """Turn a snapshot into metric families (also used by the multiprocess bridge)."""
        cfg, names, layout = self.config, self._names, self.layout
        active = GaugeMetricFamily(names["active"], "Open WebSocket connections.", labels=["route"])
        opened = CounterMetricFamily(
            names["opened"],
            "WebSocket connections opened (handshake done, handler started).",
            labels=["route"],
        )
        for route, value in sorted(snap.active.items()):
            active.add_metric([route], value)
        for route, value in sorted(snap.opened.items()):
            opened.add_metric([route], value)

        conn_duration = HistogramMetricFamily(
            names["conn_duration"], "WebSocket connection lifetime in seconds.", labels=["route"]
        )
        for route, hist in sorted(snap.conn_duration.items()):
            conn_duration.add_metric(
                [route], _buckets(cfg.connection_duration_buckets, hist.counts), hist.sum
            )

        disconnections = CounterMetricFamily(
            names["disconnections"],
            "WebSocket connections closed, by close code (3xxx/4xxx grouped).",
            labels=["route", "code"],
        )
        for (route, code), value in sorted(snap.disconnections.items()):
            disconnections.add_metric([route, code], value)

        hs_failures = CounterMetricFamily(
            names["handshake_failures"],
            "Opening handshakes that did not open a connection, by HTTP status or failure.",
            labels=["status"],
        )
        for status, value in sorted(snap.handshake_failures.items()):
            hs_failures.add_metric([status], value)
        hs_duration = HistogramMetricFamily(
            names["handshake_duration"], "Opening handshake time in seconds."
        )
        hs_duration.add_metric(
            [],
            _buckets(cfg.handshake_buckets, snap.handshake_duration.counts),
            snap.handshake_duration.sum,
        )

        messages = CounterMetricFamily(
            names["messages"],
            "WebSocket messages, by direction and frame type.",
            labels=["route", "direction", "type"],
        )
        size = HistogramMetricFamily(
            names["size"],
            "WebSocket message payload size in bytes (UTF-8 for text, before compression).",
            labels=["route", "direction"],
        )
        duration = HistogramMetricFamily(
            names["duration"],
            "Message handling time in seconds: from recv() returning it to the next recv().",
            labels=["route"],
        )
        rtt = HistogramMetricFamily(
            names["rtt"], "Ping round-trip time in seconds.", labels=["route"]
        )
        n_size = len(cfg.size_buckets) + 1
        n_duration = len(cfg.duration_buckets) + 1
        for route, t in sorted(snap.routes.items()):
            messages.add_metric([route, "received", "text"], t.in_text)
            messages.add_metric([route, "received", "binary"], t.in_binary)
            messages.add_metric([route, "sent", "text"], t.out_text)
            messages.add_metric([route, "sent", "binary"], t.out_binary)
            h = t.h
            size.add_metric(
                [route, "received"],
                _buckets(cfg.size_buckets, h[layout.size_in : layout.size_in + n_size]),
                t.in_bytes,
            )
            size.add_metric(
                [route, "sent"],
                _buckets(cfg.size_buckets, h[layout.size_out : layout.size_out + n_size]),
                t.out_bytes,
            )
            duration.add_metric(
                [route],
                _buckets(
                    cfg.duration_buckets,
                    h[layout.duration : layout.duration + n_duration],
                    t.exemplars,
                ),
                t.handling_sum,
            )
            rtt.add_metric(
                [route], _buckets(cfg.rtt_buckets, h[layout.rtt : layout.length]), t.rtt_sum
            )

        errors = CounterMetricFamily(
            names["errors"], "WebSocket errors, by type.", labels=["route", "type"]
        )
        for (route, kind), value in sorted(snap.errors.items()):
            errors.add_metric([route, kind], value)

        return [
            active,
            opened,
            conn_duration,
            disconnections,
            hs_failures,
            hs_duration,
            messages,
            size,
            duration,
            errors,
            rtt,
        ]


def _buckets(
    bounds: Sequence[float],
    counts: Sequence[int],
    exemplars: dict[int, tuple[str, float, float]] | None = None,
) -> list[Any]:
    """Cumulative ``(le, count[, exemplar])`` pairs from per-bucket counts."""
    out: list[Any] = []
    total = 0
    for index, le in enumerate([*(floatToGoString(b) for b in bounds), "+Inf"]):  # type: ignore[no-untyped-call]
        total += counts[index]
        if exemplars and index in exemplars:
            trace_id, value, ts = exemplars[index]
            out.append((le, total, Exemplar({"trace_id": trace_id}, value, ts)))
        else:
            out.append((le, total))
    return out
