"""Sentry: a ``websockets`` integration for sentry-sdk 2.x, and :class:`SentryAlerter`.

:class:`WebsocketsIntegration` (``identifier = "websockets"``) does the per-connection
work when a server is instrumented with a :class:`SentryAlerter` among its alerters:

* Each connection runs in its own Sentry isolation scope, entered when it opens and
  left when it closes (in the connection's own task or thread), so whatever the handler
  adds to the scope stays with that connection.
* An unhandled handler exception is captured with
  ``mechanism={"type": "websockets", "handled": False}`` and then propagates unchanged.
  Normal closures, ``ConnectionClosedOK``/``ConnectionClosedError``, ``CancelledError``
  and client resets are not reported: they are metrics. The ``connection handler
  failed`` and ``handler_crashed`` log records of the same crash are not reported again
  (they are not even built into events).
* Every event captured inside a connection gets tags ``websocket.route``,
  ``websocket.connection_id`` and (once known) ``websocket.close_code``; a ``websocket``
  context (route, subprotocol, age in seconds, message and byte counts); breadcrumbs of
  the last ``max_frames`` messages (direction, type, size in bytes; the payload, cut to
  ``payload_bytes``, only if the client consented to ``"payload"``), kept in a bounded
  deque at O(1) per message; a user built from the privacy layer's client view
  (pseudonymized unless consented); a fingerprint grouping by route and exception type.
  An event keeps its last ``max_breadcrumbs`` breadcrumbs (the scope's and ours): older
  ones are dropped before scrubbing, whose cost grows with them.
* Events of a connection go through the privacy layer (:meth:`Privacy.scrub_event`)
  in a scope event processor, also when the application initialised Sentry itself.

:class:`SentryAlerter` initialises the SDK when the application has not: DSN from
``SENTRY_DSN``, no default PII, ``include_local_variables=False`` (locals
hold payloads) and a ``before_send`` running the privacy layer after the
application's own. When a client is already active, it only adds the integration
to it and changes none of its options.

Never in the way: on the connection's thread (the event loop, for asyncio servers) a
crash costs a few microseconds: the exception and its traceback, the connection's
counters and last frames and a copy of its scopes are queued for the alerter's worker
thread, which builds the event (stack frames, source context), runs the processors
and the privacy layer, and hands it to the SDK's transport. :meth:`SentryAlerter.fire`
does the same. What is not sent is counted in ``ws_monitoring_alerts_total{sink="sentry",
outcome="dropped"}``:

* crashes beyond ``rate_limit`` events per fingerprint (route and exception type) per
  ``rate_window`` seconds (a token bucket: a burst of ``rate_limit``, then one every
  ``rate_window / rate_limit`` seconds): one broken route in a crash storm sends a
  few events, not thousands; the others are still counted by the metrics and logs;
* work that finds the worker's queue full (``queue_size``) or the SDK's transport
  queue full (``transport_queue_size``, 100 by default: the event is dropped by the
  SDK, which also reports a ``queue_overflow``);
* events that could not be scrubbed (fail closed), and work still queued when
  :meth:`SentryAlerter.close` gives up.

Capture never waits for the network. ``ws_monitoring_alert_queue_depth{sink="sentry"}``
is the worker's queue plus the transport's. At exit, the queue is flushed (and the
SDK's client closed, if this alerter initialised it: the SDK's own exit hook is off)
within what is left of the shared shutdown deadline (:data:`ws_monitoring.core.SHUTDOWN_TIMEOUT`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ws_monitoring.config import Config
from ws_monitoring.core import at_exit
from ws_monitoring.privacy import PURPOSE_PAYLOAD, Privacy

from .sink import Worker, alert_metrics, is_expected_failure

try:
    import sentry_sdk
    from sentry_sdk.integrations import DidNotEnable, Integration
    from sentry_sdk.integrations.atexit import AtexitIntegration
    from sentry_sdk.integrations.dedupe import DedupeIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration
    from sentry_sdk.scope import add_global_event_processor, use_isolation_scope, use_scope
    from sentry_sdk.utils import event_from_exception
except ImportError as exc:  # pragma: no cover - sentry-sdk is a dev dependency
    raise ImportError(
        "SentryAlerter needs sentry-sdk: pip install 'ws-monitoring[sentry]'"
    ) from exc

if TYPE_CHECKING:
    from types import TracebackType

    from prometheus_client import CollectorRegistry

    from ws_monitoring.core import ConnectionRecord, HandshakeRecord
    from ws_monitoring.typing import Data

__all__ = ["SentryAlerter", "WebsocketsIntegration"]

logger = logging.getLogger("ws_monitoring.alerting")

_STATE = "sentry"
_REPORTED = "_ws_monitoring_reported"
#: Hint key of the facts read on the connection's thread (events built elsewhere).
_FACTS = "ws_monitoring_facts"
_SCRUBBED = "ws_monitoring_scrubbed"
_LEVELS = {"critical": "fatal", "fatal": "fatal", "error": "error", "warning": "warning",
           "info": "info", "debug": "debug"}  # fmt: skip
#: Loggers whose records about a crash duplicate the event this integration captures.
_CRASH_LOGGERS = ("ws_monitoring.lifecycle",)
_WEBSOCKETS_LOGGERS = ("websockets.",)

#: (unix time, received, binary, size, payload slice or None)
Frame = tuple[float, bool, bool, int, "Data | None"]


def _enabled() -> WebsocketsIntegration | None:
    return sentry_sdk.get_client().get_integration(WebsocketsIntegration)


def _exception_of(hint: Mapping[str, Any] | None) -> BaseException | None:
    exc_info = hint.get("exc_info") if hint else None
    if exc_info and isinstance(exc_info, tuple) and len(exc_info) == 3:
        exc = exc_info[1]
        return exc if isinstance(exc, BaseException) else None
    return None


def _logger_of(event: Mapping[str, Any], hint: Mapping[str, Any] | None) -> str:
    record = hint.get("log_record") if hint else None
    name = getattr(record, "name", None) or event.get("logger")
    return name if isinstance(name, str) else ""


def _duplicate(logger_name: str, exc: BaseException, in_connection: bool) -> bool:
    """Whether a log record of ``logger_name`` about ``exc`` repeats a crash we report
    (or is a closure or client reset that websockets logs as a handler failure)."""
    if getattr(exc, _REPORTED, False):
        return True
    if logger_name.startswith(_WEBSOCKETS_LOGGERS):
        return is_expected_failure(exc)
    # The handler_crashed log of a crash that handler_failed captures in full.
    return in_connection and logger_name.startswith(_CRASH_LOGGERS)


def _drop_duplicates(event: Any, hint: Any) -> Any:
    """Global processor: no second event for a crash already captured, and no event
    for a closure or client reset that websockets logs as a handler failure."""
    if _enabled() is None or (hint and _FACTS in hint):  # the crash event itself
        return event
    exc = _exception_of(hint)
    if exc is None:
        return event
    if getattr(exc, _REPORTED, False):
        return None
    if is_expected_failure(exc) and _logger_of(event, hint).startswith(_WEBSOCKETS_LOGGERS):
        return None
    return event


class _CrashRecords(logging.Filter):
    """On sentry-sdk's logging event handler: a log record about a crash this
    integration reports is not built into an event at all.

    The processors above would drop that event too, but only after the SDK walked the
    traceback and ran its pipeline on the logging thread (the event loop).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc_info = record.exc_info
        if not exc_info or not isinstance(exc_info, tuple) or exc_info[1] is None:
            return True
        if _enabled() is None:
            return True
        return not _duplicate(record.name, exc_info[1], in_connection=True)


_CRASH_RECORDS = _CrashRecords()


def _filter_crash_records() -> None:
    """Install :data:`_CRASH_RECORDS` on the current client's logging event handler.

    ``LoggingIntegration`` keeps that handler as ``_handler`` (sentry-sdk 2.x); if it
    is not there, the processors still drop the duplicates, later.
    """
    integration = sentry_sdk.get_client().get_integration(LoggingIntegration)
    handler = getattr(integration, "_handler", None)
    if isinstance(handler, logging.Handler) and _CRASH_RECORDS not in handler.filters:
        handler.addFilter(_CRASH_RECORDS)


class WebsocketsIntegration(Integration):
    """Sentry integration for servers built on ``websockets`` (see the module docstring).

    Args:
        max_frames: Message breadcrumbs kept per connection (the last ones).
        payload_bytes: Most payload characters (text) or bytes (binary, as hex) kept
            per breadcrumb, for clients that consented to ``"payload"``; 0: none.
        max_breadcrumbs: Most breadcrumbs an event of a connection keeps (the last
            ones, the scope's and the message breadcrumbs together).

    Raises:
        ValueError: a negative number.
    """

    identifier = "websockets"
    origin = f"auto.websocket.{identifier}"

    def __init__(
        self, *, max_frames: int = 20, payload_bytes: int = 256, max_breadcrumbs: int = 30
    ) -> None:
        if max_frames < 0 or payload_bytes < 0 or max_breadcrumbs < 0:
            raise ValueError("max_frames, payload_bytes and max_breadcrumbs must not be negative")
        self.max_frames = max_frames
        self.payload_bytes = payload_bytes
        self.max_breadcrumbs = max_breadcrumbs

    @staticmethod
    def setup_once() -> None:
        try:
            from websockets.version import version
        except ImportError:  # pragma: no cover - websockets is a dependency
            raise DidNotEnable("websockets is not installed") from None
        major, minor = (int(part) for part in version.split(".")[:2])
        if (major, minor) < (17, 2):  # pragma: no cover - the dependency requires 17.2
            raise DidNotEnable(f"websockets {version} is too old: 17.2 or newer is needed")
        add_global_event_processor(_drop_duplicates)


class _ConnState:
    """What the integration keeps on one connection record."""

    __slots__ = ("frames", "payload", "scope_cm")

    def __init__(self, scope_cm: Any, max_frames: int, payload: int) -> None:
        self.scope_cm = scope_cm
        self.frames: deque[Frame] = deque(maxlen=max_frames)
        #: Most payload characters or bytes kept, if the client consents at that time.
        self.payload = payload


class _Facts:
    """What an event says about its connection, read on the connection's own thread
    (the record keeps changing there; events may be built in the alerter's worker)."""

    __slots__ = ("close_code", "context", "frames", "route", "user")

    def __init__(self, connection: ConnectionRecord, state: _ConnState) -> None:
        self.route = connection.route
        code = connection.close_code
        self.close_code = None if code is None else str(code)
        self.context: dict[str, Any] = {
            "route": connection.route,
            "subprotocol": connection.subprotocol,
            "age_seconds": round(connection.age, 3),
            "messages_received": connection.messages_received,
            "messages_sent": connection.messages_sent,
            "bytes_received": connection.in_bytes,
            "bytes_sent": connection.out_bytes,
        }
        self.frames = list(state.frames)
        # The privacy layer's current client view (consent may have changed since the
        # connection opened); pseudonymizing it again would break the link with the logs.
        self.user = _safe_user(connection)


def _size(message: Data) -> int:
    if isinstance(message, str):
        # ASCII is the common case and isascii() is O(1) in CPython.
        return len(message) if message.isascii() else len(message.encode("utf-8", "replace"))
    return len(message)


def _breadcrumb(frame: Frame) -> dict[str, Any]:
    at, received, binary, size, payload = frame
    kind = "binary" if binary else "text"
    data: dict[str, Any] = {
        "direction": "in" if received else "out",
        "type": kind,
        "size": size,
    }
    if payload is not None:
        data["payload"] = payload.hex() if isinstance(payload, bytes) else payload
    return {
        "type": "default",
        "category": "websocket.message",
        "level": "info",
        "timestamp": at,
        "message": f"{'received' if received else 'sent'} {kind} message ({size} bytes)",
        "data": data,
    }


def _safe_user(connection: ConnectionRecord) -> dict[str, Any]:
    client = connection.client
    user: dict[str, Any] = {}
    subject = client.user or getattr(client, "subject", None)
    if subject:
        user["id"] = subject
    if client.ip:
        user["ip_address"] = client.ip
    return user


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _crash_event(
    exc: BaseException, tb: TracebackType | None, route: str, options: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """The event and hint of a handler crash (in the worker: it walks the traceback).

    The privacy layer scrubs the exception's value with the rest of the event, in the
    connection's processor (:func:`_process`).
    """
    event, hint = event_from_exception(
        (type(exc), exc, tb),
        client_options=options,
        mechanism={"type": "websockets", "handled": False},
    )
    event["fingerprint"] = ["websockets", route, _type_name(exc)]
    # websockets closes the connection with 1011 after a crash.
    event.setdefault("tags", {})["websocket.close_code"] = "1011"
    return event, dict(hint)


class _RateLimit:
    """Token buckets per key: a burst of ``limit``, refilled at ``limit / window`` per
    second. At most ``max_keys`` buckets: the least recently used ones are forgotten."""

    def __init__(self, limit: int, window: float, max_keys: int = 10_000) -> None:
        self.limit = float(limit)
        self.rate = limit / window
        self.max_keys = max_keys
        self._buckets: collections.OrderedDict[tuple[str, str], list[float]] = (
            collections.OrderedDict()
        )

    def allow(self, key: tuple[str, str], now: float) -> bool:
        """Take a token for ``key`` if there is one (called from one thread at a time)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = [self.limit, now]
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(self.limit, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] < 1.0:
            return False
        bucket[0] -= 1.0
        return True


class SentryAlerter:
    """Critical failures to Sentry: handler crashes, infrastructure and application alerts.

    Args:
        sentry_dsn: The DSN; default ``SENTRY_DSN``. Ignored when the application has
            already initialised Sentry (its client is used as it is).
        environment, release: Passed to ``sentry_sdk.init``.
        max_frames, payload_bytes, max_breadcrumbs: See :class:`WebsocketsIntegration`.
        cooldown: Seconds during which an alert fired again (same name and labels) is
            not captured again, even after a resolve.
        rate_limit: Crash events per fingerprint (route and exception type) per
            ``rate_window`` seconds, after a burst of as many; the others are counted
            ``dropped``. ``None``: no limit.
        rate_window: See ``rate_limit``.
        queue_size: Crashes and alerts waiting for the worker thread, at most.
        registry: Registry of the self-metrics (default: prometheus_client's).
        privacy: Privacy layer for alerts and for events outside connections (default:
            a default one; events of a connection use its server's).
        name: The ``sink`` label of the self-metrics.
        sentry_options: More ``sentry_sdk.init`` options (e.g. ``transport_queue_size``,
            ``before_send``: it runs before the privacy layer).

    Raises:
        ImportError: sentry-sdk is missing (install ``ws-monitoring[sentry]``).
        ValueError: a negative number, or a non-positive ``rate_window``,
            ``rate_limit`` or ``queue_size``.
    """

    #: Alerts whose last capture time is remembered (for the cooldown), at most.
    max_tracked = 10_000

    def __init__(
        self,
        sentry_dsn: str | None = None,
        *,
        environment: str | None = None,
        release: str | None = None,
        max_frames: int = 20,
        payload_bytes: int = 256,
        max_breadcrumbs: int = 30,
        cooldown: float = 60.0,
        rate_limit: int | None = 10,
        rate_window: float = 60.0,
        queue_size: int = 100,
        registry: CollectorRegistry | None = None,
        privacy: Privacy | None = None,
        name: str = "sentry",
        **sentry_options: Any,
    ) -> None:
        if cooldown < 0:
            raise ValueError(f"cooldown must not be negative, got {cooldown}")
        if rate_limit is not None and rate_limit < 1:
            raise ValueError(f"rate_limit must be at least 1 (or None), got {rate_limit}")
        if not rate_window > 0:
            raise ValueError(f"rate_window must be positive, got {rate_window}")
        self.integration = WebsocketsIntegration(
            max_frames=max_frames, payload_bytes=payload_bytes, max_breadcrumbs=max_breadcrumbs
        )
        self.privacy = privacy if privacy is not None else Privacy(Config())
        self.cooldown = float(cooldown)
        self.name = name
        self._lock = threading.Lock()
        self._active: set[tuple[str, frozenset[tuple[str, str]]]] = set()
        self._last_capture: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self._limit = None if rate_limit is None else _RateLimit(rate_limit, rate_window)
        self._limit_lock = threading.Lock()
        self._warned_limit = False
        self._worker = Worker(name, queue_size)
        self._counters, depth = alert_metrics(registry).sink(name)
        depth.set_function(self._queue_depth)

        client = sentry_sdk.get_client()
        #: Whether this alerter initialised the SDK (then :meth:`close` closes it).
        self.owns_client = not client.is_active()
        if self.owns_client:
            user_before_send = sentry_options.pop("before_send", None)
            integrations = [*sentry_options.pop("integrations", ()), self.integration]
            # send_default_pii is left unset: its default sends no PII (and setting it
            # is deprecated in favour of data_collection, which defaults to the same).
            options: dict[str, Any] = {
                "include_local_variables": False,
                **sentry_options,
            }
            if environment is not None:
                options["environment"] = environment
            if release is not None:
                options["release"] = release
            # Its exit hook would wait shutdown_timeout (2 s) more, before the worker's
            # queue is in: ours closes the client within the shared deadline.
            options["disabled_integrations"] = [
                *options.get("disabled_integrations", ()),
                AtexitIntegration(),
            ]
            sentry_sdk.init(
                dsn=sentry_dsn if sentry_dsn is not None else os.environ.get("SENTRY_DSN"),
                integrations=integrations,
                before_send=self._before_send_chain(user_before_send),
                **options,
            )
        elif client.get_integration(WebsocketsIntegration) is None:
            _add_integration(client, self.integration)
        _filter_crash_records()
        _live.add(self)
        at_exit(_close_all)

    # -- privacy ----------------------------------------------------------------------------

    def _before_send_chain(
        self, user_hook: Callable[[Any, Any], Any] | None
    ) -> Callable[[Any, Any], Any]:
        def before_send(event: Any, hint: Any) -> Any:
            if user_hook is not None:
                event = user_hook(event, hint)
                if event is None:
                    return None
            elif hint and hint.get(_SCRUBBED):
                # Scrubbed by its connection's processor, and no hook added anything since.
                return event
            user = hint.get("ws_monitoring_user") if hint else None
            privacy = (hint.get("ws_monitoring_privacy") if hint else None) or self.privacy
            try:
                scrubbed = privacy.scrub_event(event)
            except Exception:
                # Fail closed: an event that could not be scrubbed is not sent.
                logger.warning("dropped a Sentry event that could not be scrubbed", exc_info=True)
                self._counters["dropped"].inc()
                return None
            if user is not None:
                # Already the privacy layer's client view: not pseudonymized twice.
                scrubbed["user"] = user
            return scrubbed

        return before_send

    # -- self-metrics -----------------------------------------------------------------------

    def _queue_depth(self) -> float:
        transport = sentry_sdk.get_client().transport
        worker = getattr(transport, "_worker", None)
        queue = getattr(worker, "_queue", None)
        try:
            queued = float(queue.qsize()) if queue is not None else 0.0
        except Exception:  # pragma: no cover - SDK internals changed
            queued = 0.0
        return queued + self._worker.pending

    def _capture(self, capture: Callable[[], str | None]) -> None:
        """Run ``capture`` (in the worker) and count what became of the event."""
        client = sentry_sdk.get_client()
        worker = getattr(client.transport, "_worker", None)
        full = False
        try:
            full = bool(worker is not None and worker.full())
        except Exception:  # pragma: no cover - SDK internals changed
            full = False
        event_id = capture()
        if full:
            self._counters["dropped"].inc()
        elif event_id is not None and client.transport is not None:
            self._counters["sent"].inc()

    def _submit(self, job: Callable[[], None]) -> None:
        if not self._worker.submit(job):
            self._counters["dropped"].inc()

    # -- Sink events ------------------------------------------------------------------------

    def connection_opened(self, connection: ConnectionRecord) -> None:
        integration = _enabled()
        if integration is None:
            return
        scope_cm = sentry_sdk.isolation_scope()
        scope = scope_cm.__enter__()
        state = _ConnState(scope_cm, integration.max_frames, integration.payload_bytes)
        connection.context[_STATE] = state
        scope.set_tag("websocket.route", connection.route)
        scope.set_tag("websocket.connection_id", connection.id)
        privacy = connection.monitor.privacy
        max_breadcrumbs = integration.max_breadcrumbs

        def processor(event: Any, hint: Any) -> Any:
            try:
                facts = hint.get(_FACTS) if hint else None
                if facts is None:
                    # Captured by the application, on the connection's thread.
                    facts = _Facts(connection, state)
                return _process(facts, privacy, max_breadcrumbs, event, hint)
            except Exception:
                # Fail closed: an event that could not be scrubbed is not sent.
                logger.warning("dropped a Sentry event that could not be scrubbed", exc_info=True)
                self._counters["dropped"].inc()
                return None

        scope.add_event_processor(processor)

    def message_started(self, connection: ConnectionRecord, message: Data) -> object:
        state: _ConnState | None = connection.context.get(_STATE)
        if state is not None:
            # Consent may be granted or withdrawn during the connection: checked per message.
            payload = (
                message[: state.payload]
                if state.payload and connection.client.allows(PURPOSE_PAYLOAD)
                else None
            )
            state.frames.append(
                (time.time(), True, not isinstance(message, str), _size(message), payload)
            )
        return None

    def message_finished(
        self,
        connection: ConnectionRecord,
        token: object,
        duration: float,
        error: BaseException | None,
    ) -> None:
        """Nothing to do: a message's breadcrumb is recorded when it starts."""

    def message_sent(self, connection: ConnectionRecord, binary: bool, size: int) -> None:
        state: _ConnState | None = connection.context.get(_STATE)
        if state is not None:
            state.frames.append((time.time(), False, binary, size, None))

    def handler_failed(self, connection: ConnectionRecord, exc: BaseException) -> None:
        """Queue the crash for the worker (the adapter re-raises it unchanged afterwards).

        Only cheap reads here, on the connection's thread: the exception and its
        traceback object, the connection's facts, copies of its Sentry scopes.
        """
        if is_expected_failure(exc) or _enabled() is None:
            return
        with contextlib.suppress(Exception):  # exceptions take attributes; be safe anyway
            # Set even if this crash is not sent: its log records must not be either.
            setattr(exc, _REPORTED, True)
        state: _ConnState | None = connection.context.get(_STATE)
        if state is None:
            return
        if self._limit is not None:
            with self._limit_lock:
                allowed = self._limit.allow((connection.route, _type_name(exc)), time.monotonic())
            if not allowed:
                self._counters["dropped"].inc()
                if not self._warned_limit:
                    self._warned_limit = True
                    logger.warning(
                        "alerter %s: more than %g crash events per fingerprint per %g s; "
                        "the others are counted dropped (logged once)",
                        self.name, self._limit.limit, self._limit.limit / self._limit.rate,
                    )  # fmt: skip
                return
        facts = _Facts(connection, state)
        facts.close_code = "1011"
        isolation = sentry_sdk.get_isolation_scope().fork()
        current = sentry_sdk.get_current_scope().fork()
        tb = exc.__traceback__
        self._submit(lambda: self._send_crash(exc, tb, facts, isolation, current))

    def _send_crash(
        self,
        exc: BaseException,
        tb: TracebackType | None,
        facts: _Facts,
        isolation: sentry_sdk.Scope,
        current: sentry_sdk.Scope,
    ) -> None:
        """In the worker: build the crash event and capture it in the connection's scopes."""
        with use_isolation_scope(isolation), use_scope(current):
            client = sentry_sdk.get_client()
            if client.get_integration(WebsocketsIntegration) is None:
                return
            event, hint = _crash_event(exc, tb, facts.route, client.options)
            hint[_FACTS] = facts
            # Logging integrations may have captured the same exception before (on
            # another thread): this event is the complete one, never deduplicated away.
            DedupeIntegration.reset_last_seen()
            self._capture(lambda: sentry_sdk.capture_event(event, hint=hint))

    def connection_closed(self, connection: ConnectionRecord) -> None:
        state: _ConnState | None = connection.context.pop(_STATE, None)
        if state is None:
            return
        try:
            state.scope_cm.__exit__(None, None, None)
        except Exception:  # pragma: no cover - a context mismatch must not break the server
            logger.debug("cannot leave the Sentry scope of %s", connection.id, exc_info=True)

    def handshake_finished(self, handshake: HandshakeRecord) -> None:
        """Handshake failures are metrics, not Sentry events."""

    def shutdown(self, timeout: float) -> None:
        """Sink API: :meth:`flush` (the SDK keeps running; :meth:`close` stops it)."""
        self.flush(timeout)

    # -- Alerter API ------------------------------------------------------------------------

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
        """Capture ``summary`` as a message event at ``severity``'s level (in the worker).

        Deduplicated: an alert already active (same ``alertname`` and ``labels``), or
        captured less than ``cooldown`` seconds ago, is not captured again. Grouped by
        alert name and labels. Labels and annotations go through the privacy layer.

        Raises:
            ValueError: an empty ``alertname``.
        """
        if not isinstance(alertname, str) or not alertname:
            raise ValueError("alertname must be a non-empty string")
        safe_labels = {k: str(v) for k, v in self.privacy.scrub(dict(labels or {})).items()}
        key = (alertname, frozenset(safe_labels.items()))
        now = time.monotonic()
        with self._lock:
            if key in self._active or now - self._last_capture.get(key, -1e18) < self.cooldown:
                return
            self._active.add(key)
            self._last_capture[key] = now
            if len(self._last_capture) > self.max_tracked:
                # Bounded: forget the oldest half first (insertion order).
                for stale in list(self._last_capture)[: self.max_tracked // 2 + 1]:
                    del self._last_capture[stale]
        notes = dict(annotations or {})
        if description is not None:
            notes["description"] = description
        self._submit(
            lambda: self._send_alert(alertname, severity, str(summary), safe_labels, notes)
        )

    def _send_alert(
        self,
        alertname: str,
        severity: str,
        summary: str,
        labels: dict[str, str],
        notes: dict[str, Any],
    ) -> None:
        """In the worker: scrub the alert's texts and capture it as a message."""
        safe_notes = self.privacy.scrub(notes)
        message = self.privacy.scrub_text(summary)
        with sentry_sdk.new_scope() as scope:
            scope.set_level(_LEVELS.get(severity, "error"))  # type: ignore[arg-type]
            scope.fingerprint = [
                "ws-monitoring-alert",
                alertname,
                *(f"{k}={v}" for k, v in sorted(labels.items())),
            ]
            scope.set_tag("alertname", alertname)
            scope.set_tag("severity", severity)
            for label, value in labels.items():
                scope.set_tag(f"alert.{label}", value)
            scope.set_context("alert", {"labels": labels, "annotations": safe_notes})
            self._capture(lambda: sentry_sdk.capture_message(message))

    def resolve(self, alertname: str, labels: Mapping[str, str] | None = None) -> None:
        """Mark the alert inactive (Sentry has no resolve): it may be captured again
        once its cooldown has passed."""
        safe_labels = {k: str(v) for k, v in self.privacy.scrub(dict(labels or {})).items()}
        with self._lock:
            self._active.discard((alertname, frozenset(safe_labels.items())))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait up to ``timeout`` seconds for the worker's queue, then the SDK's
        transport, to be sent. Returns whether both are empty."""
        deadline = time.monotonic() + timeout
        self._worker.wait_idle(timeout)
        sentry_sdk.get_client().flush(timeout=max(0.0, deadline - time.monotonic()))
        return self._queue_depth() == 0

    def close(self, timeout: float = 5.0) -> None:
        """Flush within ``timeout`` seconds and stop the worker (what it did not start
        is counted dropped); close the SDK client only if this alerter initialised it."""
        deadline = time.monotonic() + timeout
        self._worker.wait_idle(timeout)
        dropped = self._worker.close()
        if dropped:
            self._counters["dropped"].inc(dropped)
        _live.discard(self)
        remaining = max(0.0, deadline - time.monotonic())
        client = sentry_sdk.get_client()
        if self.owns_client and client.get_integration(WebsocketsIntegration) is self.integration:
            client.close(timeout=remaining)
        else:
            client.flush(timeout=remaining)


def _process(
    facts: _Facts,
    privacy: Privacy,
    max_breadcrumbs: int,
    event: dict[str, Any],
    hint: dict[str, Any],
) -> dict[str, Any] | None:
    """Scope processor of one connection: enrich, then scrub with its server's privacy."""
    if _enabled() is None:
        return event
    exception = _exception_of(hint)
    crash = _FACTS in hint  # the crash event handler_failed queued
    if exception is not None and not crash and _duplicate(_logger_of(event, hint), exception, True):
        return None
    tags = event.setdefault("tags", {})
    if facts.close_code is not None:
        tags["websocket.close_code"] = facts.close_code
    event.setdefault("contexts", {})["websocket"] = facts.context
    ours = [_breadcrumb(f) for f in facts.frames]
    if ours:
        # The scope has put its own breadcrumbs here, as {"values": [...]}.
        event.setdefault("breadcrumbs", {}).setdefault("values", []).extend(ours)
    crumbs = event.get("breadcrumbs")
    if isinstance(crumbs, dict) and isinstance(crumbs.get("values"), list):
        # The last ones only: scrubbing costs per breadcrumb.
        values = crumbs["values"]
        crumbs["values"] = values[len(values) - max_breadcrumbs :] if max_breadcrumbs else []
    if "fingerprint" not in event and exception is not None:
        event["fingerprint"] = ["websockets", facts.route, _type_name(exception)]
    try:
        scrubbed = privacy.scrub_event(event)
    except Exception:
        # A breadcrumb of another integration may hold an object the scrubber cannot
        # read (e.g. a dead weak proxy in a log record's extras): keep only ours.
        event["breadcrumbs"] = {"values": ours[len(ours) - max_breadcrumbs :]}
        scrubbed = privacy.scrub_event(event)
    if facts.user:
        scrubbed["user"] = facts.user
        hint["ws_monitoring_user"] = facts.user
    hint["ws_monitoring_privacy"] = privacy
    hint[_SCRUBBED] = True
    return scrubbed


def _add_integration(client: Any, integration: WebsocketsIntegration) -> None:
    """Enable ``integration`` on an application's client without touching its options."""
    from sentry_sdk.integrations import setup_integrations

    try:
        installed = setup_integrations([integration], with_defaults=False, options=client.options)
    except TypeError:  # pragma: no cover - sentry-sdk versions before the options argument
        installed = setup_integrations([integration], with_defaults=False)
    client.integrations.update(installed)


_live: weakref.WeakSet[SentryAlerter] = weakref.WeakSet()


def _close_all(timeout: float) -> None:
    """Exit hook: every open alerter's queue to the transport, then its client closed (if
    it initialised it), within what is left of the shared shutdown deadline."""
    deadline = time.monotonic() + timeout
    for alerter in list(_live):
        alerter.close(max(0.0, deadline - time.monotonic()))
