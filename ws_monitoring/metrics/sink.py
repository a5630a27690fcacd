"""Prometheus metrics: a sink that aggregates records, read by a collector at scrape time.

The hot path only bumps plain counters on each connection's record (see
:mod:`ws_monitoring.core`); this module sums them when Prometheus scrapes. Per
connection it costs a lock twice (open, close), never per message.

A scrape by :func:`~ws_monitoring.start_metrics_server` gets the sink's families as
text written by :mod:`ws_monitoring.metrics.exposition`, the same bytes prometheus_client
would write, in a fraction of its time; any other reader of the registry gets ordinary
metric families.

In ``prometheus_client`` multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) a custom
collector cannot be read by the process that serves ``/metrics``, so the same
aggregates are written as deltas into mmap-backed ``prometheus_client`` metrics by
:mod:`ws_monitoring.metrics.multiprocess` instead.
"""

from __future__ import annotations

import threading
import time
import weakref
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from operator import add
from typing import ClassVar, NamedTuple

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from ws_monitoring.config import Config
from ws_monitoring.core import ConnectionRecord, HandshakeRecord, HistogramLayout, sum_counts
from ws_monitoring.labels import close_code_label, handshake_status_label

from . import multiprocess
from .exposition import (
    Prerendered,
    _buckets,
    _Family,
    _Spec,
    _Writer,
    _yield_gil,
    direct_exposition_format,
)

__all__ = ["Crash", "MetricsSink", "Snapshot"]


class Crash(NamedTuple):
    """One handler crash, as the logs tell it: no message, no client data."""

    #: Unix time the connection closed.
    time: float
    route: str
    #: The exception's class name.
    error_type: str
    close_code: int | None


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
        """:meth:`add` for many records at once, summed by :func:`core.sum_counts`.

        A scrape with thousands of open connections spends its time here: the core sums
        the records' columns (in C when built) without a list per record.
        """
        in_text, in_binary, out_text, out_binary, in_bytes, out_bytes, handling, rtt, h = (
            sum_counts(records, len(self.h))
        )
        self.in_text += in_text
        self.in_binary += in_binary
        self.out_text += out_text
        self.out_binary += out_binary
        self.in_bytes += in_bytes
        self.out_bytes += out_bytes
        self.handling_sum += handling
        self.rtt_sum += rtt
        if h is not None:
            self.h = list(map(add, self.h, h))
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
        self._names = {key: f"{config.namespace}_{spec.suffix}" for key, spec in _SPECS.items()}
        self._le: dict[str, tuple[str, ...]] = {
            key: (*map(floatToGoString, getattr(config, attr)), "+Inf")
            for key, attr in _BOUNDS.items()
        }
        self._writer = _Writer()
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
        self._crashes: deque[Crash] = deque(maxlen=self.CRASHES_KEPT)

    #: Handler crashes :meth:`recent_crashes` keeps (the live page shows them).
    CRASHES_KEPT: ClassVar[int] = 20

    @classmethod
    def of_registry(cls, registry: CollectorRegistry) -> list[MetricsSink]:
        """The sinks counting into ``registry``, one per namespace."""
        with cls._instances_lock:
            return list(cls._instances.get(registry, {}).values())

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
                    sink._bridge = multiprocess.MultiprocessBridge(
                        lambda: sink.families(sink.snapshot())
                    )
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
            elif kind is not None:
                error = type(connection.error).__name__
                self._crashes.append(Crash(time.time(), route, error, connection.close_code))

    def recent_crashes(self) -> list[Crash]:
        """The last :attr:`CRASHES_KEPT` handler crashes, oldest first."""
        with self._lock:
            return list(self._crashes)

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
        for n, (route, records) in enumerate(by_route.items()):
            if n & 7 == 7:
                _yield_gil()
            snap.active[route] = len(records)
            totals = snap.routes.get(route)
            if totals is None:
                totals = snap.routes[route] = RouteTotals(length)
            totals.add_all(records)
        for route in snap.opened:
            snap.active.setdefault(route, 0)
        return snap

    def collect(self) -> Iterator[Metric]:
        """prometheus_client collector protocol: the metric families at this instant.

        During a scrape by :func:`start_metrics_server` that accepts it, one
        :class:`~ws_monitoring.metrics.exposition.Prerendered` chunk (this sink's families
        already written as exposition text) stands for them instead: same text, a fraction
        of the cost (see :func:`~ws_monitoring.metrics.exposition.direct_exposition_format`).
        """
        snap = self.snapshot()
        fmt = direct_exposition_format()
        if fmt is not None:
            text = self._writer.write(self._series(snap), openmetrics=fmt == "openmetrics")
            return iter([Prerendered(text)])
        return iter(self.families(snap))

    def describe(self) -> Iterable[Metric]:
        # Returning no description keeps registration cheap and lets two namespaces coexist.
        return ()

    def families(self, snap: Snapshot) -> list[Metric]:
        """Turn a snapshot into metric families (also used by the multiprocess bridge)."""
        out: list[Metric] = []
        for family in self._series(snap):
            spec = family.spec
            labels = list(spec.labels)
            metric: Metric
            if spec.kind == "histogram":
                metric = HistogramMetricFamily(family.name, spec.help, labels=labels)
                for values, counts, total, exemplars in family.histograms:
                    metric.add_metric(list(values), _buckets(family.le, counts, exemplars), total)
            else:
                kind = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
                metric = kind(family.name, spec.help, labels=labels)
                for values, value in family.values:
                    metric.add_metric(list(values), value)
            out.append(metric)
        return out

    def _series(self, snap: Snapshot) -> list[_Family]:
        """Every family of ``snap`` with its series, in exposition order.

        The one mapping from a snapshot to series: :meth:`families` and the direct text
        writer both read it, so both outputs hold the same samples.
        """
        cfg, layout = self.config, self.layout
        fams = {
            key: _Family(spec, self._names[key], self._le.get(key, ()))
            for key, spec in _SPECS.items()
        }
        fams["active"].values = [((route,), value) for route, value in sorted(snap.active.items())]
        fams["opened"].values = [((route,), value) for route, value in sorted(snap.opened.items())]
        fams["conn_duration"].histograms = [
            ((route,), hist.counts, hist.sum, None)
            for route, hist in sorted(snap.conn_duration.items())
        ]
        fams["disconnections"].values = sorted(snap.disconnections.items())
        fams["handshake_failures"].values = [
            ((status,), value) for status, value in sorted(snap.handshake_failures.items())
        ]
        fams["handshake_duration"].histograms = [
            ((), snap.handshake_duration.counts, snap.handshake_duration.sum, None)
        ]
        messages, size = fams["messages"].values, fams["size"].histograms
        duration, rtt = fams["duration"].histograms, fams["rtt"].histograms
        size_in, size_out = layout.size_in, layout.size_out
        n_size = len(cfg.size_buckets) + 1
        start, end = layout.duration, layout.duration + len(cfg.duration_buckets) + 1
        for route, t in sorted(snap.routes.items()):
            messages += [
                ((route, "received", "text"), t.in_text),
                ((route, "received", "binary"), t.in_binary),
                ((route, "sent", "text"), t.out_text),
                ((route, "sent", "binary"), t.out_binary),
            ]
            h = t.h
            size.append(((route, "received"), h[size_in : size_in + n_size], t.in_bytes, None))
            size.append(((route, "sent"), h[size_out : size_out + n_size], t.out_bytes, None))
            duration.append(((route,), h[start:end], t.handling_sum, t.exemplars))
            rtt.append(((route,), h[layout.rtt : layout.length], t.rtt_sum, None))
        fams["errors"].values = sorted(snap.errors.items())
        return list(fams.values())


#: The families of a sink, in exposition order, keyed by what they count.
_SPECS: dict[str, _Spec] = {
    "active": _Spec("connections_active", "gauge", "Open WebSocket connections.", ("route",)),
    "opened": _Spec(
        "connections",
        "counter",
        "WebSocket connections opened (handshake done, handler started).",
        ("route",),
    ),
    "conn_duration": _Spec(
        "connection_duration_seconds",
        "histogram",
        "WebSocket connection lifetime in seconds.",
        ("route",),
    ),
    "disconnections": _Spec(
        "disconnections",
        "counter",
        "WebSocket connections closed, by close code (3xxx/4xxx grouped).",
        ("route", "code"),
    ),
    "handshake_failures": _Spec(
        "handshake_failures",
        "counter",
        "Opening handshakes that did not open a connection, by HTTP status or failure.",
        ("status",),
    ),
    "handshake_duration": _Spec(
        "handshake_duration_seconds", "histogram", "Opening handshake time in seconds.", ()
    ),
    "messages": _Spec(
        "messages",
        "counter",
        "WebSocket messages, by direction and frame type.",
        ("route", "direction", "type"),
    ),
    "size": _Spec(
        "message_size_bytes",
        "histogram",
        "WebSocket message payload size in bytes (UTF-8 for text, before compression).",
        ("route", "direction"),
    ),
    "duration": _Spec(
        "message_duration_seconds",
        "histogram",
        "Message handling time in seconds: from recv() returning it to the next recv().",
        ("route",),
    ),
    "errors": _Spec("errors", "counter", "WebSocket errors, by type.", ("route", "type")),
    "rtt": _Spec("ping_rtt_seconds", "histogram", "Ping round-trip time in seconds.", ("route",)),
}

#: Config attribute holding each histogram's bucket bounds.
_BOUNDS = {
    "conn_duration": "connection_duration_buckets",
    "handshake_duration": "handshake_buckets",
    "size": "size_buckets",
    "duration": "duration_buckets",
    "rtt": "rtt_buckets",
}
