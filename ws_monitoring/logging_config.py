"""Structured logging for ELK/Kibana and Loki: :func:`setup_logging`.

Formats (``fmt``):

``"json"``
    python-json-logger's ``pythonjsonlogger.json.JsonFormatter`` (the ``[logging]``
    extra), flat keys: ``timestamp`` (UTC ISO-8601, ms, ``Z``), ``level``, ``logger``,
    ``message``, ``service``, then when known ``connection_id``, ``route``,
    ``client_ip``, ``user_id``, ``trace_id``, ``span_id``, the event's fields
    (``event``, ``duration_s``, ``close_code``...), extras, and for exceptions
    ``error_type``, ``error_message``, ``stack_trace``. Loki: keep stream labels to
    ``service`` and ``level``; parse the rest at query time with ``| json``.
``"ecs"``
    Elastic Common Schema 8.x, nested objects: ``@timestamp``, ``log.level``,
    ``log.logger``, ``message``, ``ecs.version``, ``service.name``, ``trace.id``,
    ``span.id``, ``client.ip`` (``client.address`` holds a pseudonym, which is no IP),
    ``user.id``, ``error.*``, ``event.action``, ``event.duration`` (ns) and the
    WebSocket fields under ``websocket.*``. Kibana reads it without mapping work.
``"text"``
    One line per record for humans at a terminal (the stack trace follows it);
    control characters in messages are escaped.

Every JSON line is one valid JSON object whatever a message holds: output is ASCII
(``\\n``, quotes, control characters and U+2028 are escaped), lone surrogates become
U+FFFD, strings longer than ``max_field_length`` are cut, and a record that cannot be
formatted still yields a line saying so.

Privacy: message text, exception text and extras pass through
:meth:`ws_monitoring.privacy.Privacy.scrub_text`/``scrub`` (``scrub=True``); the
client fields come from the connection's :class:`~ws_monitoring.privacy.Client` view.

What is configured: the ``ws_monitoring`` and ``websockets`` loggers (levels, handlers,
``propagate=False`` so nothing reaches the application's root handlers twice), and the
``ws_monitoring.consent`` journal when ``consent_journal`` is given. The root logger
is touched only with ``root=True``. ``websockets`` stays at INFO or above unless
``websockets_level`` says otherwise, because its DEBUG lines carry frame payloads.
Calling :func:`setup_logging` again first removes what the previous call installed.

``websockets``' own ``connection open``, ``connection closed``, ``connection
handler failed``, ``connection rejected`` and ``HTTP response sent`` lines would
duplicate the lifecycle logs: a filter on the ``websockets.server`` logger (so it
applies to every handler, the application's included) suppresses them for connections
whose monitor logs the lifecycle (``log_lifecycle=True``, the default); the two
handshake lines only under :func:`ws_monitoring.serve`, which logs handshakes (health
checks, logged by neither, then leave no line). For other connections they pass.
Set ``suppress_websockets_lifecycle=False`` to keep them all.

I/O: by default records are formatted in the caller (so context-local state such as
the current connection and the current span is read where the record was made), then
written by one background thread through a bounded queue (``queue_size``); when it is
full, records are dropped and counted (:attr:`LoggingSetup.dropped`) instead of
blocking an event loop. ``background=False`` writes synchronously.
"""

from __future__ import annotations

import atexit
import contextvars
import copy
import datetime
import json
import logging
import logging.handlers
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Any

from .config import Config
from .privacy import JOURNAL_LOGGER, Privacy, monitor_of

if TYPE_CHECKING:
    from .core import ConnectionRecord

__all__ = [
    "ECS_VERSION",
    "FORMATS",
    "LoggingSetup",
    "current_connection",
    "setup_logging",
]

FORMATS = ("json", "ecs", "text")
ECS_VERSION = "8.11.0"
DEFAULT_SERVICE = "unknown_service:python"

#: The connection whose handler is running in this task/thread (set by the lifecycle
#: sink), so that any record logged inside a handler carries its id and route.
current_connection: contextvars.ContextVar[ConnectionRecord | None] = contextvars.ContextVar(
    "ws_monitoring_connection", default=None
)

#: websockets' messages that the lifecycle logs replace (see module docstring).
_WEBSOCKETS_LIFECYCLE = frozenset(
    {
        "connection open",
        "connection closed",
        "connection rejected (%d %s)",
        "HTTP response sent (%d %s)",
        "connection handler failed",
    }
)
_WEBSOCKETS_HANDSHAKE = frozenset({"connection rejected (%d %s)", "HTTP response sent (%d %s)"})
_SURROGATE = re.compile("[\ud800-\udfff]")
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "ws",
    "ws_connection",
    "websocket",
}
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 127)} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}
_ECS_CONTEXT = {
    "connection_id": "websocket.connection_id",
    "route": "websocket.route",
    "user_id": "user.id",
    "trace_id": "trace.id",
    "span_id": "span.id",
    "error_type": "error.type",
    "error_message": "error.message",
    "stack_trace": "error.stack_trace",
}


def _utc(created: float) -> str:
    stamp = datetime.datetime.fromtimestamp(created, datetime.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _span_ids() -> tuple[str | None, str | None]:
    # Only look if someone imported OpenTelemetry: no import means no active span.
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None, None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None, None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def _connection_of(record: logging.LogRecord) -> ConnectionRecord | None:
    connection = getattr(record, "ws_connection", None)
    if connection is not None:
        return connection  # type: ignore[no-any-return]
    connection = current_connection.get()
    if connection is not None:
        return connection
    websocket = getattr(record, "websocket", None)
    if websocket is not None:
        from .asyncio_server import RECORD_ATTR

        try:
            return getattr(websocket, RECORD_ATTR, None)
        except ReferenceError:
            return None
    return None


class _Fields:
    """Builds the canonical flat fields of a record; shared by the three formats."""

    def __init__(
        self,
        service_name: str,
        static_fields: Mapping[str, Any],
        privacy: Privacy,
        scrub: bool,
        max_field_length: int,
    ) -> None:
        self.service_name = service_name
        self.static_fields = dict(static_fields)
        self.privacy = privacy
        self.scrub = scrub
        self.max = max_field_length

    def clean(self, text: str, privacy: Privacy) -> str:
        text = privacy.scrub_text(text) if self.scrub else _SURROGATE.sub("\ufffd", text)
        if len(text) > self.max:
            text = f"{text[: self.max]}...[{len(text) - self.max} more chars]"
        return text

    def bound(self, value: Any, depth: int = 0) -> Any:
        """``value`` made JSON-safe: bounded strings, no surrogates, plain containers."""
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            value = _SURROGATE.sub("\ufffd", value)
            return value if len(value) <= self.max else f"{value[: self.max]}...[cut]"
        if depth > 32:
            return "[depth limit]"
        if isinstance(value, Mapping):
            return {_safe_str(k): self.bound(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.bound(v, depth + 1) for v in value]
        return self.bound(_safe_str(value), depth + 1)

    def build(
        self, record: logging.LogRecord, stack: str | None = None
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(context fields, event fields, extras) of ``record``."""
        connection = _connection_of(record)
        privacy = connection.monitor.privacy if connection is not None else self.privacy
        try:
            message = record.getMessage()
        except Exception:
            message = f"{_safe_str(record.msg)} [bad log arguments]"
        fields: dict[str, Any] = {
            "timestamp": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": self.clean(message, privacy),
            "service": self.service_name,
            **self.static_fields,
        }
        if connection is not None:
            fields["connection_id"] = connection.id
            fields["route"] = connection.route
            client = connection.client
            if client.ip is not None:
                fields["client_ip"] = client.ip
            if client.user is not None:
                fields["user_id"] = client.user
        trace_id, span_id = _span_ids()
        if trace_id is not None:
            fields["trace_id"] = trace_id
            fields["span_id"] = span_id
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            fields["error_type"] = type(exc).__name__
            fields["error_message"] = self.clean(_safe_str(exc), privacy)
        if stack is None and record.exc_info:
            stack = logging.Formatter().formatException(record.exc_info)
        if stack is None and record.exc_text:
            stack = record.exc_text
        if stack:
            fields["stack_trace"] = self.clean(stack, privacy)
        # The lifecycle sink's fields are built from privacy-safe sources: no scrubbing.
        event = getattr(record, "ws", None)
        event = self.bound(event) if isinstance(event, Mapping) else {}
        extras = {k: v for k, v in record.__dict__.items() if k not in _RESERVED and k[0] != "_"}
        if extras:
            extras = self.bound(privacy.scrub(extras) if self.scrub else extras)
        return fields, event, extras


def _fallback_line(record: logging.LogRecord, exc: BaseException) -> str:
    try:
        stamp = _utc(record.created)
    except (ValueError, OverflowError, OSError):
        stamp = _utc(time.time())
    return json.dumps(
        {
            "timestamp": stamp,
            "level": record.levelname,
            "logger": _safe_str(record.name),
            "message": f"[log record could not be formatted: {type(exc).__name__}]",
        }
    )


def _json_formatter_class() -> Callable[[_Fields], logging.Formatter]:
    try:
        from pythonjsonlogger.json import JsonFormatter
    except ImportError:
        raise ImportError(
            "fmt='json' needs python-json-logger: pip install 'ws-monitoring[logging]' "
            "(or use fmt='ecs', which has no dependency)"
        ) from None

    class WsJsonFormatter(JsonFormatter):
        """python-json-logger with the canonical fields, scrubbed extras and ms UTC time."""

        def __init__(self, fields: _Fields) -> None:
            super().__init__(json_ensure_ascii=True, json_default=_safe_str)
            self.fields = fields

        def add_fields(
            self,
            log_data: dict[str, Any],
            record: logging.LogRecord,
            message_dict: dict[str, Any],
        ) -> None:
            stack = message_dict.pop("exc_info", None)
            message_dict.pop("stack_info", None)
            context, event, extras = self.fields.build(record, stack)
            log_data.update(context)
            log_data.update(event)
            for key, value in extras.items():
                log_data.setdefault(key, value)
            if message_dict:
                scrubbed = self.fields.privacy.scrub(message_dict) if self.fields.scrub else {}
                for key, value in self.fields.bound(scrubbed or message_dict).items():
                    log_data.setdefault(key, value)

        def format(self, record: logging.LogRecord) -> str:
            try:
                record.getMessage()
            except Exception:
                # python-json-logger would fail on it: format a copy with a safe message.
                record = copy.copy(record)
                record.msg, record.args = f"{_safe_str(record.msg)} [bad log arguments]", None
            try:
                return str(super().format(record))
            except Exception as exc:
                return _fallback_line(record, exc)

    return WsJsonFormatter


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``a.b.c``; a clash goes under ``labels``."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            tree.setdefault("labels", {})[dotted.replace(".", "_")] = _safe_str(value)
            return
        node = child
    if isinstance(node.get(parts[-1]), dict):
        tree.setdefault("labels", {})[dotted.replace(".", "_")] = _safe_str(value)
        return
    node[parts[-1]] = value


class EcsFormatter(logging.Formatter):
    """Elastic Common Schema JSON lines (see the module docstring)."""

    def __init__(self, fields: _Fields) -> None:
        super().__init__()
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        try:
            return json.dumps(self.document(record), ensure_ascii=True, default=_safe_str)
        except Exception as exc:
            return _fallback_line(record, exc)

    def document(self, record: logging.LogRecord) -> dict[str, Any]:
        context, event, extras = self.fields.build(record)
        doc: dict[str, Any] = {
            "@timestamp": context.pop("timestamp"),
            "log": {
                "level": context.pop("level").lower(),
                "logger": context.pop("logger"),
                "origin": {
                    "file": {"name": record.filename, "line": record.lineno},
                    "function": record.funcName,
                },
            },
            "message": context.pop("message"),
            "ecs": {"version": ECS_VERSION},
            "service": {"name": context.pop("service")},
            "process": {"pid": record.process, "thread": {"name": record.threadName}},
        }
        client_ip = context.pop("client_ip", None)
        if client_ip is not None:
            doc["client"] = {"address": client_ip}
            if ":" in client_ip or "." in client_ip:
                doc["client"]["ip"] = client_ip
        for key, value in context.items():
            _put(doc, _ECS_CONTEXT.get(key, key), value)
        for key, value in event.items():
            if key == "duration_s":
                _put(doc, "event.duration", round(value * 1e9))
            elif key == "event":
                _put(doc, "event.action", value)
                _put(doc, "event.dataset", "ws_monitoring")
            else:
                _put(doc, f"websocket.{key}", value)
        for key, value in extras.items():
            _put(doc, key, value)
        return doc


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER MESSAGE key=value...`` then the stack trace, for terminals."""

    def __init__(self, fields: _Fields) -> None:
        super().__init__()
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        try:
            context, event, extras = self.fields.build(record)
        except Exception as exc:
            return _fallback_line(record, exc)
        stack = context.pop("stack_trace", None)
        head = " ".join(
            (
                context.pop("timestamp"),
                f"{context.pop('level'):<8}",
                context.pop("logger"),
                context.pop("message").translate(_CONTROL),
            )
        )
        context.pop("service")
        pairs = " ".join(
            f"{k}={_text_value(v)}" for k, v in (*context.items(), *event.items(), *extras.items())
        )
        line = f"{head} {pairs}" if pairs else head
        return f"{line}\n{stack}" if stack else line


def _text_value(value: Any) -> str:
    text = _safe_str(value)
    if not text or any(c in text for c in ' ="'):
        return json.dumps(text, ensure_ascii=False).translate(_CONTROL)
    return text.translate(_CONTROL)


class _JournalFormatter(logging.Formatter):
    """A consent journal line: the entry built by the privacy layer, plus the service."""

    def __init__(self, service_name: str) -> None:
        super().__init__()
        self.service_name = service_name

    def format(self, record: logging.LogRecord) -> str:
        entry = getattr(record, "consent_entry", None)
        if not isinstance(entry, Mapping):
            entry = {"time": _utc(record.created), "message": _safe_str(record.msg)}
        return json.dumps(
            {**entry, "service": self.service_name}, ensure_ascii=True, default=_safe_str
        )


class _Router(logging.Formatter):
    """Formats journal records as journal lines and everything else as log lines."""

    def __init__(self, main: logging.Formatter, journal: logging.Formatter | None) -> None:
        super().__init__()
        self.main = main
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        if self.journal is not None and record.name == JOURNAL_LOGGER:
            return self.journal.format(record)
        return self.main.format(record)


class _Passthrough(logging.Formatter):
    """The line formatted before queuing (``QueueHandler.prepare`` stored it in ``msg``)."""

    def format(self, record: logging.LogRecord) -> str:
        return str(record.msg)


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Never blocks: when the queue is full the record is dropped and counted."""

    def __init__(self, q: queue.Queue[Any]) -> None:
        super().__init__(q)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _Listener(logging.handlers.QueueListener):
    def enqueue_sentinel(self) -> None:
        # The queue may be full: wait for room rather than fail to stop.
        q: queue.Queue[Any] = self.queue  # type: ignore[assignment]
        q.put(None, timeout=10.0)


def _only(name: str, keep: bool) -> logging.Filter:
    class RouteFilter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return (record.name == name) == keep

    return RouteFilter()


class _WebsocketsLifecycleFilter(logging.Filter):
    """Drops websockets' lifecycle lines for connections our lifecycle logs describe."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in _WEBSOCKETS_LIFECYCLE:
            return True
        websocket = getattr(record, "websocket", None)
        if websocket is None:
            return True
        try:
            return not _logs_lifecycle(websocket, record.msg in _WEBSOCKETS_HANDSHAKE)
        except ReferenceError:
            return True


def _logs_lifecycle(websocket: Any, handshake_line: bool) -> bool:
    from .asyncio_server import _HANDSHAKE_ATTR, RECORD_ATTR

    record = getattr(websocket, RECORD_ATTR, None)
    if record is not None:
        return bool(record.monitor.config.log_lifecycle)
    handshake = getattr(websocket, _HANDSHAKE_ATTR, None)
    if handshake is None:
        # Not served by ws_monitoring.serve: no handshake logs of ours, so keep
        # websockets' handshake lines; the others come from an instrumented handler or not.
        if handshake_line:
            return False
        monitor = monitor_of(getattr(websocket, "server", None))
        return bool(monitor is not None and monitor.config.log_lifecycle)
    monitor = getattr(handshake, "monitor", None) or monitor_of(getattr(websocket, "server", None))
    # Served by ws_monitoring.serve: lifecycle logs are on unless the monitor says not.
    return monitor is None or bool(monitor.config.log_lifecycle)


def _level(value: int | str, name: str) -> int:
    if isinstance(value, int):
        return value
    level = logging.getLevelName(str(value).upper())
    if not isinstance(level, int):
        raise ValueError(f"{name}={value!r}: not a logging level")
    return level


_OWNER = "_ws_monitoring_setup"


class LoggingSetup:
    """What one :func:`setup_logging` call installed; :meth:`close` removes it."""

    def __init__(
        self,
        *,
        handlers: list[logging.Handler],
        attached: list[tuple[logging.Logger, logging.Handler]],
        listener: _Listener | None,
        queue_handler: _DroppingQueueHandler | None,
        ws_filter: logging.Filter | None,
        propagate: dict[str, bool],
        levels: dict[str, int],
    ) -> None:
        #: The output handlers (stream, file, journal file).
        self.handlers = tuple(handlers)
        self._attached = attached
        self._listener = listener
        self._queue_handler = queue_handler
        self._ws_filter = ws_filter
        self._propagate = propagate
        self._levels = levels
        self._closed = False
        self._lock = threading.Lock()
        for _, handler in attached:
            setattr(handler, _OWNER, self)

    @property
    def dropped(self) -> int:
        """Records dropped because the background queue was full."""
        return 0 if self._queue_handler is None else self._queue_handler.dropped

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record queued so far is written; False on timeout."""
        if self._listener is not None:
            q = self._listener.queue
            deadline = time.monotonic() + timeout
            while getattr(q, "unfinished_tasks", 0):
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.001)
        for handler in self.handlers:
            handler.flush()
        return True

    def close(self) -> None:
        """Write what is queued, detach and close every handler, and restore the levels
        and ``propagate`` flags of the loggers it configured. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        for logger, handler in self._attached:
            logger.removeHandler(handler)
        if self._ws_filter is not None:
            logging.getLogger("websockets.server").removeFilter(self._ws_filter)
        for name, propagate in self._propagate.items():
            logging.getLogger(name).propagate = propagate
        for name, level in self._levels.items():
            logging.getLogger(name or None).setLevel(level)
        if self._listener is not None:
            self._listener.stop()
        for handler in self.handlers:
            handler.close()


def _previous() -> set[LoggingSetup]:
    owners = set()
    for name in ("", "ws_monitoring", "websockets", JOURNAL_LOGGER):
        for handler in logging.getLogger(name or None).handlers:
            owner = getattr(handler, _OWNER, None)
            if isinstance(owner, LoggingSetup):
                owners.add(owner)
    return owners


def setup_logging(
    level: int | str = "INFO",
    *,
    fmt: str = "json",
    stream: IO[str] | None = None,
    filename: str | os.PathLike[str] | None = None,
    max_bytes: int = 10 * 1024 * 1024,
    backup_count: int = 5,
    when: str | None = None,
    interval: int = 1,
    service_name: str | None = None,
    static_fields: Mapping[str, Any] | None = None,
    consent_journal: str | os.PathLike[str] | None = None,
    root: bool = False,
    websockets_level: int | str | None = None,
    suppress_websockets_lifecycle: bool = True,
    scrub: bool = True,
    privacy: Privacy | None = None,
    max_field_length: int = 32_768,
    background: bool = True,
    queue_size: int = 10_000,
) -> LoggingSetup:
    """Configure the ``ws_monitoring`` and ``websockets`` loggers (see the module doc).

    Args:
        level: level of the ``ws_monitoring`` loggers (DEBUG enables per-message logs
            for servers built afterwards).
        fmt: ``"json"``, ``"ecs"`` or ``"text"``.
        stream: where to write (default ``sys.stderr`` unless ``filename`` is given).
        filename: a log file, rotated when it would exceed ``max_bytes`` bytes, keeping
            ``backup_count`` old files; with ``when`` (``"midnight"``, ``"H"``,
            ``"W0"``...: :class:`logging.handlers.TimedRotatingFileHandler`, UTC) it is
            rotated by time every ``interval`` units instead.
        service_name: ``service`` field; default ``OTEL_SERVICE_NAME``, else
            ``unknown_service:python`` (OpenTelemetry's default, so logs and traces match).
        static_fields: fields added to every line (``{"deployment.environment": "prod"}``).
        consent_journal: file receiving the consent journal as JSON lines (appended,
            never rotated); its records then leave the main log.
        root: also send the application's own records (root logger) through this
            format; the root logger's level becomes ``level``.
        websockets_level: level of the ``websockets`` loggers; default ``level`` but at
            least INFO (its DEBUG lines contain payloads).
        suppress_websockets_lifecycle: drop websockets' lines the lifecycle logs replace.
        scrub: pass messages, exception text and extras through the privacy layer.
        privacy: the :class:`Privacy` scrubbing records made outside any connection
            (default: one built from the environment).
        max_field_length: longest string field, in characters.
        background: write from a background thread through a bounded queue.
        queue_size: capacity of that queue, in records.

    Returns:
        A :class:`LoggingSetup` (``flush()``, ``close()``, ``dropped``, ``handlers``).

    Raises:
        ValueError: an unknown ``fmt`` or level, or a non-positive size.
        ImportError: ``fmt="json"`` without python-json-logger installed.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: expected one of {', '.join(FORMATS)}")
    main_level = _level(level, "level")
    ws_level = (
        max(main_level, logging.INFO)
        if websockets_level is None
        else _level(websockets_level, "websockets_level")
    )
    if max_bytes < 0 or backup_count < 0 or interval < 1 or queue_size < 1:
        raise ValueError("max_bytes and backup_count must be >= 0, interval and queue_size >= 1")
    if max_field_length < 16:
        raise ValueError("max_field_length must be at least 16 characters")
    fields = _Fields(
        service_name or os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE,
        static_fields or {},
        privacy if privacy is not None else Privacy(Config.from_options()),
        scrub,
        max_field_length,
    )
    formatter: logging.Formatter
    if fmt == "json":
        formatter = _json_formatter_class()(fields)
    elif fmt == "ecs":
        formatter = EcsFormatter(fields)
    else:
        formatter = TextFormatter(fields)
    journal_formatter = _JournalFormatter(fields.service_name)

    for owner in _previous():
        owner.close()

    outputs: list[logging.Handler] = []
    if stream is not None or filename is None:
        outputs.append(logging.StreamHandler(stream if stream is not None else sys.stderr))
    if filename is not None:
        if when is not None:
            outputs.append(
                logging.handlers.TimedRotatingFileHandler(
                    filename, when, interval, backup_count, encoding="utf-8", utc=True
                )
            )
        else:
            outputs.append(
                logging.handlers.RotatingFileHandler(
                    filename, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8"
                )
            )
    journal = (
        logging.FileHandler(consent_journal, encoding="utf-8")
        if consent_journal is not None
        else None
    )

    listener = None
    queue_handler = None
    main_entry: list[logging.Handler]
    journal_entry: list[logging.Handler] = []
    if background:
        queue_handler = _DroppingQueueHandler(queue.Queue(queue_size))
        queue_handler.setFormatter(_Router(formatter, journal_formatter if journal else None))
        for output in outputs:
            output.setFormatter(_Passthrough())
            if journal is not None:
                output.addFilter(_only(JOURNAL_LOGGER, keep=False))
        targets = list(outputs)
        if journal is not None:
            journal.setFormatter(_Passthrough())
            journal.addFilter(_only(JOURNAL_LOGGER, keep=True))
            targets.append(journal)
            journal_entry = [queue_handler]
        listener = _Listener(queue_handler.queue, *targets)
        listener.start()
        main_entry = [queue_handler]
    else:
        for output in outputs:
            output.setFormatter(formatter)
        if journal is not None:
            journal.setFormatter(journal_formatter)
            journal_entry = [journal]
        main_entry = list(outputs)

    attached: list[tuple[logging.Logger, logging.Handler]] = []
    propagate: dict[str, bool] = {}
    levels = {
        name: logging.getLogger(name or None).level
        for name in ("ws_monitoring", "websockets", JOURNAL_LOGGER, *([""] if root else []))
    }
    targets_loggers = [logging.getLogger()] if root else [
        logging.getLogger("ws_monitoring"),
        logging.getLogger("websockets"),
    ]  # fmt: skip
    for logger in targets_loggers:
        for handler in main_entry:
            logger.addHandler(handler)
            attached.append((logger, handler))
    for name in ("ws_monitoring", "websockets"):
        logger = logging.getLogger(name)
        propagate[name] = logger.propagate
        logger.propagate = root
    logging.getLogger("ws_monitoring").setLevel(main_level)
    logging.getLogger("websockets").setLevel(ws_level)
    if root:
        logging.getLogger().setLevel(main_level)
    if journal is not None:
        journal_logger = logging.getLogger(JOURNAL_LOGGER)
        propagate[JOURNAL_LOGGER] = journal_logger.propagate
        journal_logger.propagate = False
        journal_logger.setLevel(logging.INFO)
        for handler in journal_entry:
            journal_logger.addHandler(handler)
            attached.append((journal_logger, handler))

    ws_filter = None
    if suppress_websockets_lifecycle:
        ws_filter = _WebsocketsLifecycleFilter()
        logging.getLogger("websockets.server").addFilter(ws_filter)

    setup = LoggingSetup(
        handlers=[*outputs, *([journal] if journal is not None else [])],
        attached=attached,
        listener=listener,
        queue_handler=queue_handler,
        ws_filter=ws_filter,
        propagate=propagate,
        levels=levels,
    )
    atexit.register(setup.close)
    return setup
