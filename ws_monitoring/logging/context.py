"""The connection's fields on any log record: for the application's own formatter or structlog.

Inside a handler served or wrapped by ws-monitoring, every record can carry these flat,
privacy-safe fields (:data:`CONNECTION_FIELDS`):

``connection_id``
    websockets' connection id (a UUID string).
``route``
    The route template the path matched (``/rooms/{room}``), never the raw path.
``tenant``
    The bounded ``tenant`` label of the connection (with ``tenant=``): the metrics'
    value, never the raw name; absent without ``tenant=``.
``client_ip``
    The client's IP, truncated (or an HMAC pseudonym) unless the client consented to
    ``"ip"``; absent when unknown.
``user_id``
    A pseudonym of the user id unless the client consented to ``"user"``; absent when
    no user is known.
``trace_id``, ``span_id``
    The active OpenTelemetry span (32 and 16 lowercase hex digits); absent without one.

ws-monitoring's own records (the lifecycle and per-message logs of
:mod:`ws_monitoring.logging.lifecycle`) carry them too, set when the record is made, and
their event as more flat attributes (:data:`EVENT_FIELDS`): ``ws_event``
(``connection_opened``, ``connection_closed``, ``handler_crashed``,
``handshake_rejected``...), ``duration_s``, ``close_code``, ``error_type``,
``messages_in``... No attribute holds an object: a foreign formatter renders them as
they are. (``fmt="json"`` writes ``ws_event`` as ``event``; it is named ``ws_event`` on
the record because ``event`` is structlog's message key.)

Two integration points put the fields on the application's records:

* :class:`ConnectionContextFilter`, a :class:`logging.Filter` to add to the application's
  handlers (``handler.addFilter(ConnectionContextFilter())``);
* :func:`add_connection_context`, a structlog processor for structlog's chain and for
  ``ProcessorFormatter(foreign_pre_chain=...)``.

Both read the connection whose handler is running (a context variable set when the
connection opens and reset when it closes, by the lifecycle logs: ``log_lifecycle=True``,
the default) and the current span, so they must run where the record is made: on the
handler that runs in the logging call's thread (a ``QueueHandler``, not the handlers of
its ``QueueListener``). Fields already on a record are kept.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from ws_monitoring.core import record_of

if TYPE_CHECKING:
    from ws_monitoring.core import ConnectionRecord

__all__ = [
    "CONNECTION_FIELDS",
    "EVENT_FIELDS",
    "ConnectionContextFilter",
    "add_connection_context",
    "connection_fields",
    "current_connection",
]

#: The fields the filter and the processor add (see the module docstring).
CONNECTION_FIELDS = (
    "connection_id", "route", "tenant", "client_ip", "user_id", "trace_id", "span_id",
)  # fmt: skip

#: Fields of ws-monitoring's own records besides :data:`CONNECTION_FIELDS`.
EVENT_FIELDS = (
    "ws_event",
    "duration_s",
    "status",
    "failure",
    "subprotocol",
    "close_code",
    "error_type",
    "messages_in",
    "messages_out",
    "bytes_in",
    "bytes_out",
    "binary",
    "size",
    "payload",
    "payload_base64",
    "payload_truncated",
)

#: The connection whose handler is running in this task/thread (set by the lifecycle
#: sink), so that any record logged inside a handler carries its id and route.
current_connection: contextvars.ContextVar[ConnectionRecord | None] = contextvars.ContextVar(
    "ws_monitoring_connection", default=None
)

_CONNECTION_GROUP = ("connection_id", "route")


def connection_fields(connection: ConnectionRecord) -> dict[str, Any]:
    """The privacy-safe fields of ``connection``: id, route, and the client's view."""
    fields: dict[str, Any] = {"connection_id": connection.id, "route": connection.route}
    if connection.tenant:
        fields["tenant"] = connection.tenant
    client = connection.client
    if client.ip is not None:
        fields["client_ip"] = client.ip
    if client.user is not None:
        fields["user_id"] = client.user
    return fields


def span_fields() -> dict[str, str]:
    """``trace_id`` and ``span_id`` of the current span; empty without a valid one."""
    # Only look if someone imported OpenTelemetry: no import means no active span.
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return {}
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


#: A record :func:`capture_context` prepared, for another thread to format.
DEFERRED = "_ws_deferred"
#: Where :func:`capture_context` keeps the connection a record was logged for.
_CONNECTION_ATTR = "_ws_connection"


def capture_context(record: logging.LogRecord) -> None:
    """Put on ``record`` what only the thread that logged it knows, for another to format.

    The fields :class:`ConnectionContextFilter` would add (the current connection's and
    span's: context variables), the connection itself (its privacy settings), and the
    message with its arguments merged (they may change once the call returns).
    """
    attributes = record.__dict__
    connection = connection_of(record)
    for name, value in missing_fields(attributes, connection).items():
        attributes.setdefault(name, value)
    attributes[_CONNECTION_ATTR] = connection
    try:
        message = record.getMessage()
    except Exception:
        return  # left as it is: the formatter writes its "bad log arguments" line
    record.msg, record.args = message, None


def connection_of(record: logging.LogRecord | None) -> ConnectionRecord | None:
    """The connection ``record`` was logged for: the current one, else websockets'."""
    if record is not None and _CONNECTION_ATTR in record.__dict__:
        captured: ConnectionRecord | None = record.__dict__[_CONNECTION_ATTR]
        return captured
    connection = current_connection.get()
    if connection is not None or record is None:
        return connection
    websocket = getattr(record, "websocket", None)
    if websocket is None:
        return None
    try:
        return record_of(websocket)
    except ReferenceError:
        return None


def missing_fields(
    present: Mapping[str, Any], connection: ConnectionRecord | None
) -> dict[str, Any]:
    """The fields of :data:`CONNECTION_FIELDS` that ``present`` lacks.

    The connection's as a group (none when ``present`` names its id or route: they
    describe another connection, e.g. the recipient of a broadcast), the span's unless
    ``present`` has a ``trace_id``.
    """
    fields: dict[str, Any] = {}
    if connection is not None and not any(name in present for name in _CONNECTION_GROUP):
        fields.update(connection_fields(connection))
    if "trace_id" not in present:
        fields.update(span_fields())
    return fields


class ConnectionContextFilter(logging.Filter):
    """Adds :data:`CONNECTION_FIELDS` to every record logged inside a handler.

    Add it to a handler (``handler.addFilter(ConnectionContextFilter())``): a logger's
    filters see only the records logged on that very logger, a handler's see every
    record it writes. It never drops a record and never replaces an attribute the
    record already has. Outside any connection it adds nothing (for ``%``-style format
    strings, give the formatter ``defaults=dict.fromkeys(CONNECTION_FIELDS, "-")``).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        attributes = record.__dict__
        for name, value in missing_fields(attributes, connection_of(record)).items():
            attributes.setdefault(name, value)
        return True


def add_connection_context(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: adds :data:`CONNECTION_FIELDS` inside a handler.

    Put it in structlog's processor chain (after ``merge_contextvars``) and, for records
    of the standard library (ws-monitoring's own, websockets'), in
    ``ProcessorFormatter(foreign_pre_chain=...)``: for those it also copies the fields
    and event attributes ws-monitoring put on the record (:data:`EVENT_FIELDS`). Keys
    already in ``event_dict`` are kept.
    """
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord) and not event_dict.get("_from_structlog"):
        attributes = record.__dict__
        for name in (*CONNECTION_FIELDS, *EVENT_FIELDS):
            if name in attributes:
                event_dict.setdefault(name, attributes[name])
    else:
        record = None
    for name, value in missing_fields(event_dict, connection_of(record)).items():
        event_dict.setdefault(name, value)
    return event_dict
