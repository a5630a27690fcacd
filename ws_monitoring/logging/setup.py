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
is touched only with ``root=True``; when the application already gave it handlers,
``root=True`` adds none of its own but sends ws-monitoring's and websockets' records
through them, each with a :class:`~ws_monitoring.logging.context.ConnectionContextFilter`
(every line once, in the application's format). ``websockets`` stays at INFO or above unless
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
blocking an event loop. ``background=False`` writes synchronously. An output that
fails to write (a full disk) reports it once on standard error and counts every record
it loses (:mod:`ws_monitoring.logging.handlers`): no traceback per record.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Mapping
from typing import IO, Any

from prometheus_client import CollectorRegistry

from ws_monitoring.config import Config
from ws_monitoring.core import (
    HANDSHAKE_ATTR,
    at_exit,
    forget_at_exit,
    monitor_of,
    record_of,
    shutdown_step,
)
from ws_monitoring.privacy import JOURNAL_LOGGER, Privacy

from .context import ConnectionContextFilter
from .formatters import (
    DEFAULT_SERVICE,
    FORMATS,
    EcsFormatter,
    TextFormatter,
    _Fields,
    _JournalFormatter,
    _json_formatter_class,
    _Passthrough,
    _Router,
)
from .handlers import (
    DroppingQueueHandler,
    FileOutput,
    Listener,
    LoggingCollector,
    RotatingFileOutput,
    StreamOutput,
    TimedRotatingFileOutput,
)

__all__ = ["LoggingSetup", "configured", "setup_logging"]

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
    record = record_of(websocket)
    if record is not None:
        return bool(record.monitor.config.log_lifecycle)
    handshake = getattr(websocket, HANDSHAKE_ATTR, None)
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
        listener: Listener | None,
        queue_handler: DroppingQueueHandler | None,
        ws_filter: logging.Filter | None,
        propagate: dict[str, bool],
        levels: dict[str, int],
        shared: list[tuple[logging.Handler, logging.Filter]] | None = None,
    ) -> None:
        #: The output handlers (stream, file, journal file).
        self.handlers = tuple(handlers)
        #: The application's root handlers that ws-monitoring's records go through
        #: (``root=True`` when the root logger already had handlers); empty otherwise.
        self.shared_handlers = tuple(handler for handler, _ in shared or ())
        self._attached = attached
        self._shared = list(shared or ())
        self._listener = listener
        self._queue_handler = queue_handler
        self._ws_filter = ws_filter
        self._propagate = propagate
        self._levels = levels
        self._closed = False
        self._lock = threading.Lock()
        for _, handler in attached:
            setattr(handler, _OWNER, self)
        for _, context_filter in self._shared:
            setattr(context_filter, _OWNER, self)

    @property
    def dropped(self) -> int:
        """Records dropped because the background queue was full."""
        return 0 if self._queue_handler is None else self._queue_handler.dropped

    @property
    def write_errors(self) -> int:
        """Records dropped because an output failed to write them (a full disk...)."""
        return sum(getattr(handler, "failures", 0) for handler in self.handlers)

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
            # A failing output's records were counted when they failed.
            with contextlib.suppress(OSError, ValueError):
                handler.flush()
        return True

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued, detach and close every handler, and restore the levels
        and ``propagate`` flags of the loggers it configured. Idempotent.

        Writing the queue takes ``timeout`` seconds at most, and never goes past the
        shared shutdown deadline (:func:`ws_monitoring.core.shutdown_step`): at exit,
        this runs by itself, side by side with the other sinks' exit hooks.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        forget_at_exit(self.close)
        for logger, handler in self._attached:
            logger.removeHandler(handler)
        for handler, context_filter in self._shared:
            handler.removeFilter(context_filter)
        if self._ws_filter is not None:
            logging.getLogger("websockets.server").removeFilter(self._ws_filter)
        for name, propagate in self._propagate.items():
            logging.getLogger(name).propagate = propagate
        for name, level in self._levels.items():
            logging.getLogger(name or None).setLevel(level)
        if self._listener is not None:
            with shutdown_step(timeout) as deadline:
                if not self._listener.stop_by(deadline):
                    # Still writing: its handlers stay open for it (the process is ending).
                    return
        for handler in self.handlers:
            handler.close()


def _owner(item: object) -> LoggingSetup | None:
    owner = getattr(item, _OWNER, None)
    return owner if isinstance(owner, LoggingSetup) else None


def _previous() -> set[LoggingSetup]:
    owners = set()
    for name in ("", "ws_monitoring", "websockets", JOURNAL_LOGGER):
        for handler in logging.getLogger(name or None).handlers:
            for item in (handler, *handler.filters):
                owner = _owner(item)
                if owner is not None:
                    owners.add(owner)
    return owners


def configured() -> bool:
    """Whether a :func:`setup_logging` call is in force (not closed since)."""
    return bool(_previous())


def _application_handlers() -> list[logging.Handler]:
    """The root logger's handlers that write somewhere and are not ws-monitoring's."""
    return [
        handler
        for handler in logging.getLogger().handlers
        if _owner(handler) is None and not isinstance(handler, logging.NullHandler)
    ]


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
    registry: CollectorRegistry | None = None,
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
        root: one output for every record, the application's included. When the root
            logger has no handler yet, this call's output goes on it (the root logger's
            level becomes ``level``). When the application already gave it handlers,
            ws-monitoring adds none (that would print every line twice): its records
            and websockets' go through the application's handlers, each given a
            :class:`~ws_monitoring.logging.context.ConnectionContextFilter`, so every
            line is printed once, by the application's formatter, with the connection's
            fields (``fmt`` and the formatting options then do not apply, and the root
            logger's level is left alone). See :attr:`LoggingSetup.shared_handlers`.
        websockets_level: level of the ``websockets`` loggers; default ``level`` but at
            least INFO (its DEBUG lines contain payloads).
        suppress_websockets_lifecycle: drop websockets' lines the lifecycle logs replace.
        scrub: pass messages, exception text and extras through the privacy layer.
        privacy: the :class:`Privacy` scrubbing records made outside any connection
            (default: one built from the environment).
        max_field_length: longest string field, in characters.
        background: write from a background thread through a bounded queue.
        queue_size: capacity of that queue, in records.
        registry: the Prometheus registry counting dropped records
            (``ws_monitoring_log_records_dropped_total{reason}``; default
            prometheus_client's).

    Returns:
        A :class:`LoggingSetup` (``flush()``, ``close()``, ``dropped``, ``handlers``).

    Raises:
        ValueError: an unknown ``fmt`` or level, or a non-positive size; ``root=True``
            with ``stream`` or ``filename`` when the root logger already has the
            application's handlers (a second output would print every line twice).
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
    shared = _application_handlers() if root else []
    if shared and (stream is not None or filename is not None):
        raise ValueError(
            "setup_logging(root=True): the root logger already has the application's "
            f"handlers ({', '.join(map(repr, shared))}); ws-monitoring's records go "
            "through them, and stream= or filename= would print every line twice: drop "
            "them (or remove the root handlers first)"
        )
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

    LoggingCollector.for_registry(registry)
    outputs: list[logging.Handler] = []
    if not shared and (stream is not None or filename is None):
        outputs.append(StreamOutput(stream if stream is not None else sys.stderr))
    if filename is not None:
        if when is not None:
            outputs.append(
                TimedRotatingFileOutput(
                    filename, when, interval, backup_count, encoding="utf-8", utc=True
                )
            )
        else:
            outputs.append(
                RotatingFileOutput(
                    filename, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8"
                )
            )
    journal = FileOutput(consent_journal, encoding="utf-8") if consent_journal is not None else None

    listener = None
    queue_handler = None
    main_entry: list[logging.Handler]
    journal_entry: list[logging.Handler] = []
    if background:
        queue_handler = DroppingQueueHandler(queue.Queue(queue_size))
        router = _Router(formatter, journal_formatter if journal else None)
        queue_handler.setFormatter(router)
        for output in outputs:
            output.setFormatter(_Passthrough(router))
            if journal is not None:
                output.addFilter(_only(JOURNAL_LOGGER, keep=False))
        targets = list(outputs)
        if journal is not None:
            journal.setFormatter(_Passthrough(router))
            journal.addFilter(_only(JOURNAL_LOGGER, keep=True))
            targets.append(journal)
            journal_entry = [queue_handler]
        listener = Listener(queue_handler.queue, *targets)
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
    own_root = root and not shared
    levels = {
        name: logging.getLogger(name or None).level
        for name in ("ws_monitoring", "websockets", JOURNAL_LOGGER, *([""] if own_root else []))
    }
    if shared:
        targets_loggers = []
    elif root:
        targets_loggers = [logging.getLogger()]
    else:
        targets_loggers = [logging.getLogger("ws_monitoring"), logging.getLogger("websockets")]
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
    if own_root:
        logging.getLogger().setLevel(main_level)
    shared_filters: list[tuple[logging.Handler, logging.Filter]] = []
    for handler in shared:
        context_filter = ConnectionContextFilter()
        handler.addFilter(context_filter)
        shared_filters.append((handler, context_filter))
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
        shared=shared_filters,
    )
    at_exit(setup.close)
    return setup
