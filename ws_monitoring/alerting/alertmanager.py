"""Alertmanager alerter: ``POST /api/v2/alerts`` from background threads, as Prometheus does.

:class:`PrometheusAlerter` keeps a table of active alerts. ``fire`` and ``resolve``
only update that table under a lock and queue the change: they never wait for the
network. A scheduler thread re-sends firing alerts every ``resend_interval`` (with
``endsAt`` four intervals ahead, so Alertmanager resolves them by itself if this
process dies) and resolves alerts fired with ``resolve_after`` once they have been
quiet that long. One sender thread per Alertmanager (an HA cluster gets every alert,
on every node) delivers in batches with ``httpx``.

Delivery rules:

* Identical label sets are deduplicated: firing an active alert again changes nothing
  unless its annotations or severity changed. The queue holds the latest state of each
  label set, so it never holds two versions of one alert.
* Cooldown: per alert, state changes (annotation updates, a re-fire after a resolve, a
  resolve) are queued at most once per ``cooldown`` seconds; a change within the
  cooldown waits for its end and is merged with later ones, so a flapping alert costs
  one notification per cooldown, not one per flap. The first fire is never delayed;
  :meth:`PrometheusAlerter.flush` sends waiting changes at once.
* A 2xx answer counts ``sent``. A 4xx answer is logged once (per status and
  Alertmanager), counted ``failed`` and not retried. A 5xx answer, a timeout or a
  connection error counts ``retried`` and is retried with exponential backoff and
  jitter, for as long as the alerter runs: an Alertmanager that comes back gets what
  is queued.
* The queue of each Alertmanager is bounded (``queue_size`` label sets, in flight
  included); the active table too (``max_active``). What does not fit is counted
  ``dropped``, as is what is still queued when :meth:`PrometheusAlerter.close` gives up.

Self-metrics, in ``registry`` (default: prometheus_client's):
``ws_monitoring_alerts_total{sink, outcome}`` (per alert and Alertmanager) and
``ws_monitoring_alert_queue_depth{sink}`` (label sets queued, over all Alertmanagers);
``sink`` is the alerter's ``name`` (``alertmanager``): give two alerters sharing a
registry different names.

Built-in alerts, when used as a server's alerter (``serve(..., alerters=[...])``):
``WebSocketHandlerCrashes`` (``critical``; annotations ``count``, ``routes``,
``exception_types``; resolves after ``crash_quiet_period`` seconds without a crash)
and ``WebSocketErrorStorm`` (``warning``; fires while connections end with an error,
or handshakes fail, faster than ``error_rate_threshold`` per second averaged over
``error_rate_window`` seconds; resolves a window after the rate fell back). The sink
events only update counters on the event loop (a crash storm costs it a few operations
per crash); the scheduler thread builds, scrubs and fires these alerts, and
:meth:`PrometheusAlerter.flush` fires what is due first.

At exit, open alerters deliver their queues within what is left of the shared shutdown
deadline (:data:`ws_monitoring.core.SHUTDOWN_TIMEOUT`), side by side with the other sinks.

Labels and annotations go through the privacy layer (:meth:`Privacy.scrub`); the
static labels (``service``, ``instance``, ``environment`` and ``labels=``) are the
operator's own and are kept as given.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import math
import os
import random
import re
import socket
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ws_monitoring.config import Config
from ws_monitoring.core import at_exit
from ws_monitoring.privacy import Privacy

from .sink import alert_metrics, is_expected_failure

if TYPE_CHECKING:
    import httpx
    from prometheus_client import CollectorRegistry

    from ws_monitoring.core import ConnectionRecord, HandshakeRecord

__all__ = ["PrometheusAlerter"]

logger = logging.getLogger("ws_monitoring.alerting")

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_API_PATH = "/api/v2/alerts"
#: Distinct routes or exception types named in an aggregated alert; the rest are "other".
_MAX_NAMED = 10
_INF = math.inf


def _utc(offset: float = 0.0) -> str:
    now = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _api_url(url: str) -> str:
    import httpx

    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"alertmanager_url: expected an http(s) URL, got {url!r}")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"alertmanager_url: {url!r} is not a valid URL ({exc})") from None
    if not parsed.host or (parsed.port is not None and not 0 < parsed.port < 65536):
        raise ValueError(f"alertmanager_url: {url!r} is not a valid URL (host or port)")
    url = url.rstrip("/")
    return url if url.endswith(_API_PATH) else url + _API_PATH


def _check_labels(kind: str, mapping: Mapping[str, Any] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, value in (mapping or {}).items():
        if not isinstance(key, str) or not _LABEL_NAME.fullmatch(key):
            raise ValueError(f"{kind}: {key!r} is not a valid name ([a-zA-Z_][a-zA-Z0-9_]*)")
        if value is None:
            continue
        result[key] = str(value)
    return result


def _bump(counts: dict[str, int], name: str) -> None:
    if name in counts or len(counts) < _MAX_NAMED:
        counts[name] = counts.get(name, 0) + 1
    else:
        counts["other"] = counts.get("other", 0) + 1


def _describe(counts: Mapping[str, int]) -> str:
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{name} ({count})" for name, count in ordered)


class _Alert:
    __slots__ = ("annotations", "due", "ends_at", "labels", "last_queued", "resolve_at",
                 "starts_at")  # fmt: skip

    def __init__(self, labels: dict[str, str], annotations: dict[str, str]) -> None:
        self.labels = labels
        self.annotations = annotations
        self.starts_at = _utc()
        #: Resolution time (UTC) once resolved; None while firing.
        self.ends_at: str | None = None
        #: Monotonic time of an automatic resolve (``resolve_after``), if any.
        self.resolve_at: float | None = None
        #: Monotonic time this alert's state was last queued.
        self.last_queued = -_INF
        #: Monotonic time a change waiting for the cooldown is due, if any.
        self.due: float | None = None


class _Target:
    """One Alertmanager: its queue (label set -> latest payload) and retry state."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pending: dict[frozenset[tuple[str, str]], dict[str, Any]] = {}
        self.attempt = 0
        self.next_try = 0.0
        self.warned: set[int] = set()
        self.thread: threading.Thread | None = None


class PrometheusAlerter:
    """Sends alerts to one Alertmanager, or to every node of an HA cluster.

    Args:
        alertmanager_url: Base URL (``http://host:9093``) or a list of them.
        generator_url: ``generatorURL`` of every alert (a runbook or dashboard link).
        labels: More static labels on every alert.
        service, instance, environment: Static labels on every alert. Defaults:
            ``OTEL_SERVICE_NAME`` or ``websockets``; the host name;
            ``WS_MONITORING_ENVIRONMENT`` or ``production``.
        resend_interval: Seconds between re-sends of a firing alert.
        cooldown: Minimum seconds between two queued state changes of one alert.
        timeout: Seconds an HTTP request may take (connect, read, write each).
        queue_size: Label sets queued per Alertmanager before new ones are dropped.
        max_active: Alerts tracked at once before new ones are dropped.
        batch_size: Alerts per ``POST``.
        backoff, max_backoff: First and longest retry delay in seconds (doubled per
            failure, with jitter: a delay is drawn between half and all of it).
        crash_quiet_period: Seconds without a handler crash before
            ``WebSocketHandlerCrashes`` resolves.
        error_rate_threshold, error_rate_window: ``WebSocketErrorStorm`` fires when
            errors per second, averaged over the window (seconds), exceed the threshold.
        registry: Registry of the self-metrics (default: prometheus_client's).
        privacy: Privacy layer for labels and annotations (default: a default one).
        name: The ``sink`` label of the self-metrics.
        headers: Extra HTTP headers (e.g. ``Authorization`` for a proxy in front).

    Raises:
        ImportError: ``httpx`` is missing (install ``ws-monitoring[alertmanager]``).
        ValueError: an invalid URL, label name or number.
    """

    def __init__(
        self,
        alertmanager_url: str | Sequence[str],
        *,
        generator_url: str | None = None,
        labels: Mapping[str, str] | None = None,
        service: str | None = None,
        instance: str | None = None,
        environment: str | None = None,
        resend_interval: float = 60.0,
        cooldown: float = 30.0,
        timeout: float = 5.0,
        queue_size: int = 1000,
        max_active: int = 1000,
        batch_size: int = 64,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        crash_quiet_period: float = 300.0,
        error_rate_threshold: float = 1.0,
        error_rate_window: float = 60.0,
        registry: CollectorRegistry | None = None,
        privacy: Privacy | None = None,
        name: str = "alertmanager",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        try:
            import httpx  # noqa: F401 - fail now, not in the sender thread
        except ImportError as exc:  # pragma: no cover - httpx is a dev dependency
            raise ImportError(
                "PrometheusAlerter needs httpx: pip install 'ws-monitoring[alertmanager]'"
            ) from exc
        urls = [alertmanager_url] if isinstance(alertmanager_url, str) else alertmanager_url
        if not urls:
            raise ValueError("alertmanager_url: at least one URL is needed")
        for field, value in (
            ("resend_interval", resend_interval),
            ("timeout", timeout),
            ("backoff", backoff),
            ("max_backoff", max_backoff),
            ("crash_quiet_period", crash_quiet_period),
            ("error_rate_threshold", error_rate_threshold),
            ("error_rate_window", error_rate_window),
        ):
            if not value > 0:
                raise ValueError(f"{field} must be positive, got {value}")
        if cooldown < 0:
            raise ValueError(f"cooldown must not be negative, got {cooldown}")
        for field, count in (
            ("queue_size", queue_size),
            ("max_active", max_active),
            ("batch_size", batch_size),
        ):
            if count < 1:
                raise ValueError(f"{field} must be at least 1, got {count}")
        self.targets = [_Target(_api_url(url)) for url in urls]
        self.generator_url = generator_url
        static = {
            "service": service or os.environ.get("OTEL_SERVICE_NAME") or "websockets",
            "instance": instance or socket.gethostname(),
            "environment": environment
            or os.environ.get("WS_MONITORING_ENVIRONMENT")
            or "production",
        }
        static.update(_check_labels("labels", labels))
        #: Labels on every alert.
        self.static_labels: dict[str, str] = static
        self._keep = frozenset(static) | {"alertname", "severity"}
        self.resend_interval = float(resend_interval)
        self.cooldown = float(cooldown)
        self.timeout = float(timeout)
        self.queue_size = queue_size
        self.max_active = max_active
        self.batch_size = batch_size
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.crash_quiet_period = float(crash_quiet_period)
        self.error_rate_threshold = float(error_rate_threshold)
        self.error_rate_window = float(error_rate_window)
        self.privacy = privacy if privacy is not None else Privacy(Config())
        self.name = name
        self.headers = {"Content-Type": "application/json", **(headers or {})}

        metrics = alert_metrics(registry)
        self._counters, self._depth_gauge = metrics.sink(name)
        self._depth = 0
        self._depth_gauge.set(0)

        self._lock = threading.Lock()
        self._send_cond = threading.Condition(self._lock)
        self._sched_cond = threading.Condition(self._lock)
        self._idle_cond = threading.Condition(self._lock)
        self._active: dict[frozenset[tuple[str, str]], _Alert] = {}
        self._next_wake = _INF
        self._closed = False
        self._scheduler: threading.Thread | None = None
        self._random = random.Random()

        # Aggregation state of the built-in alerts. The sink events (on the event loop)
        # only count, under _stats_lock (never held around anything else); the
        # scheduler thread, or flush(), builds, scrubs and fires the alerts, under
        # _builtins_lock (taken before _lock), so that they go out in order.
        self._stats_lock = threading.Lock()
        self._builtins_lock = threading.Lock()
        #: Whether a built-in alert waits to be fired (set by the sink events).
        self._builtins_due = False
        self._crash_due = False
        self._crash_last = -_INF
        self._crash_count = 0
        self._crash_routes: dict[str, int] = {}
        self._crash_types: dict[str, int] = {}
        self._window = max(1, math.ceil(self.error_rate_window))
        self._ring = [0] * self._window
        self._ring_total = 0
        self._ring_second: int | None = None
        self._storm_kinds: dict[str, int] = {}
        self._storm_since = -_INF
        self._storm_fired = -_INF
        #: (rate, error kinds) of the WebSocketErrorStorm to fire, if one is due.
        self._storm_due: tuple[float, dict[str, int]] | None = None
        _live.add(self)
        at_exit(_close_all)

    # -- public API -----------------------------------------------------------------------

    def fire(
        self,
        alertname: str,
        *,
        severity: str,
        summary: str,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        resolve_after: float | None = None,
    ) -> None:
        """Raise the alert ``alertname`` + ``labels`` (plus the static labels).

        ``severity`` becomes a label, ``summary`` and ``description`` annotations.
        Returns at once; see the module docstring for delivery. With ``resolve_after``
        (seconds), the alert resolves itself unless fired again within that time.

        Raises:
            ValueError: an empty ``alertname`` or ``severity``, an invalid label or
                annotation name, or a non-positive ``resolve_after``.
        """
        if not isinstance(alertname, str) or not alertname:
            raise ValueError("alertname must be a non-empty string")
        if not isinstance(severity, str) or not severity:
            raise ValueError("severity must be a non-empty string")
        if resolve_after is not None and not resolve_after > 0:
            raise ValueError(f"resolve_after must be positive, got {resolve_after}")
        extra = _check_labels("labels", labels)
        notes = _check_labels("annotations", annotations)
        notes["summary"] = str(summary)
        if description is not None:
            notes["description"] = str(description)
        full = {**self.static_labels, **extra, "alertname": alertname, "severity": severity}
        full = self._scrub(full, self._keep)
        notes = self._scrub(notes, frozenset())
        identity = frozenset((k, v) for k, v in full.items() if k != "severity")
        now = time.monotonic()
        with self._lock:
            if self._closed:
                self._counters["dropped"].inc()
                return
            alert = self._active.get(identity)
            if alert is None:
                if len(self._active) >= self.max_active:
                    self._counters["dropped"].inc()
                    logger.warning(
                        "alerter %s: %d alerts active, dropping %s", self.name, len(self._active),
                        alertname,
                    )  # fmt: skip
                    return
                alert = self._active[identity] = _Alert(full, notes)
                changed = True
            else:
                changed = False
                if alert.ends_at is not None:
                    if alert.due is None:
                        # Its resolution was sent: this is a new occurrence.
                        alert.starts_at = _utc()
                    alert.ends_at = None
                    changed = True
                if alert.labels != full:
                    # A new severity is a new label set: resolve the old one at once.
                    old = _Alert(alert.labels, alert.annotations)
                    old.starts_at, old.ends_at = alert.starts_at, _utc()
                    self._enqueue(old, now)
                    alert.labels = full
                    changed = True
                if alert.annotations != notes:
                    alert.annotations = notes
                    changed = True
            alert.resolve_at = None if resolve_after is None else now + resolve_after
            if alert.resolve_at is not None:
                self._wake_scheduler(alert.resolve_at)
            if changed:
                self._change(alert, now)

    def resolve(self, alertname: str, labels: Mapping[str, str] | None = None) -> None:
        """Resolve the alert ``alertname`` + ``labels``: it is sent with ``endsAt``.

        A no-op when that alert is not active.

        Raises:
            ValueError: an invalid label name.
        """
        extra = _check_labels("labels", labels)
        full = self._scrub({**self.static_labels, **extra, "alertname": alertname}, self._keep)
        identity = frozenset(full.items())
        with self._lock:
            alert = self._active.get(identity)
            if alert is None or alert.ends_at is not None:
                return
            self._resolve(alert, time.monotonic())

    def active_alerts(self) -> list[dict[str, Any]]:
        """The firing alerts as they would be sent (labels, annotations, startsAt)."""
        with self._lock:
            return [
                {"labels": dict(a.labels), "annotations": dict(a.annotations),
                 "startsAt": a.starts_at}
                for a in self._active.values()
                if a.ends_at is None
            ]  # fmt: skip

    @property
    def queue_depth(self) -> int:
        """Label sets waiting for delivery, over all Alertmanagers."""
        return self._depth

    def flush(self, timeout: float = 5.0) -> bool:
        """Queue changes held back by the cooldown, then wait up to ``timeout`` seconds
        until every queue is empty. Returns whether it emptied."""
        deadline = time.monotonic() + timeout
        self._fire_builtins()
        with self._lock:
            now = time.monotonic()
            for alert in list(self._active.values()):
                if alert.due is not None:
                    self._enqueue(alert, now)
            while self._depth > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return False
                self._idle_cond.wait(remaining)
            return True

    def close(self, timeout: float = 5.0) -> None:
        """:meth:`flush` within ``timeout`` seconds, then stop the threads. Idempotent.

        Alerts still queued are counted ``dropped``. A request in flight is abandoned
        (its thread is a daemon that ends with its own timeout).
        """
        if self._closed:
            return
        self.flush(timeout)
        with self._lock:
            self._closed = True
            if self._depth:
                self._counters["dropped"].inc(self._depth)
            for target in self.targets:
                target.pending.clear()
            self._set_depth(0)
            self._send_cond.notify_all()
            self._sched_cond.notify_all()
            self._idle_cond.notify_all()
        _live.discard(self)

    # -- Sink events: the built-in alerts ----------------------------------------------------

    def shutdown(self, timeout: float) -> None:
        """Sink API: :meth:`flush` (the alerter keeps running; :meth:`close` stops it)."""
        self.flush(timeout)

    def handshake_finished(self, handshake: HandshakeRecord) -> None:
        """A failed handshake (not a client that left early) counts as an error."""
        if handshake.outcome == "failed" and handshake.failure != "connection_lost":
            self._error(f"handshake_{handshake.failure}")

    def handler_failed(self, connection: ConnectionRecord, exc: BaseException) -> None:
        """One more crash in ``WebSocketHandlerCrashes`` (client resets do not count).

        On the event loop: a few counter updates; the alert is built and fired by the
        scheduler thread.
        """
        if is_expected_failure(exc):
            return
        now = time.monotonic()
        with self._stats_lock:
            if now - self._crash_last > self.crash_quiet_period:
                self._crash_count = 0
                self._crash_routes = {}
                self._crash_types = {}
            self._crash_last = now
            self._crash_count += 1
            _bump(self._crash_routes, connection.route)
            _bump(self._crash_types, f"{type(exc).__module__}.{type(exc).__qualname__}")
            self._crash_due = True
            kick, self._builtins_due = not self._builtins_due, True
        if kick:
            self._kick()

    def connection_closed(self, connection: ConnectionRecord) -> None:
        """A connection that ended with an error (``error_type``) counts as an error."""
        if connection.error_type is not None:
            self._error(connection.error_type)

    def _error(self, kind: str) -> None:
        now = time.monotonic()
        second = int(now)
        window = self._window
        with self._stats_lock:
            last = self._ring_second
            if last is None or second - last >= window:
                self._ring = [0] * window
                self._ring_total = 0
            else:
                for s in range(last + 1, second + 1):
                    self._ring_total -= self._ring[s % window]
                    self._ring[s % window] = 0
            self._ring_second = second
            self._ring[second % window] += 1
            self._ring_total += 1
            if now - self._storm_since > window and now - self._storm_fired > window:
                self._storm_kinds = {}
                self._storm_since = now
            _bump(self._storm_kinds, kind)
            rate = self._ring_total / window
            if rate <= self.error_rate_threshold or now - self._storm_fired < 1.0:
                return
            self._storm_fired = now
            self._storm_due = (rate, dict(self._storm_kinds))
            kick, self._builtins_due = not self._builtins_due, True
        if kick:
            self._kick()

    def _kick(self) -> None:
        """Wake the scheduler: a built-in alert is due (once per scheduler round)."""
        with self._lock:
            if not self._closed:
                self._start_threads()
                self._sched_cond.notify()

    def _fire_builtins(self) -> None:
        """Fire the built-in alerts that are due (scheduler thread, or flush)."""
        with self._builtins_lock:
            with self._stats_lock:
                if not self._builtins_due:
                    return
                self._builtins_due = False
                crash = None
                if self._crash_due:
                    self._crash_due = False
                    crash = (self._crash_count, dict(self._crash_routes), dict(self._crash_types))
                storm, self._storm_due = self._storm_due, None
            if crash is not None:
                count, routes, types = crash
                self.fire(
                    "WebSocketHandlerCrashes",
                    severity="critical",
                    summary=f"{count} WebSocket handler crash{'' if count == 1 else 'es'} "
                    f"on {', '.join(sorted(routes))}",
                    description="Connection handlers raised unhandled exceptions (closed "
                    "with 1011). Tracebacks are in Sentry and in the logs.",
                    annotations={
                        "count": str(count),
                        "routes": _describe(routes),
                        "exception_types": _describe(types),
                    },
                    resolve_after=self.crash_quiet_period,
                )
            if storm is not None:
                rate, kinds = storm
                self.fire(
                    "WebSocketErrorStorm",
                    severity="warning",
                    summary=f"WebSocket errors at {rate:.3g}/s over {self._window}s "
                    f"(threshold {self.error_rate_threshold:g}/s)",
                    description="Connections end with errors or abnormal closes, or "
                    "handshakes fail, faster than the threshold.",
                    annotations={"rate_per_second": f"{rate:.3g}", "error_types": _describe(kinds)},
                    resolve_after=self._window,
                )

    # -- internals (called with self._lock held) ---------------------------------------------

    def _scrub(self, mapping: dict[str, str], keep: frozenset[str]) -> dict[str, str]:
        scrubbed = self.privacy.scrub(mapping, keep=keep)
        return {k: str(v) for k, v in scrubbed.items() if v is not None}

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self._depth_gauge.set(depth)

    def _wake_scheduler(self, when: float) -> None:
        if when < self._next_wake:
            self._next_wake = when
            self._sched_cond.notify()

    def _resolve(self, alert: _Alert, now: float) -> None:
        alert.ends_at = _utc()
        alert.resolve_at = None
        self._change(alert, now)

    def _change(self, alert: _Alert, now: float) -> None:
        if now - alert.last_queued >= self.cooldown:
            self._enqueue(alert, now)
        else:
            alert.due = alert.last_queued + self.cooldown
            self._wake_scheduler(alert.due)

    def _enqueue(self, alert: _Alert, now: float) -> None:
        payload: dict[str, Any] = {
            "labels": dict(alert.labels),
            "annotations": dict(alert.annotations),
            "startsAt": alert.starts_at,
        }
        if alert.ends_at is not None:
            payload["endsAt"] = alert.ends_at
        if self.generator_url:
            payload["generatorURL"] = self.generator_url
        key = frozenset(alert.labels.items())
        depth = self._depth
        for target in self.targets:
            if key in target.pending:
                target.pending[key] = payload
            elif len(target.pending) >= self.queue_size:
                self._counters["dropped"].inc()
            else:
                target.pending[key] = payload
                depth += 1
        self._set_depth(depth)
        alert.last_queued = now
        alert.due = None
        self._wake_scheduler(now + self.resend_interval)
        self._start_threads()
        self._send_cond.notify_all()

    def _start_threads(self) -> None:
        if self._scheduler is not None:
            return
        self._scheduler = threading.Thread(
            target=self._schedule_loop, name=f"ws-monitoring-{self.name}-scheduler", daemon=True
        )
        self._scheduler.start()
        for index, target in enumerate(self.targets):
            target.thread = threading.Thread(
                target=self._send_loop,
                args=(target,),
                name=f"ws-monitoring-{self.name}-{index}",
                daemon=True,
            )
            target.thread.start()

    def _tick(self, now: float) -> float:
        """Due resolves, deferred changes, re-sends and purges; returns the next wake-up."""
        wake = _INF
        for identity, alert in list(self._active.items()):
            if alert.ends_at is None and alert.resolve_at is not None and now >= alert.resolve_at:
                self._resolve(alert, now)
            if alert.due is not None:
                if now >= alert.due:
                    self._enqueue(alert, now)
                else:
                    wake = min(wake, alert.due)
            if alert.ends_at is None:
                if alert.due is None:
                    resend_at = alert.last_queued + self.resend_interval
                    if now >= resend_at:
                        self._enqueue(alert, now)
                        resend_at = now + self.resend_interval
                    wake = min(wake, resend_at)
                if alert.resolve_at is not None:
                    wake = min(wake, alert.resolve_at)
            elif alert.due is None:
                # Kept for a cooldown after its resolution, so a re-fire is held back.
                forget_at = alert.last_queued + self.cooldown
                if now >= forget_at:
                    del self._active[identity]
                else:
                    wake = min(wake, forget_at)
        return wake

    def _schedule_loop(self) -> None:
        while True:
            # Without _lock: fire() takes it.
            try:
                self._fire_builtins()
            except Exception:  # pragma: no cover - a bug must not kill the scheduler
                logger.exception("alerter %s: a built-in alert failed", self.name)
            with self._lock:
                if self._closed:
                    return
                if self._builtins_due:  # set while they were being fired
                    continue
                now = time.monotonic()
                self._next_wake = _INF
                wake = self._tick(now)
                self._next_wake = min(self._next_wake, wake)
                timeout = None if self._next_wake == _INF else max(0.0, self._next_wake - now)
                self._sched_cond.wait(timeout)

    # -- delivery -------------------------------------------------------------------------

    def _send_loop(self, target: _Target) -> None:
        import httpx

        with httpx.Client(timeout=self.timeout, headers=self.headers) as client:
            while True:
                with self._lock:
                    while True:
                        if self._closed:
                            return
                        now = time.monotonic()
                        if target.pending and now >= target.next_try:
                            break
                        self._send_cond.wait((target.next_try - now) if target.pending else None)
                    batch = list(itertools.islice(target.pending.items(), self.batch_size))
                self._deliver(client, target, batch)

    def _render(self, payload: dict[str, Any]) -> dict[str, Any]:
        if "endsAt" in payload:
            return payload
        # Firing: Alertmanager resolves it by itself if the re-sends stop (as Prometheus).
        return {**payload, "endsAt": _utc(4 * self.resend_interval)}

    def _deliver(
        self,
        client: httpx.Client,
        target: _Target,
        batch: list[tuple[frozenset[tuple[str, str]], dict[str, Any]]],
    ) -> None:
        import httpx

        status: int | None = None
        error: str | None = None
        try:
            response = client.post(target.url, json=[self._render(p) for _, p in batch])
            status = response.status_code
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # pragma: no cover - a bug must not kill the sender thread
            logger.exception("alerter %s: unexpected error sending to %s", self.name, target.url)
            error = type(exc).__name__
        with self._lock:
            if self._closed:
                return
            if status is not None and 200 <= status < 300:
                outcome = "sent"
                if target.attempt:
                    logger.info("alerter %s: %s reachable again", self.name, target.url)
                target.attempt = 0
            elif status is not None and status < 500:
                outcome = "failed"
                if status not in target.warned:
                    target.warned.add(status)
                    logger.error(
                        "alerter %s: %s answered %d; those alerts are dropped, not retried "
                        "(logged once per status)", self.name, target.url, status,
                    )  # fmt: skip
            else:
                outcome = "retried"
                target.attempt += 1
                delay = min(self.max_backoff, self.backoff * 2 ** (target.attempt - 1))
                delay *= self._random.uniform(0.5, 1.0)
                target.next_try = time.monotonic() + delay
                if target.attempt == 1:
                    logger.warning(
                        "alerter %s: %s failed (%s); retrying with backoff", self.name,
                        target.url, error or f"HTTP {status}",
                    )  # fmt: skip
            self._counters[outcome].inc(len(batch))
            if outcome != "retried":
                depth = self._depth
                for key, payload in batch:
                    # Unless a newer state of that alert was queued meanwhile.
                    if target.pending.get(key) is payload:
                        del target.pending[key]
                        depth -= 1
                self._set_depth(depth)
                if depth == 0:
                    self._idle_cond.notify_all()


_live: weakref.WeakSet[PrometheusAlerter] = weakref.WeakSet()


def _close_all(timeout: float) -> None:
    """Exit hook: close every open alerter (deliver its queue) within ``timeout``
    seconds in total, what is left of the shared shutdown deadline."""
    deadline = time.monotonic() + timeout
    for alerter in list(_live):
        alerter.close(max(0.0, deadline - time.monotonic()))
