"""Protocols shared by the core and its sinks.

The core (:mod:`ws_monitoring.core`) turns connection events into records; sinks
(metrics, tracing, logging, alerting) consume them. A sink never calls another sink,
never blocks the caller and never raises into it: whatever I/O it needs happens on a
background worker with a bounded queue.

Calling context: every method is called from the connection's own task (asyncio) or
thread (sync server) — except :meth:`MessageSink.message_sent`, called from whatever
task or thread sends (``websockets.broadcast`` included). Context-local state
(OpenTelemetry context, Sentry scopes) set in ``connection_opened`` or
``message_started`` is therefore visible to the handler code that follows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .core import ConnectionRecord, HandshakeRecord

__all__ = ["NOT_SAMPLED", "Alerter", "Data", "MessageSink", "Sink"]

Data = str | bytes


class _NotSampled:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_SAMPLED"


#: What :meth:`MessageSink.message_started` returns for a message it does not sample:
#: ``message_finished`` is then called only if handling raises, or lasts at least the
#: sink's ``keep_threshold`` (seconds; absent or ``None``: never), with the message
#: itself as the token. A sampling sink costs one call per unsampled message, not two.
NOT_SAMPLED: object = _NotSampled()


@runtime_checkable
class Sink(Protocol):
    """Consumes connection lifecycle events. Called once per event, never per message."""

    def handshake_finished(self, handshake: HandshakeRecord) -> None:
        """An opening handshake ended: accepted, rejected or failed (see ``outcome``)."""

    def connection_opened(self, connection: ConnectionRecord) -> None:
        """The handshake succeeded and the handler is about to start."""

    def handler_failed(self, connection: ConnectionRecord, exc: BaseException) -> None:
        """The handler raised ``exc`` (not a ``ConnectionClosed``); it propagates after this."""

    def connection_closed(self, connection: ConnectionRecord) -> None:
        """The handler returned and the connection is closed; the record is final."""

    def shutdown(self, timeout: float) -> None:
        """Flush what is pending within ``timeout`` seconds and release resources."""


@runtime_checkable
class MessageSink(Sink, Protocol):
    """A sink that also wants per-message events. Only such sinks cost anything per message."""

    def message_started(self, connection: ConnectionRecord, message: Data) -> object:
        """``message`` was just handed to the handler; returns a token for ``message_finished``.

        Or :data:`NOT_SAMPLED`: no ``message_finished`` unless the message turns out
        notable (an error, or slower than the sink's ``keep_threshold``). A sink that
        knows its next ``n`` messages will be NOT_SAMPLED may set
        ``connection.sample_skip = n``: when it is the server's only message sink, the
        core counts them down without calling it; otherwise it is called as usual and
        counts down itself (``sample_skip > 0``: decrement, return NOT_SAMPLED).

        ``message`` is the payload: a sink must not emit it unless the connection's
        consent allows it (``connection.client.allows("payload")``).
        """

    def message_finished(
        self,
        connection: ConnectionRecord,
        token: object,
        duration: float,
        error: BaseException | None,
    ) -> None:
        """The handler asked for the next message, returned or raised ``error``.

        ``duration`` is the handling time in seconds.
        """

    def message_sent(self, connection: ConnectionRecord, binary: bool, size: int) -> None:
        """A complete message of ``size`` payload bytes was written to the connection.

        A sink with an attribute ``wants_sent_messages = False`` is not called at all.
        """


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
