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
alerts: they are metrics. Every alerter does its network I/O on a background worker
with a bounded queue; its self-metrics are ``ws_monitoring_alerts_total{sink, outcome}``
(``sent``, ``failed``, ``retried``, ``dropped``) and
``ws_monitoring_alert_queue_depth{sink}``.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, runtime_checkable

from .config import Config
from .typing import Data, MessageSink, Sink

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge

    from .alertmanager import PrometheusAlerter
    from .core import ConnectionRecord, HandshakeRecord
    from .sentry_integration import SentryAlerter, WebsocketsIntegration

__all__ = [
    "OUTCOMES",
    "Alerter",
    "AlertingSink",
    "PrometheusAlerter",
    "SentryAlerter",
    "ServerWatchdog",
    "WebsocketsIntegration",
    "build_sink",
    "fire_all",
    "is_expected_failure",
    "watch_server",
]

logger = logging.getLogger("ws_monitoring.alerting")

#: Values of the ``outcome`` label of ``ws_monitoring_alerts_total``.
OUTCOMES = ("sent", "failed", "retried", "dropped")


@runtime_checkable
class Alerter(Protocol):
    """What :func:`ws_monitoring.serve` accepts in ``alerters``.

    An alerter may also implement any :class:`~ws_monitoring.typing.Sink` method
    (``handler_failed``...) and the :class:`~ws_monitoring.typing.MessageSink` ones: the
    alerting sink forwards those events to it. No method may block or raise.
    """

    def fire(
        self,
        alertname: str,
        *,
        severity: str,
        summary: str,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        """Raise (or keep raising) the alert identified by ``alertname`` and ``labels``."""

    def resolve(self, alertname: str, labels: Mapping[str, str] | None = None) -> None:
        """Resolve that alert; a no-op when it is not active."""

    def flush(self, timeout: float = 5.0) -> bool:
        """Deliver what is queued within ``timeout`` seconds; ``True`` if all was."""

    def close(self, timeout: float = 5.0) -> None:
        """Flush within ``timeout`` seconds, then stop; what is left is counted dropped."""


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
        """Flush every alerter within ``timeout`` seconds in total (they keep running:
        an alerter may serve several servers; :meth:`Alerter.close` stops it)."""
        deadline = time.monotonic() + timeout
        for alerter in self.alerters:
            try:
                alerter.flush(max(0.0, deadline - time.monotonic()))
            except Exception:
                logger.exception("alerter %s failed to flush", type(alerter).__name__)


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


# -- infrastructure: the accept loop ----------------------------------------------------------


def _server_state(server: Any) -> tuple[bool, bool]:
    """(serving, closing on purpose) for a websockets asyncio or threading server."""
    if hasattr(server, "close_task"):  # websockets.asyncio.server.Server
        serving = not server.get_loop().is_closed() and bool(server.is_serving())
        return serving, server.close_task is not None
    # websockets.sync.server.Server: serve_forever() sets socket_closed when it exits;
    # shutdown() closes its notifier first, which tells a deliberate stop from a crash.
    notifier = getattr(server, "shutdown_notifier", None)
    stopping = notifier is not None and notifier.fileno() == -1
    return not server.socket_closed.is_set() and server.socket.fileno() != -1, stopping


class ServerWatchdog:
    """Fires ``WebSocketServerDown`` when a server stops accepting connections unexpectedly.

    Watches a ``websockets`` asyncio ``Server`` or threading ``Server`` from a daemon
    thread, every ``interval`` seconds: the alert fires once if the listening sockets
    stop serving (asyncio: ``is_serving()`` is false, or the event loop is closed;
    threading: ``serve_forever()`` exited or the socket was closed) without
    ``close()``/``shutdown()`` having been called. :meth:`stop` checks one last time,
    so a ``serve_forever()`` that returns because its socket died is still reported.

    Use :func:`watch_server`, as a context manager around ``serve_forever()``.
    """

    def __init__(
        self,
        server: Any,
        alerters: Sequence[Any],
        *,
        interval: float = 1.0,
        name: str = "websockets",
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        if not (hasattr(server, "close_task") or hasattr(server, "socket_closed")):
            raise TypeError(f"expected a websockets asyncio or threading Server, got {server!r}")
        self.server = server
        self.alerters = _check_alerters(alerters)
        self.interval = interval
        self.name = name
        #: Set once the alert has fired (after every alerter got it).
        self.tripped = threading.Event()
        self._fired = False
        #: Checks done so far (by the thread, :meth:`check` and :meth:`stop`).
        self.checks = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._listen = self._address()

    def _address(self) -> str:
        try:
            sockets = (
                self.server.sockets if hasattr(self.server, "close_task") else [self.server.socket]
            )
            names = []
            for sock in sockets:
                host, port = sock.getsockname()[:2]
                names.append(f"{host}:{port}")
            return ", ".join(names)
        except (OSError, AttributeError, ValueError):
            return "unknown"

    def check(self) -> bool:
        """Check now; fire if the server died unexpectedly. Returns whether it is healthy."""
        self.checks += 1
        serving, stopping = _server_state(self.server)
        if serving or stopping:
            return True
        with self._lock:
            if self._fired:
                return False
            self._fired = True
        fire_all(
            self.alerters,
            "WebSocketServerDown",
            severity="critical",
            summary=f"WebSocket server {self.name!r} stopped accepting connections",
            description=(
                "Its listening sockets stopped serving without close() or shutdown(): "
                "new clients cannot connect. Restart the process."
            ),
            labels={"server": self.name},
            annotations={"listen_address": self._listen},
        )
        self.tripped.set()
        return False

    def start(self) -> ServerWatchdog:
        """Start watching (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"ws-monitoring-watchdog-{self.name}", daemon=True
            )
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.check():
                    return
            except Exception:  # pragma: no cover - a watchdog must not die silently
                logger.exception("server watchdog %s failed", self.name)
                return

    def stop(self) -> None:
        """Stop watching, after a last check."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.check()
        except Exception:  # pragma: no cover - stopping must not raise
            logger.exception("server watchdog %s failed", self.name)
        if self._thread is not None:
            self._thread.join(self.interval + 1.0)

    def __enter__(self) -> ServerWatchdog:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> ServerWatchdog:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


def watch_server(
    server: Any, alerters: Sequence[Any], *, interval: float = 1.0, name: str = "websockets"
) -> ServerWatchdog:
    """Watch ``server``'s accept loop; ``WebSocketServerDown`` fires if it dies unexpectedly.

    Returns a started :class:`ServerWatchdog`, usable (a)synchronously as a context
    manager::

        with serve_sync(handler, "", 8765, alerters=alerters) as server, \\
                watch_server(server, alerters):
            server.serve_forever()

    Raises:
        TypeError: ``server`` is not a websockets server, or an entry of ``alerters``
            is not an :class:`Alerter`.
        ValueError: ``interval`` is not positive.
    """
    return ServerWatchdog(server, alerters, interval=interval, name=name).start()


# -- lazy exports (optional dependencies) -----------------------------------------------------


def __getattr__(name: str) -> Any:
    if name == "PrometheusAlerter":
        from .alertmanager import PrometheusAlerter

        return PrometheusAlerter
    if name in ("SentryAlerter", "WebsocketsIntegration"):
        from . import sentry_integration

        return getattr(sentry_integration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
