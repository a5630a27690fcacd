"""prometheus_client multiprocess mode: several worker processes, one correct scrape.

With ``PROMETHEUS_MULTIPROC_DIR`` set, a custom collector in one worker cannot see the
others, so each worker's :class:`~ws_monitoring.metrics.MetricsSink` is copied, as
deltas, into prometheus_client's mmap-backed metrics by a :class:`MultiprocessBridge`
running in a daemon thread (every ``WS_MONITORING_MULTIPROC_FLUSH_SECONDS``, default
1 s, and at exit). Any process then serves the sum with
``start_metrics_server(...)``, which uses a :class:`MultiprocessCollector` in this mode.

The hot path is the same as in single-process mode; a scrape may lag a worker by up to
one flush interval. ``websocket_connections_active`` is a ``livesum`` gauge: a worker
that exits cleanly removes its share; for one that was killed, the supervisor calls
:func:`mark_process_dead` with its pid. Exemplars do not exist in this mode
(a prometheus_client limitation).

A worker creates its files while others scrape: prometheus_client opens a file (empty)
before it sizes it and writes its used-size header, and its own collector then fails the
whole scrape on that file. :class:`MultiprocessCollector` passes over such files (until
they are complete) and counts them in ``ws_monitoring_multiprocess_files_skipped_total``.
"""

from __future__ import annotations

import atexit
import glob
import os
import struct
import threading
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client import multiprocess as _mp
from prometheus_client.core import CounterMetricFamily

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from prometheus_client.core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = ["MultiprocessBridge", "MultiprocessCollector", "enabled", "mark_process_dead"]


def enabled() -> bool:
    """Whether prometheus_client multiprocess mode is on for this process."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def mark_process_dead(pid: int, path: str | None = None) -> None:
    """Drop the live-gauge share of worker ``pid`` (call it when a worker dies)."""
    _mp.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


#: prometheus_client's file header: the bytes used (a native int), then 4 of padding.
_HEADER = struct.Struct("i")
_HEADER_SIZE = 8


def _complete(path: str) -> bool | None:
    """Whether ``path`` is a whole mmap file; None if it no longer exists.

    Complete: at least its header, whose used-size covers the header and lies within the
    file. prometheus_client only ever grows a file (it sizes it before writing past the
    end), so a file complete now stays complete while the collector reads it.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(_HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return None  # a live gauge's file removed by mark_process_dead since the glob
    if len(header) < _HEADER_SIZE:
        return False
    used: int = _HEADER.unpack_from(header)[0]
    return _HEADER_SIZE <= used <= size


class MultiprocessCollector(_mp.MultiProcessCollector):
    """prometheus_client's ``MultiProcessCollector``, which a file being created cannot fail.

    It merges the complete files of ``path`` (default ``PROMETHEUS_MULTIPROC_DIR``) as
    prometheus_client does, passes over the others (empty, shorter than their header, or
    whose header counts more bytes than they hold) and counts them, once per scrape, in
    ``ws_monitoring_multiprocess_files_skipped_total``. Use it in place of
    prometheus_client's when you build the registry yourself.
    """

    def __init__(self, registry: CollectorRegistry | None, path: str | None = None) -> None:
        self._skipped = 0
        self._skipped_lock = threading.Lock()
        super().__init__(registry, path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        files = []
        skipped = 0
        for path in glob.glob(os.path.join(self._path, "*.db")):
            complete = _complete(path)
            if complete:
                files.append(path)
            elif complete is False:
                skipped += 1
        with self._skipped_lock:
            self._skipped += skipped
            total = self._skipped
        yield from self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        yield CounterMetricFamily(
            "ws_monitoring_multiprocess_files_skipped",
            "prometheus_client multiprocess files a scrape passed over because they were "
            "incomplete (a worker creating them; one a crash left short), once per scrape.",
            value=total,
        )


def _flush_interval() -> float:
    raw = os.environ.get("WS_MONITORING_MULTIPROC_FLUSH_SECONDS", "1")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"WS_MONITORING_MULTIPROC_FLUSH_SECONDS={raw!r}: expected a number"
        ) from None
    if value <= 0:
        raise ValueError("WS_MONITORING_MULTIPROC_FLUSH_SECONDS must be positive")
    return value


class MultiprocessBridge:
    """Copies a sink's aggregates into mmap-backed prometheus_client metrics as deltas.

    ``families`` returns the sink's current families (its collector's output).
    """

    def __init__(
        self, families: Callable[[], Iterable[Metric]], interval: float | None = None
    ) -> None:
        self._families = families
        self._interval = _flush_interval() if interval is None else interval
        self._lock = threading.Lock()
        self._metrics: dict[str, Any] = {}
        self._last: dict[tuple[str, tuple[str, ...], int], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="ws-monitoring-multiprocess", daemon=True
        )
        self._thread.start()
        atexit.register(self.close)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def close(self) -> None:
        """Flush one last time and remove this process's share of live gauges."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.flush()
        mark_process_dead(os.getpid())

    def flush(self) -> None:
        """Write what changed since the last flush."""
        with self._lock:
            for family in self._families():
                if family.type == "counter":
                    self._flush_counter(family)
                elif family.type == "gauge":
                    self._flush_gauge(family)
                else:
                    self._flush_histogram(family)

    def _metric(self, family: Metric, labelnames: list[str], factory: Any, **kw: Any) -> Any:
        metric = self._metrics.get(family.name)
        if metric is None:
            metric = self._metrics[family.name] = factory(
                family.name, family.documentation, labelnames, registry=None, **kw
            )
        return metric

    def _delta(self, key: tuple[str, tuple[str, ...], int], value: float) -> float:
        delta = value - self._last.get(key, 0.0)
        self._last[key] = value
        return delta

    def _flush_counter(self, family: Metric) -> None:
        for sample in family.samples:
            names = sorted(sample.labels)
            values = tuple(sample.labels[n] for n in names)
            delta = self._delta((family.name, values, 0), sample.value)
            if delta:
                counter = self._metric(family, names, Counter)
                counter.labels(*values).inc(delta) if names else counter.inc(delta)

    def _flush_gauge(self, family: Metric) -> None:
        for sample in family.samples:
            names = sorted(sample.labels)
            values = tuple(sample.labels[n] for n in names)
            gauge = self._metric(family, names, Gauge, multiprocess_mode="livesum")
            (gauge.labels(*values) if names else gauge).set(sample.value)

    def _flush_histogram(self, family: Metric) -> None:
        series: dict[tuple[str, ...], dict[str, Any]] = defaultdict(
            lambda: {"buckets": [], "sum": 0.0}
        )
        names: list[str] = []
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            names = sorted(labels)
            values = tuple(labels[n] for n in names)
            if sample.name.endswith("_bucket"):
                series[values]["buckets"].append((sample.labels["le"], sample.value))
            elif sample.name.endswith("_sum"):
                series[values]["sum"] = sample.value
        for values, data in series.items():
            bounds = [float(le) for le, _ in data["buckets"] if le != "+Inf"]
            histogram = self._metric(family, names, Histogram, buckets=bounds)
            child = histogram.labels(*values) if names else histogram
            previous = 0.0
            for index, (_, cumulative) in enumerate(data["buckets"]):
                delta = self._delta((family.name, values, index + 1), cumulative - previous)
                previous = cumulative
                if delta:
                    # prometheus_client has no public "add n to bucket i"; its mmap values are
                    # per bucket (not cumulative), which is what we add to.
                    child._buckets[index].inc(delta)
            delta = self._delta((family.name, values, 0), data["sum"])
            if delta:
                child._sum.inc(delta)
