"""Alerting: critical failures to Sentry and Alertmanager, never in the way.

Set-up is one line: pass alerters to :func:`ws_monitoring.instrument` or
:func:`ws_monitoring.serve`::

    from ws_monitoring import PrometheusAlerter, SentryAlerter, serve, watch_server

    sentry = SentryAlerter()  # DSN from SENTRY_DSN
    prom = PrometheusAlerter(["http://am-1:9093", "http://am-2:9093"], environment="prod")
    async with serve(handler, "", 8765, alerters=[sentry, prom]) as server:
        with watch_server(server, [sentry, prom]):  # the accept loop must not die
            await server.serve_forever()

What is critical out of the box:

* Handler crashes: each one goes to Sentry (with the connection's route, close code,
  counters and last frames); Alertmanager gets one aggregated ``WebSocketHandlerCrashes``
  alert (count, routes, exception types) that resolves itself after a quiet period.
* Error storms: ``WebSocketErrorStorm`` when errors and abnormal closes exceed a rate.
* Infrastructure: ``WebSocketMetricsServerDown`` when the metrics server cannot bind
  (``start_metrics_server(..., alerters=...)``) and ``WebSocketServerDown`` when a
  server's accept loop stops unexpectedly (:func:`watch_server`).
* Application alerts: ``alerter.fire(name, severity=..., summary=...)`` and
  ``alerter.resolve(name)``.

Normal closures, ``ConnectionClosedOK``, ``CancelledError`` and client resets are not
alerts: they are metrics. Every alerter builds, scrubs and sends on background threads
with bounded queues (:class:`Worker` for Sentry): on the event loop a crash only costs
a few reads. Its self-metrics are ``ws_monitoring_alerts_total{sink, outcome}``
(``sent``, ``failed``, ``retried``, ``dropped``) and
``ws_monitoring_alert_queue_depth{sink}``. When a server closes, its alerters flush
side by side, within the shared shutdown deadline.

:class:`SentryAlerter` needs the ``[sentry]`` extra and :class:`PrometheusAlerter` the
``[alertmanager]`` extra; both are imported lazily from this module.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec

from ws_monitoring.config import Config
from ws_monitoring.core import run_until
from ws_monitoring.typing import Alerter, Data, MessageSink, Sink

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge

    from ws_monitoring.core import ConnectionRecord, HandshakeRecord

__all__ = [
    "OUTCOMES",
    "AlertingSink",
    "Worker",
    "alert_metrics",
    "build_sink",
    "fire_all",
    "is_expected_failure",
]

logger = logging.getLogger("ws_monitoring.alerting")

#: Values of the ``outcome`` label of ``ws_monitoring_alerts_total``.
OUTCOMES = ("sent", "failed", "retried", "dropped")


# -- expected failures --------------------------------------------------------------------

_CLIENT_RESETS: tuple[type[BaseException], ...] = (
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    asyncio.CancelledError,
)


def is_expected_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is part of normal life (a closure or client reset), not an alert.

    ``ConnectionClosedOK``, ``ConnectionClosedError`` (the peer went away),
    ``CancelledError`` and connection resets, aborts and broken pipes.
    """
    from websockets.exceptions import ConnectionClosed

    return isinstance(exc, (ConnectionClosed, *_CLIENT_RESETS))


# -- self-metrics ---------------------------------------------------------------------------


class AlertMetrics:
    """``ws_monitoring_alerts_total{sink, outcome}`` and ``..._alert_queue_depth{sink}``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge

        self.alerts: Counter = Counter(
            "ws_monitoring_alerts",
            "Alerts handled by ws_monitoring alerters, by sink and outcome "
            "(sent, failed: rejected for good, retried: one failed attempt, dropped).",
            ("sink", "outcome"),
            registry=registry,
        )
        self.queue_depth: Gauge = Gauge(
            "ws_monitoring_alert_queue_depth",
            "Alerts waiting in an alerter's queue for delivery.",
            ("sink",),
            registry=registry,
        )

    def sink(self, name: str) -> tuple[dict[str, Any], Any]:
        """Children for sink ``name``: ({outcome: counter}, depth gauge), all at zero."""
        counters = {outcome: self.alerts.labels(name, outcome) for outcome in OUTCOMES}
        return counters, self.queue_depth.labels(name)


_metrics_lock = threading.Lock()
_metrics: weakref.WeakKeyDictionary[CollectorRegistry, AlertMetrics] = weakref.WeakKeyDictionary()


def alert_metrics(registry: CollectorRegistry | None = None) -> AlertMetrics:
    """The alerting self-metrics of ``registry`` (default: prometheus_client's), created once."""
    from prometheus_client import REGISTRY

    target = registry if registry is not None else REGISTRY
    with _metrics_lock:
        metrics = _metrics.get(target)
        if metrics is None:
            metrics = _metrics[target] = AlertMetrics(target)
        return metrics


# -- the worker ------------------------------------------------------------------------------


class Worker:
    """One daemon thread running queued jobs in order; at most ``size`` queued or running.

    :meth:`submit` never blocks (a lock held for an append, and a notify): it is what a
    sink event calls on the event loop, so that building, scrubbing and sending happen
    here. The thread starts with the first job.
    """

    def __init__(self, name: str, size: int) -> None:
        if size < 1:
            raise ValueError(f"queue_size must be at least 1, got {size}")
        self.name = name
        self.size = size
        self._jobs: deque[Callable[[], object]] = deque()
        self._cond = threading.Condition(threading.Lock())
        #: Jobs queued or running.
        self.pending = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], object]) -> bool:
        """Queue ``job``; ``False`` (not queued) when the queue is full or closed."""
        with self._cond:
            if self._closed or self.pending >= self.size:
                return False
            self._jobs.append(job)
            self.pending += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"ws-monitoring-{self.name}", daemon=True
                )
                self._thread.start()
            else:
                self._cond.notify()
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    if self._closed:
                        return
                    self._cond.wait()
                job = self._jobs.popleft()
            try:
                job()
            except Exception:
                logger.exception("alerter %s: a queued job failed", self.name)
            finally:
                with self._cond:
                    self.pending -= 1
                    if not self.pending:
                        self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no job is queued or running."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self) -> int:
        """Take no more jobs; the thread ends after the one it runs. Returns how many
        queued jobs were dropped (not started)."""
        with self._cond:
            self._closed = True
            dropped = len(self._jobs)
            self._jobs.clear()
            self.pending -= dropped
            self._cond.notify_all()
        return dropped


# -- fan-out --------------------------------------------------------------------------------


_P = ParamSpec("_P")


def _fan_out(
    method: Callable[Concatenate[Any, str, _P], None], name: str, doc: str
) -> Callable[Concatenate[Iterable[Any], str, _P], None]:
    """A function ``name(alerters, alertname, ...)`` that calls ``method`` on every alerter.

    It takes ``method``'s own parameters, so the two never drift apart. They are checked
    before any call (``TypeError``, as a direct call would raise) and every default is
    passed explicitly, so each alerter gets the same call; a failing alerter is logged,
    never raised.
    """
    signature = inspect.signature(method)
    attribute = method.__name__

    def fan_out(
        alerters: Iterable[Any], alertname: str, /, *args: _P.args, **kwargs: _P.kwargs
    ) -> None:
        call = signature.bind(None, alertname, *args, **kwargs)
        call.apply_defaults()
        for alerter in alerters:
            try:
                getattr(alerter, attribute)(*call.args[1:], **call.kwargs)
            except Exception:
                logger.exception(
                    "alerter %s failed to %s %s", type(alerter).__name__, attribute, alertname
                )

    fan_out.__name__ = fan_out.__qualname__ = name
    fan_out.__doc__ = doc
    return fan_out


fire_all = _fan_out(
    Alerter.fire,
    "fire_all",
    """``fire_all(alerters, alertname, *, severity, summary, ...)``: :meth:`Alerter.fire`
    the same alert on every alerter; a failing alerter is logged, never raised.

    Raises:
        TypeError: arguments :meth:`Alerter.fire` does not accept (before any call).
    """,
)


def _check_alerters(alerters: Sequence[Any]) -> tuple[Any, ...]:
    for alerter in alerters:
        if not isinstance(alerter, Alerter):
            raise TypeError(
                f"alerters: {alerter!r} is not an alerter (it needs fire, resolve, flush and "
                "close); use SentryAlerter or PrometheusAlerter"
            )
    return tuple(alerters)


def _methods(alerters: Sequence[Any], name: str) -> tuple[Any, ...]:
    return tuple(getattr(a, name) for a in alerters if callable(getattr(a, name, None)))


class AlertingSink:
    """The core's sink for a server's alerters: forwards each event to those that want it.

    Costs nothing per message; see :class:`AlertingMessageSink` for alerters that keep
    per-message context (Sentry breadcrumbs).
    """

    def __init__(self, alerters: Sequence[Any]) -> None:
        self.alerters = _check_alerters(alerters)
        self._handshake = _methods(self.alerters, "handshake_finished")
        self._opened = _methods(self.alerters, "connection_opened")
        self._failed = _methods(self.alerters, "handler_failed")
        self._closed = _methods(self.alerters, "connection_closed")

    @staticmethod
    def _call(methods: tuple[Any, ...], *args: Any) -> None:
        for method in methods:
            try:
                method(*args)
            except Exception:
                logger.exception("alerter %s failed", getattr(method, "__qualname__", method))

    def handshake_finished(self, handshake: HandshakeRecord) -> None:
        self._call(self._handshake, handshake)

    def connection_opened(self, connection: ConnectionRecord) -> None:
        self._call(self._opened, connection)

    def handler_failed(self, connection: ConnectionRecord, exc: BaseException) -> None:
        self._call(self._failed, connection, exc)

    def connection_closed(self, connection: ConnectionRecord) -> None:
        self._call(self._closed, connection)

    def shutdown(self, timeout: float) -> None:
        """Flush every alerter, side by side, within ``timeout`` seconds (they keep
        running: an alerter may serve several servers; :meth:`Alerter.close` stops it).
        A Sentry that hangs does not keep Alertmanager from getting its alerts."""
        deadline = time.monotonic() + timeout
        run_until(
            deadline,
            [(f"{type(alerter).__name__}.flush", alerter.flush) for alerter in self.alerters],
        )


class AlertingMessageSink(AlertingSink):
    """:class:`AlertingSink` for alerters that also want per-message events."""

    def __init__(self, alerters: Sequence[Any]) -> None:
        super().__init__(alerters)
        self.message_alerters: tuple[MessageSink, ...] = tuple(
            a for a in self.alerters if isinstance(a, MessageSink)
        )
        # The usual case (one SentryAlerter): no token list per message.
        self._single = self.message_alerters[0] if len(self.message_alerters) == 1 else None

    def message_started(self, connection: ConnectionRecord, message: Data) -> object:
        if self._single is not None:
            return self._single.message_started(connection, message)
        return [a.message_started(connection, message) for a in self.message_alerters]

    def message_finished(
        self,
        connection: ConnectionRecord,
        token: object,
        duration: float,
        error: BaseException | None,
    ) -> None:
        if self._single is not None:
            self._single.message_finished(connection, token, duration, error)
            return
        tokens: list[object] = token  # type: ignore[assignment]
        for alerter, tok in zip(self.message_alerters, tokens, strict=True):
            alerter.message_finished(connection, tok, duration, error)

    def message_sent(self, connection: ConnectionRecord, binary: bool, size: int) -> None:
        for alerter in self.message_alerters:
            alerter.message_sent(connection, binary, size)


def build_sink(config: Config) -> Sink | None:
    """The alerting sink for ``config.alerters``, or ``None`` when there are none.

    Raises:
        TypeError: an entry of ``config.alerters`` is not an :class:`Alerter`.
    """
    if not config.alerters:
        return None
    if any(isinstance(a, MessageSink) for a in config.alerters):
        return AlertingMessageSink(config.alerters)
    return AlertingSink(config.alerters)
