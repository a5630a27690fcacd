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
  failed`` and ``handler_crashed`` log records of the same crash are not reported again.
* Every event captured inside a connection gets tags ``websocket.route``,
  ``websocket.connection_id`` and (once known) ``websocket.close_code``; a ``websocket``
  context (route, subprotocol, age in seconds, message and byte counts); breadcrumbs of
  the last ``max_frames`` messages (direction, type, size in bytes; the payload, cut to
  ``payload_bytes``, only if the client consented to ``"payload"``), kept in a bounded
  deque at O(1) per message; a user built from the privacy layer's client view
  (pseudonymized unless consented); a fingerprint grouping by route and exception type.
* Events of a connection go through the privacy layer (:meth:`Privacy.scrub_event`)
  in a scope event processor, also when the application initialised Sentry itself.

:class:`SentryAlerter` initialises the SDK when the application has not: DSN from
``SENTRY_DSN``, no default PII, ``include_local_variables=False`` (locals
hold payloads) and a ``before_send`` running the privacy layer after the
application's own. When a client is already active, it only adds the integration
to it and changes none of its options.

Never in the way: capturing serializes the event in the caller and hands it to the
SDK's background transport, whose queue is bounded (``transport_queue_size``, 100 by
default); when it is full the event is dropped at once (``put_nowait``), counted
``dropped`` here and as a ``queue_overflow`` client report by the SDK: capture never
waits for the network. ``ws_monitoring_alert_queue_depth{sink="sentry"}`` shows the
transport's queue.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ws_monitoring.config import Config
from ws_monitoring.privacy import PURPOSE_PAYLOAD, Privacy

from .sink import alert_metrics, is_expected_failure

try:
    import sentry_sdk
    from sentry_sdk.integrations import DidNotEnable, Integration
    from sentry_sdk.integrations.dedupe import DedupeIntegration
    from sentry_sdk.scope import add_global_event_processor
    from sentry_sdk.utils import event_from_exception
except ImportError as exc:  # pragma: no cover - sentry-sdk is a dev dependency
    raise ImportError(
        "SentryAlerter needs sentry-sdk: pip install 'ws-monitoring[sentry]'"
    ) from exc

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ws_monitoring.core import ConnectionRecord, HandshakeRecord
    from ws_monitoring.typing import Data

__all__ = ["SentryAlerter", "WebsocketsIntegration"]

logger = logging.getLogger("ws_monitoring.alerting")

_STATE = "sentry"
_REPORTED = "_ws_monitoring_reported"
_LEVELS = {"critical": "fatal", "fatal": "fatal", "error": "error", "warning": "warning",
           "info": "info", "debug": "debug"}  # fmt: skip
#: Loggers whose records about a crash duplicate the event this integration captures.
_CRASH_LOGGERS = ("ws_monitoring.lifecycle",)
_WEBSOCKETS_LOGGERS = ("websockets.",)


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


def _drop_duplicates(event: Any, hint: Any) -> Any:
    """Global processor: no second event for a crash already captured, and no event
    for a closure or client reset that websockets logs as a handler failure."""
    if _enabled() is None:
        return event
    exc = _exception_of(hint)
    if exc is None:
        return event
    if getattr(exc, _REPORTED, False):
        return None
    if is_expected_failure(exc) and _logger_of(event, hint).startswith(_WEBSOCKETS_LOGGERS):
        return None
    return event


class WebsocketsIntegration(Integration):
    """Sentry integration for servers built on ``websockets`` (see the module docstring).

    Args:
        max_frames: Message breadcrumbs kept per connection (the last ones).
        payload_bytes: Most payload characters (text) or bytes (binary, as hex) kept
            per breadcrumb, for clients that consented to ``"payload"``; 0: none.

    Raises:
        ValueError: a negative number.
    """

    identifier = "websockets"
    origin = f"auto.websocket.{identifier}"

    def __init__(self, *, max_frames: int = 20, payload_bytes: int = 256) -> None:
        if max_frames < 0 or payload_bytes < 0:
            raise ValueError("max_frames and payload_bytes must not be negative")
        self.max_frames = max_frames
        self.payload_bytes = payload_bytes

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
        #: (unix time, received, binary, size, payload slice or None)
        self.frames: deque[tuple[float, bool, bool, int, Data | None]] = deque(maxlen=max_frames)
        #: Most payload characters or bytes kept, if the client consents at that time.
        self.payload = payload


def _size(message: Data) -> int:
    if isinstance(message, str):
        # ASCII is the common case and isascii() is O(1) in CPython.
        return len(message) if message.isascii() else len(message.encode("utf-8", "replace"))
    return len(message)


def _breadcrumb(frame: tuple[float, bool, bool, int, Data | None]) -> dict[str, Any]:
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


class SentryAlerter:
    """Critical failures to Sentry: handler crashes, infrastructure and application alerts.

    Args:
        sentry_dsn: The DSN; default ``SENTRY_DSN``. Ignored when the application has
            already initialised Sentry (its client is used as it is).
        environment, release: Passed to ``sentry_sdk.init``.
        max_frames, payload_bytes: See :class:`WebsocketsIntegration`.
        cooldown: Seconds during which an alert fired again (same name and labels) is
            not captured again, even after a resolve.
        registry: Registry of the self-metrics (default: prometheus_client's).
        privacy: Privacy layer for alerts and for events outside connections (default:
            a default one; events of a connection use its server's).
        name: The ``sink`` label of the self-metrics.
        sentry_options: More ``sentry_sdk.init`` options (e.g. ``transport_queue_size``,
            ``before_send``: it runs before the privacy layer).

    Raises:
        ImportError: sentry-sdk is missing (install ``ws-monitoring[sentry]``).
        ValueError: a negative number.
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
        cooldown: float = 60.0,
        registry: CollectorRegistry | None = None,
        privacy: Privacy | None = None,
        name: str = "sentry",
        **sentry_options: Any,
    ) -> None:
        if cooldown < 0:
            raise ValueError(f"cooldown must not be negative, got {cooldown}")
        self.integration = WebsocketsIntegration(max_frames=max_frames, payload_bytes=payload_bytes)
        self.privacy = privacy if privacy is not None else Privacy(Config())
        self.cooldown = float(cooldown)
        self.name = name
        self._lock = threading.Lock()
        self._active: set[tuple[str, frozenset[tuple[str, str]]]] = set()
        self._last_capture: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
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
            sentry_sdk.init(
                dsn=sentry_dsn if sentry_dsn is not None else os.environ.get("SENTRY_DSN"),
                integrations=integrations,
                before_send=self._before_send_chain(user_before_send),
                **options,
            )
        elif client.get_integration(WebsocketsIntegration) is None:
            _add_integration(client, self.integration)

    # -- privacy ----------------------------------------------------------------------------

    def _before_send_chain(
        self, user_hook: Callable[[Any, Any], Any] | None
    ) -> Callable[[Any, Any], Any]:
        def before_send(event: Any, hint: Any) -> Any:
            if user_hook is not None:
                event = user_hook(event, hint)
                if event is None:
                    return None
            user = hint.get("ws_monitoring_user") if hint else None
            privacy = (hint.get("ws_monitoring_privacy") if hint else None) or self.privacy
            try:
                scrubbed = privacy.scrub_event(event)
            except Exception:
                # Fail closed: an event that could not be scrubbed is not sent.
                logger.warning("dropped a Sentry event that could not be scrubbed", exc_info=True)
                return None
            if user is not None:
                # Already the privacy layer's client view: not pseudonymized twice.
                scrubbed["user"] = user
            return scrubbed

        return before_send

    # -- self-metrics -----------------------------------------------------------------------

    @staticmethod
    def _queue_depth() -> float:
        transport = sentry_sdk.get_client().transport
        worker = getattr(transport, "_worker", None)
        queue = getattr(worker, "_queue", None)
        try:
            return float(queue.qsize()) if queue is not None else 0.0
        except Exception:  # pragma: no cover - SDK internals changed
            return 0.0

    def _capture(self, capture: Callable[[], str | None]) -> None:
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

        def processor(event: Any, hint: Any) -> Any:
            try:
                return _process(connection, state, privacy, event, hint)
            except Exception:
                # Fail closed: an event that could not be scrubbed is not sent.
                logger.warning("dropped a Sentry event that could not be scrubbed", exc_info=True)
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
        """Capture the crash (the adapter re-raises it unchanged afterwards)."""
        if is_expected_failure(exc) or _enabled() is None:
            return
        client = sentry_sdk.get_client()
        event, hint = event_from_exception(
            exc,
            client_options=client.options,
            mechanism={"type": "websockets", "handled": False},
        )
        event["fingerprint"] = ["websockets", connection.route, _type_name(exc)]
        # websockets closes the connection with 1011 after a crash.
        event.setdefault("tags", {})["websocket.close_code"] = "1011"
        # Logging integrations may have captured the same exception just before (our
        # handler_crashed log): this event is the complete one, so it must not be the
        # one deduplicated away.
        DedupeIntegration.reset_last_seen()
        self._capture(lambda: sentry_sdk.capture_event(event, hint=hint))
        with contextlib.suppress(Exception):  # exceptions take attributes; be safe anyway
            setattr(exc, _REPORTED, True)

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
        """Capture ``summary`` as a message event at ``severity``'s level.

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
        safe_notes = self.privacy.scrub(notes)
        message = self.privacy.scrub_text(str(summary))
        with sentry_sdk.new_scope() as scope:
            scope.set_level(_LEVELS.get(severity, "error"))  # type: ignore[arg-type]
            scope.fingerprint = [
                "ws-monitoring-alert",
                alertname,
                *(f"{k}={v}" for k, v in sorted(safe_labels.items())),
            ]
            scope.set_tag("alertname", alertname)
            scope.set_tag("severity", severity)
            for label, value in safe_labels.items():
                scope.set_tag(f"alert.{label}", value)
            scope.set_context("alert", {"labels": safe_labels, "annotations": safe_notes})
            self._capture(lambda: sentry_sdk.capture_message(message))

    def resolve(self, alertname: str, labels: Mapping[str, str] | None = None) -> None:
        """Mark the alert inactive (Sentry has no resolve): it may be captured again
        once its cooldown has passed."""
        safe_labels = {k: str(v) for k, v in self.privacy.scrub(dict(labels or {})).items()}
        with self._lock:
            self._active.discard((alertname, frozenset(safe_labels.items())))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait up to ``timeout`` seconds for the SDK's transport to send its queue."""
        sentry_sdk.get_client().flush(timeout=timeout)
        return self._queue_depth() == 0

    def close(self, timeout: float = 5.0) -> None:
        """Flush; close the SDK client only if this alerter initialised it."""
        client = sentry_sdk.get_client()
        if self.owns_client and client.get_integration(WebsocketsIntegration) is self.integration:
            client.close(timeout=timeout)
        else:
            client.flush(timeout=timeout)


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _process(
    connection: ConnectionRecord,
    state: _ConnState,
    privacy: Privacy,
    event: dict[str, Any],
    hint: dict[str, Any],
) -> dict[str, Any] | None:
    """Scope processor of one connection: enrich, then scrub with its server's privacy."""
    if _enabled() is None:
        return event
    if _exception_of(hint) is not None and _logger_of(event, hint).startswith(_CRASH_LOGGERS):
        # The handler_crashed log of a crash that handler_failed captures in full.
        return None
    tags = event.setdefault("tags", {})
    if connection.close_code is not None:
        tags["websocket.close_code"] = str(connection.close_code)
    event.setdefault("contexts", {})["websocket"] = {
        "route": connection.route,
        "subprotocol": connection.subprotocol,
        "age_seconds": round(connection.age, 3),
        "messages_received": connection.messages_received,
        "messages_sent": connection.messages_sent,
        "bytes_received": connection.in_bytes,
        "bytes_sent": connection.out_bytes,
    }
    if state.frames:
        # The scope has put its own breadcrumbs here, as {"values": [...]}.
        crumbs = event.setdefault("breadcrumbs", {}).setdefault("values", [])
        crumbs.extend(_breadcrumb(f) for f in list(state.frames))
    if "fingerprint" not in event:
        exception = _exception_of(hint)
        if exception is not None:
            event["fingerprint"] = ["websockets", connection.route, _type_name(exception)]
    try:
        scrubbed = privacy.scrub_event(event)
    except Exception:
        # A breadcrumb of another integration may hold an object the scrubber cannot
        # read (e.g. a dead weak proxy in a log record's extras): keep only ours.
        event["breadcrumbs"] = {"values": [_breadcrumb(f) for f in list(state.frames)]}
        scrubbed = privacy.scrub_event(event)
    # The privacy layer's current client view (consent may have changed since the
    # connection opened); pseudonymizing it again would break the link with the logs.
    user = _safe_user(connection)
    if user:
        scrubbed["user"] = user
        hint["ws_monitoring_user"] = user
    hint["ws_monitoring_privacy"] = privacy
    return scrubbed


def _add_integration(client: Any, integration: WebsocketsIntegration) -> None:
    """Enable ``integration`` on an application's client without touching its options."""
    from sentry_sdk.integrations import setup_integrations

    try:
        installed = setup_integrations([integration], with_defaults=False, options=client.options)
    except TypeError:  # pragma: no cover - sentry-sdk versions before the options argument
        installed = setup_integrations([integration], with_defaults=False)
    client.integrations.update(installed)
