"""Output handlers that never print a traceback, the bounded queue, and their counts.

A record that cannot be written (a full disk, a closed pipe, a file system gone
read-only) is dropped and counted; the first failure of each output is reported once,
as one line on standard error, instead of the standard library's ``--- Logging error
---`` traceback for every record. A queue that is full drops and counts too. Both
counts are ``ws_monitoring_log_records_dropped_total{reason}`` (``write_error``,
``queue_full``) on the registry :func:`~ws_monitoring.logging.setup.setup_logging`
was given (the default one unless told), counted from the moment that registry started
to watch.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any, ClassVar

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric

from .context import DEFERRED, capture_context

__all__ = [
    "DROP_REASONS",
    "FileOutput",
    "LoggingCollector",
    "RotatingFileOutput",
    "StreamOutput",
    "TimedRotatingFileOutput",
]

#: The ``reason`` label values of ``ws_monitoring_log_records_dropped_total``.
DROP_REASONS = ("queue_full", "write_error")


class _Stats:
    """Process-wide counts of dropped records, by reason."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(DROP_REASONS, 0)

    def drop(self, reason: str) -> None:
        with self._lock:
            self._counts[reason] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


STATS = _Stats()


class _Reporting(logging.Handler):
    """``handleError`` counts, and reports the first failure of this output once."""

    #: Records this output failed to write.
    failures = 0
    _reported = False

    def where(self) -> str:
        """What this output writes to, for the report."""
        stream = getattr(self, "stream", None)
        return str(getattr(stream, "name", None) or type(self).__name__)

    def handleError(self, record: logging.LogRecord) -> None:
        self.failures += 1
        STATS.drop("write_error")
        if self._reported:
            return
        self._reported = True
        exc = sys.exc_info()[1]
        reason = "unknown error" if exc is None else f"{type(exc).__name__}: {exc}"
        line = (
            f"ws-monitoring: cannot write log records to {self.where()} ({reason}); "
            "records that fail are dropped and counted in "
            'ws_monitoring_log_records_dropped_total{reason="write_error"}\n'
        )
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except Exception:  # standard error is gone too: the count remains
            pass

    def close(self) -> None:
        # Closing flushes what a failed write left buffered: that fails again.
        try:
            super().close()
        except (OSError, ValueError):
            self.failures += 1
            STATS.drop("write_error")


class StreamOutput(_Reporting, logging.StreamHandler):  # type: ignore[type-arg]
    """:class:`logging.StreamHandler` that counts write failures instead of printing them."""


class _FileReporting(_Reporting):
    baseFilename: str

    def where(self) -> str:
        return self.baseFilename


class FileOutput(_FileReporting, logging.FileHandler):
    """:class:`logging.FileHandler` that counts write failures instead of printing them."""


class RotatingFileOutput(_FileReporting, logging.handlers.RotatingFileHandler):
    """:class:`~logging.handlers.RotatingFileHandler` that counts write failures."""


class TimedRotatingFileOutput(_FileReporting, logging.handlers.TimedRotatingFileHandler):
    """:class:`~logging.handlers.TimedRotatingFileHandler` that counts write failures."""


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Never blocks: when the queue is full the record is dropped and counted.

    A line is formatted before it is queued (the connection and the span it belongs to
    are this thread's context variables), except a line with an exception: its traceback,
    the costly part (about a millisecond), is formatted by the listener's thread, from
    the context captured here (:func:`~ws_monitoring.logging.context.capture_context`),
    so that a crash storm does not format tracebacks on the event loop.
    """

    def __init__(self, q: queue.Queue[Any]) -> None:
        super().__init__(q)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        exc_info = record.exc_info
        if not exc_info or exc_info[1] is None:
            return super().prepare(record)  # type: ignore[no-any-return]
        capture_context(record)
        record.__dict__[DEFERRED] = True
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            STATS.drop("queue_full")


class Listener(logging.handlers.QueueListener):
    def stop_by(self, deadline: float) -> bool:
        """Write what is queued and stop, by ``deadline`` (``time.monotonic()``);
        whether the thread is done (else it is left writing: it is a daemon)."""
        q: queue.Queue[Any] = self.queue  # type: ignore[assignment]
        thread = self._thread
        try:
            # The queue may be full: wait for room rather than fail to stop.
            q.put(None, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            return False
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return False
        self._thread = None
        return True


class LoggingCollector:
    """``ws_monitoring_log_records_dropped_total{reason}`` for one registry."""

    _instances: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, LoggingCollector]] = (
        weakref.WeakKeyDictionary()
    )
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._base = STATS.snapshot()

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> LoggingCollector:
        """The collector of ``registry`` (default: prometheus_client's), registered once."""
        registry = registry if registry is not None else REGISTRY
        with cls._instances_lock:
            collector = cls._instances.get(registry)
            if collector is None:
                collector = cls._instances[registry] = cls()
                registry.register(collector)
            return collector

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        counts = STATS.snapshot()
        family = CounterMetricFamily(
            "ws_monitoring_log_records_dropped",
            "Log records dropped by setup_logging's outputs, by reason.",
            labels=["reason"],
        )
        for reason in DROP_REASONS:
            family.add_metric([reason], counts[reason] - self._base[reason])
        yield family
