"""Formatters: one record, three shapes (flat JSON, ECS, text), never an invalid line.

The fields of a record (:class:`_Fields`) are built once from the record (the flat
attributes of :mod:`ws_monitoring.logging.context`), the connection it is about
(:data:`~ws_monitoring.logging.context.current_connection`, or the ``websocket``
websockets puts on its own records) and the current span; each format lays them out its
own way. See :mod:`ws_monitoring.logging.setup` for the formats' field lists.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import logging.handlers
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from ws_monitoring.privacy import JOURNAL_LOGGER, Privacy

from .context import CONNECTION_FIELDS, DEFERRED, EVENT_FIELDS, connection_of, missing_fields

__all__ = [
    "DEFAULT_SERVICE",
    "ECS_VERSION",
    "FORMATS",
    "EcsFormatter",
    "TextFormatter",
]

FORMATS = ("json", "ecs", "text")
ECS_VERSION = "8.11.0"
DEFAULT_SERVICE = "unknown_service:python"

_SURROGATE = re.compile("[\ud800-\udfff]")
_RESERVED = (
    frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__)
    | {"message", "asctime", "taskName", "websocket"}
    | frozenset(CONNECTION_FIELDS)
)
_RESERVED_WITH_EVENT = _RESERVED | frozenset(EVENT_FIELDS)
_EVENT_VALUES = EVENT_FIELDS[1:]  # after ws_event
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
    "tenant": "websocket.tenant",
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
        attributes = record.__dict__
        connection = connection_of(record)
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
        # The record's own (ws-monitoring's records, a ConnectionContextFilter), else the
        # current connection's and span's.
        context = missing_fields(attributes, connection)
        for name in CONNECTION_FIELDS:
            value = attributes.get(name, context.get(name))
            if value is not None:
                fields[name] = self.bound(value)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            fields["error_type"] = type(exc).__name__
            # The privacy layer's one rule for exception messages, in every sink.
            if (text := privacy.exception_message(exc)) is not None:
                fields["error_message"] = self.bound(text)
            fields["stack_trace"] = self.bound(privacy.format_exception(exc))
        else:
            if stack is None and record.exc_info:
                stack = logging.Formatter().formatException(record.exc_info)
            if stack is None and record.exc_text:
                stack = record.exc_text
            if stack:
                fields["stack_trace"] = self.clean(stack, privacy)
        # The lifecycle sink's fields are built from privacy-safe sources: no scrubbing.
        event: dict[str, Any] = {}
        reserved = _RESERVED
        if "ws_event" in attributes:
            event["event"] = self.bound(attributes["ws_event"])
            for name in _EVENT_VALUES:
                if name in attributes:
                    event[name] = self.bound(attributes[name])
            reserved = _RESERVED_WITH_EVENT
        extras = {k: v for k, v in attributes.items() if k not in reserved and k[0] != "_"}
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
    """The line formatted before queuing (``QueueHandler.prepare`` stored it in ``msg``),
    or, for a record whose formatting was deferred (one with an exception, see
    :class:`~ws_monitoring.logging.handlers.DroppingQueueHandler`), the line ``real``
    formats now, in the listener's thread."""

    def __init__(self, real: logging.Formatter) -> None:
        super().__init__()
        self.real = real

    def format(self, record: logging.LogRecord) -> str:
        if DEFERRED in record.__dict__:
            return self.real.format(record)
        return str(record.msg)
