"""Lifecycle logs: one record per connection event, on the ``ws_monitoring`` loggers.

``ws_monitoring.lifecycle`` (INFO unless noted), each with a ``ws_event`` attribute
(written ``event`` by ``setup_logging(fmt="json")``, ``event.action`` in ECS):

* ``handshake_rejected``: ``status``, ``route``, ``duration_s``; ``handshake_failed``
  (``failure``: ``invalid_request``, ``timeout``, ``connection_lost``...). Health
  checks are not logged.
* ``connection_opened``: ``subprotocol``.
* ``handler_crashed`` (ERROR): ``error_type`` and the stack trace.
* ``connection_closed``: ``duration_s``, ``close_code``, ``error_type`` (``None`` when
  clean), ``messages_in``/``messages_out``, ``bytes_in``/``bytes_out`` (payload bytes).

``ws_monitoring.messages`` (DEBUG): ``message_received`` (``binary``, ``size``),
``message_handled`` (``duration_s``, ``error_type``), ``message_sent`` (``binary``,
``size``). No payload, except with ``config.log_payloads`` (max bytes) for connections
whose client consented to ``"payload"``: then ``payload`` (text, cut to that many
UTF-8 bytes) or ``payload_base64`` (binary), and ``payload_truncated``.

Every field is a flat attribute of the record holding a plain value (no object), so
the application's own formatter renders them as they are: the connection's
``connection_id``, ``route``, ``client_ip`` and ``user_id`` (privacy-safe, from
``record.client``; see :mod:`ws_monitoring.logging.context`), then the event's.

The per-message sink exists only when ``ws_monitoring.messages`` is enabled for DEBUG
when the server is built (call :func:`~ws_monitoring.logging.setup.setup_logging`
first): otherwise this sink costs nothing per message. The close reason, raw request
and raw client data are never logged. While a connection is open, its handler's
context knows it (:data:`~ws_monitoring.logging.context.current_connection`), so that
any record logged inside the handler can carry its fields too.
"""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING, Any

from ws_monitoring.config import Config
from ws_monitoring.privacy import PURPOSE_PAYLOAD
from ws_monitoring.typing import Data, Sink

from .context import connection_fields, current_connection

if TYPE_CHECKING:
    from ws_monitoring.core import ConnectionRecord, HandshakeRecord

__all__ = ["LifecycleLogSink", "MessageLogSink", "build_sink"]

_TOKEN = "ws_monitoring.logs"
_INFO = logging.INFO
_DEBUG = logging.DEBUG


class LifecycleLogSink:
    """Logs handshake outcomes and connection open/crash/close; nothing per message."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.logger = logging.getLogger("ws_monitoring.lifecycle")

    def handshake_finished(self, handshake: HandshakeRecord) -> None:
        if handshake.outcome == "accepted" or handshake.health_check:
            return
        if not self.logger.isEnabledFor(_INFO):
            return
        fields: dict[str, Any] = {
            "ws_event": f"handshake_{handshake.outcome}",
            "route": handshake.route,
            "duration_s": handshake.duration,
        }
        if handshake.status is not None:
            fields["status"] = handshake.status
        if handshake.failure is not None:
            fields["failure"] = handshake.failure
        client_ip = _handshake_client_ip(handshake)
        if client_ip is not None:
            fields["client_ip"] = client_ip
        self.logger.info("handshake %s", handshake.outcome, extra=fields)

    def connection_opened(self, connection: ConnectionRecord) -> None:
        # No contextvars.Token kept per connection (memory): the previous value, only
        # when there is one, is what connection_closed restores.
        previous = current_connection.get()
        current_connection.set(connection)
        if previous is not None:
            connection.context[_TOKEN] = previous
        if self.logger.isEnabledFor(_INFO):
            self.logger.info(
                "connection opened",
                extra={
                    **connection_fields(connection),
                    "ws_event": "connection_opened",
                    "subprotocol": connection.subprotocol,
                },
            )

    def handler_failed(self, connection: ConnectionRecord, exc: BaseException) -> None:
        self.logger.error(
            "handler crashed",
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={**connection_fields(connection), "ws_event": "handler_crashed"},
        )

    def connection_closed(self, connection: ConnectionRecord) -> None:
        if self.logger.isEnabledFor(_INFO):
            self.logger.info(
                "connection closed",
                extra={
                    **connection_fields(connection),
                    "ws_event": "connection_closed",
                    "duration_s": connection.age,
                    "close_code": connection.close_code,
                    "error_type": connection.error_type,
                    "messages_in": connection.messages_received,
                    "messages_out": connection.messages_sent,
                    "bytes_in": connection.in_bytes,
                    "bytes_out": connection.out_bytes,
                },
            )
        previous = connection.context.pop(_TOKEN, None)
        # Closed from another context than the one that opened it: that one is left as is.
        if current_connection.get() is connection:
            current_connection.set(previous)

    def shutdown(self, timeout: float) -> None:
        """Nothing to flush: the logging handlers own the output."""


class MessageLogSink(LifecycleLogSink):
    """:class:`LifecycleLogSink` plus DEBUG records per message (and opt-in payloads)."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.messages = logging.getLogger("ws_monitoring.messages")
        self.payload_bytes = config.log_payloads

    def message_started(self, connection: ConnectionRecord, message: Data) -> object:
        if not self.messages.isEnabledFor(_DEBUG):
            return None
        binary = not isinstance(message, str)
        data = message.encode("utf-8", "surrogatepass") if isinstance(message, str) else message
        fields: dict[str, Any] = {
            **connection_fields(connection),
            "ws_event": "message_received",
            "binary": binary,
            "size": len(data),
        }
        limit = self.payload_bytes
        if limit is not None and connection.client.allows(PURPOSE_PAYLOAD):
            cut = data[:limit]
            if binary:
                fields["payload_base64"] = base64.b64encode(cut).decode()
            else:
                fields["payload"] = cut.decode("utf-8", "ignore")
            fields["payload_truncated"] = len(data) > limit
        self.messages.debug("message received", extra=fields)
        return None

    def message_finished(
        self,
        connection: ConnectionRecord,
        token: object,
        duration: float,
        error: BaseException | None,
    ) -> None:
        if self.messages.isEnabledFor(_DEBUG):
            self.messages.debug(
                "message handled",
                extra={
                    **connection_fields(connection),
                    "ws_event": "message_handled",
                    "duration_s": duration,
                    "error_type": None if error is None else type(error).__name__,
                },
            )

    def message_sent(self, connection: ConnectionRecord, binary: bool, size: int) -> None:
        if self.messages.isEnabledFor(_DEBUG):
            self.messages.debug(
                "message sent",
                extra={
                    **connection_fields(connection),
                    "ws_event": "message_sent",
                    "binary": binary,
                    "size": size,
                },
            )


def _handshake_client_ip(handshake: HandshakeRecord) -> str | None:
    if handshake.remote_address is None:
        return None
    privacy = handshake.monitor.privacy
    ip = privacy.client_ip(handshake.remote_address, handshake.request)
    return None if ip is None else str(privacy.anonymize_ip(ip))


def build_sink(config: Config) -> Sink | None:
    """The lifecycle-log sink when ``config.log_lifecycle``; per-message only at DEBUG."""
    if not config.log_lifecycle:
        return None
    if logging.getLogger("ws_monitoring.messages").isEnabledFor(_DEBUG):
        return MessageLogSink(config)
    return LifecycleLogSink(config)
