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
from typing import Any, ClassVar, NamedTuple

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
        #: With a ``tenant`` label (``config.tenant``): each tenant's own values (no
        #: handshake values: those have no tenant), by tenant label; the fields above
        #: are then their sums. ``None`` without a tenant label.
        self.tenants: dict[str, Snapshot] | None = None

    def copy(self) -> Snapshot:
        """A copy of the connection values (not handshakes, not tenants) to change freely."""
        other = Snapshot()
        other.add(self)
        return other

    def add(self, other: Snapshot) -> None:
        """Add ``other``'s connection values (not handshakes, not tenants) to these."""
        for route, count in other.active.items():
            self.active[route] = self.active.get(route, 0) + count
        for route, count in other.opened.items():
            self.opened[route] = self.opened.get(route, 0) + count
        for route, totals in other.routes.items():
            mine = self.routes.get(route)
            if mine is None:
                self.routes[route] = totals.copy()
            else:
                mine.add(totals)
        for route, hist in other.conn_duration.items():
            own = self.conn_duration.get(route)
            if own is None:
                own = self.conn_duration[route] = _Histogram(len(hist.counts) - 1)
            own.counts = list(map(add, own.counts, hist.counts))
            own.sum += hist.sum
        for key, count in other.disconnections.items():
            self.disconnections[key] = self.disconnections.get(key, 0) + count
        for key, count in other.errors.items():
            self.errors[key] = self.errors.get(key, 0) + count


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
        #: Whether route-labelled families also have a ``tenant`` label.
        self.tenant_label = config.tenant is not None
        self._specs = _specs(tenant=self.tenant_label)
        self._names = {key: f"{config.namespace}_{spec.suffix}" for key, spec in _SPECS.items()}
        self._le: dict[str, tuple[str, ...]] = {
            key: (*map(floatToGoString, getattr(config, attr)), "+Inf")
            for key, attr in _BOUNDS.items()
        }
        self._writer = _Writer()
        self._lock = threading.Lock()
        self._live: set[ConnectionRecord] = set()
        # Closed connections' values (``routes``), opened counts, connection durations,
        # disconnections and errors, by tenant label ("" without a tenant label).
        self._parts: dict[str, Snapshot] = {}
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
            elif sink.tenant_label != (config.tenant is not None):
                raise ValueError(
                    f"metrics namespace {config.namespace!r} is already registered "
                    f"with{'' if sink.tenant_label else 'out'} a tenant label; give every "
                    "server a tenant= function, or none, or use another namespace"
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

    def _part(self, tenant: str) -> Snapshot:
        """The values of ``tenant`` (called with the lock held)."""
        part = self._parts.get(tenant)
        if part is None:
            part = self._parts[tenant] = Snapshot()
        return part

    def connection_opened(self, connection: ConnectionRecord) -> None:
        route = connection.route
        with self._lock:
            self._live.add(connection)
            opened = self._part(connection.tenant).opened
            opened[route] = opened.get(route, 0) + 1

    def handler_failed(self, connection: ConnectionRecord, exc: BaseException) -> None:
        with self._lock:
            errors = self._part(connection.tenant).errors
            key = (connection.route, "handler_exception")
            errors[key] = errors.get(key, 0) + 1

    def connection_closed(self, connection: ConnectionRecord) -> None:
        route = connection.route
        code = close_code_label(connection.close_code)
        with self._lock:
            self._live.discard(connection)
            part = self._part(connection.tenant)
            totals = part.routes.get(route)
            if totals is None:
                totals = part.routes[route] = RouteTotals(self.layout.length)
            totals.add(connection)
            hist = part.conn_duration.get(route)
            if hist is None:
                hist = part.conn_duration[route] = _Histogram(
                    len(self.config.connection_duration_buckets)
                )
            hist.observe(self.config.connection_duration_buckets, connection.age)
            key = (route, code)
            part.disconnections[key] = part.disconnections.get(key, 0) + 1
            kind = connection.error_type
            # Under the same lock: a scrape sees the close and its error together.
            if kind is not None and kind != "handler_exception":
                key = (route, kind)
                part.errors[key] = part.errors.get(key, 0) + 1
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

    # -- reading -----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """A consistent copy of every value: closed connections plus live ones."""
        snap = Snapshot()
        with self._lock:
            live = list(self._live)
            parts = {tenant: part.copy() for tenant, part in self._parts.items()}
            snap.handshake_failures = dict(self._handshake_failures)
            hs = _Histogram(0)
            hs.counts, hs.sum = list(self._handshake_duration.counts), self._handshake_duration.sum
            snap.handshake_duration = hs
        length = self.layout.length
        by_key: dict[tuple[str, str], list[ConnectionRecord]] = {}
        for record in live:
            by_key.setdefault((record.tenant, record.route), []).append(record)
        for n, ((tenant, route), records) in enumerate(by_key.items()):
            if n & 7 == 7:
                _yield_gil()
            part = parts.get(tenant)
            if part is None:
                part = parts[tenant] = Snapshot()
            part.active[route] = len(records)
            totals = part.routes.get(route)
            if totals is None:
                totals = part.routes[route] = RouteTotals(length)
            totals.add_all(records)
        for part in parts.values():
            for route in part.opened:
                part.active.setdefault(route, 0)
        if self.tenant_label:
            snap.tenants = parts
        for part in parts.values():
            snap.add(part)
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
            for key, spec in self._specs.items()
        }
        # Label values start with the route, then the tenant when there is a tenant label.
        parts: list[tuple[tuple[str, ...], Snapshot]] = (
            [((), snap)]
            if snap.tenants is None
            else [((tenant,), part) for tenant, part in snap.tenants.items()]
        )
        fams["active"].values = sorted(
            ((route, *t), value) for t, part in parts for route, value in part.active.items()
        )
        fams["opened"].values = sorted(
            ((route, *t), value) for t, part in parts for route, value in part.opened.items()
        )
        fams["conn_duration"].histograms = sorted(
            (
                ((route, *t), hist.counts, hist.sum, None)
                for t, part in parts
                for route, hist in part.conn_duration.items()
            ),
            key=_first,
        )
        fams["disconnections"].values = sorted(
            ((route, *t, code), value)
            for t, part in parts
            for (route, code), value in part.disconnections.items()
        )
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
        routes = sorted(
            (((route, *t), totals) for t, part in parts for route, totals in part.routes.items()),
            key=_first,
        )
        for key, t in routes:
            messages += [
                ((*key, "received", "text"), t.in_text),
                ((*key, "received", "binary"), t.in_binary),
                ((*key, "sent", "text"), t.out_text),
                ((*key, "sent", "binary"), t.out_binary),
            ]
            h = t.h
            size.append(((*key, "received"), h[size_in : size_in + n_size], t.in_bytes, None))
            size.append(((*key, "sent"), h[size_out : size_out + n_size], t.out_bytes, None))
            duration.append((key, h[start:end], t.handling_sum, t.exemplars))
            rtt.append((key, h[layout.rtt : layout.length], t.rtt_sum, None))
        fams["errors"].values = sorted(
            ((route, *t, kind), value)
            for t, part in parts
            for (route, kind), value in part.errors.items()
        )
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


def _specs(*, tenant: bool) -> dict[str, _Spec]:
    """:data:`_SPECS`, with a ``tenant`` label after ``route`` when ``tenant``."""
    if not tenant:
        return _SPECS
    return {
        key: spec._replace(labels=(*spec.labels[:1], "tenant", *spec.labels[1:]))
        if spec.labels[:1] == ("route",)
        else spec
        for key, spec in _SPECS.items()
    }


def _first(item: tuple[Any, ...]) -> Any:
    return item[0]


#: Config attribute holding each histogram's bucket bounds.
_BOUNDS = {
    "conn_duration": "connection_duration_buckets",
    "handshake_duration": "handshake_buckets",
    "size": "size_buckets",
    "duration": "duration_buckets",
    "rtt": "rtt_buckets",
}
