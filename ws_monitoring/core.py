"""The sans-I/O core: connection events in, records and sink calls out.

Adapters (:mod:`ws_monitoring.asyncio_server`, :mod:`ws_monitoring.sync_server`) feed a
:class:`Monitor` with events; the monitor keeps per-connection :class:`ConnectionRecord`
objects up to date and calls the sinks. Nothing here does I/O or takes a lock on the
per-message path.

Per-message accounting happens at the frame level, on the websockets sans-I/O protocol
object, so every message is counted however it was sent or received: ``send()``,
fragmented sends, ``websockets.broadcast()``, ``recv()``, ``recv_streaming()`` and
``async for``. Counters are plain attributes and lists on the record: the metrics
collector reads them at scrape time, so the hot path takes no lock. Each slot is
written from one serialized context only (the event loop, or the connection's
``protocol_mutex`` in the threading server), which keeps that safe without the GIL
being held across read-modify-write.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.frames import Frame, Opcode

from .config import Config
from .labels import RouteMapper
from .privacy import Client, Privacy
from .typing import Data, MessageSink, Sink

if TYPE_CHECKING:
    from websockets.http11 import Request, Response
    from websockets.protocol import Protocol

__all__ = ["ConnectionRecord", "HandshakeRecord", "HistogramLayout", "Monitor"]

logger = logging.getLogger("ws_monitoring")

_TEXT, _BINARY, _CONT, _PING, _PONG = (
    Opcode.TEXT,
    Opcode.BINARY,
    Opcode.CONT,
    Opcode.PING,
    Opcode.PONG,
)
_now = time.perf_counter


class HistogramLayout:
    """Offsets of the per-connection histograms inside one flat list of bucket counts.

    One list per connection, allocated on its first message, keeps idle connections
    small. Counts are per bucket (not cumulative); the last bucket of each is +Inf.
    """

    __slots__ = ("duration", "length", "rtt", "size_in", "size_out")

    def __init__(self, config: Config) -> None:
        n_size = len(config.size_buckets) + 1
        self.size_in = 0
        self.size_out = n_size
        self.duration = 2 * n_size
        self.rtt = self.duration + len(config.duration_buckets) + 1
        self.length = self.rtt + len(config.rtt_buckets) + 1


class HandshakeRecord:
    """One opening handshake, accepted or not. Durations in seconds."""

    __slots__ = (
        "context",
        "duration",
        "error",
        "failure",
        "health_check",
        "outcome",
        "path",
        "request",
        "response",
        "route",
        "started_at",
        "started_unix",
        "status",
    )

    def __init__(self, started_at: float, started_unix: float) -> None:
        self.started_at = started_at
        self.started_unix = started_unix
        self.duration = 0.0
        #: ``accepted``, ``rejected`` (an HTTP response other than 101) or ``failed``.
        self.outcome = "failed"
        #: HTTP status sent, or ``None`` when the handshake failed before any response.
        self.status: int | None = None
        #: For failures before a response: ``invalid_request``, ``timeout``, ...
        self.failure: str | None = None
        self.error: BaseException | None = None
        self.request: Request | None = None
        self.response: Response | None = None
        #: Request path without its query string ("" when no request was read).
        self.path = ""
        #: Bounded route label ("" when no request was read).
        self.route = ""
        #: True for requests answered by the health check: not a WebSocket handshake.
        self.health_check = False
        #: Scratch space for sinks, keyed by sink (e.g. the handshake span's context).
        self.context: dict[str, Any] = {}


class ConnectionRecord:
    """Everything the core knows about one open connection.

    Raw client data (``request``, ``remote_address``, ``close_reason``) must not be
    emitted by a sink: ``client`` is the privacy-safe view. Counters are exact for the
    connection's life; sizes are payload bytes (UTF-8 for text, before compression).
    """

    __slots__ = (
        "__weakref__",
        "client",
        "close_code",
        "close_reason",
        "closed_at",
        "connection",
        "context",
        "error",
        "error_type",
        "exemplar_trace_id",
        "exemplars",
        "h",
        "handling_start",
        "handling_sum",
        "handshake",
        "id",
        "in_binary",
        "in_bytes",
        "in_op",
        "in_size",
        "in_text",
        "monitor",
        "opened_at",
        "opened_unix",
        "out_binary",
        "out_bytes",
        "out_op",
        "out_size",
        "out_text",
        "path",
        "ping_data",
        "ping_sent_at",
        "remote_address",
        "request",
        "route",
        "rtt_sum",
        "subprotocol",
        "tokens",
    )

    def __init__(
        self,
        monitor: Monitor,
        connection: Any,
        *,
        id: str,
        path: str,
        route: str,
        request: Request | None,
        remote_address: Any,
        subprotocol: str | None,
        client: Client,
        handshake: HandshakeRecord | None,
    ) -> None:
        self.monitor = monitor
        self.connection = connection
        self.id = id
        self.path = path
        self.route = route
        self.request = request
        self.remote_address = remote_address
        self.subprotocol = subprotocol
        self.client = client
        self.handshake = handshake
        self.opened_at = _now()
        self.opened_unix = time.time()
        self.closed_at = 0.0
        self.in_text = self.in_binary = self.out_text = self.out_binary = 0
        self.in_bytes = self.out_bytes = 0
        self.handling_sum = self.rtt_sum = 0.0
        self.h: list[int] | None = None
        self.in_op: Opcode = _TEXT
        self.in_size = 0
        self.out_op: Opcode = _TEXT
        self.out_size = 0
        self.ping_data: bytes | None = None
        self.ping_sent_at = 0.0
        self.handling_start = 0.0
        self.tokens: list[object] | None = None
        self.exemplar_trace_id: str | None = None
        self.exemplars: dict[int, tuple[str, float, float]] | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.error: BaseException | None = None
        self.error_type: str | None = None
        self.context: dict[str, Any] = {}

    # -- read-only views for sinks ----------------------------------------------------

    @property
    def messages_received(self) -> int:
        return self.in_text + self.in_binary

    @property
    def messages_sent(self) -> int:
        return self.out_text + self.out_binary

    @property
    def age(self) -> float:
        """Seconds since the connection opened (until it closed, once closed)."""
        return (self.closed_at or _now()) - self.opened_at

    # -- events from adapters -----------------------------------------------------------

    def message_handed(self, message: Data) -> None:
        """``recv()`` (or the first fragment of ``recv_streaming()``) returned ``message``."""
        self.handling_start = _now()
        sinks = self.monitor.message_sinks
        if sinks:
            self.tokens = [sink.message_started(self, message) for sink in sinks]

    def message_done(self, error: BaseException | None = None) -> None:
        """The handler asked for the next message, returned or raised: handling ended."""
        start = self.handling_start
        if not start:
            return
        self.handling_start = 0.0
        duration = _now() - start
        monitor = self.monitor
        tokens = self.tokens
        if tokens is not None:
            self.tokens = None
            for sink, token in zip(monitor.message_sinks, tokens, strict=True):
                sink.message_finished(self, token, duration, error)
        h = self.h
        if h is None:
            h = self.h = [0] * monitor.layout.length
        bucket = bisect_left(monitor.duration_bounds, duration)
        h[monitor.layout.duration + bucket] += 1
        self.handling_sum += duration
        trace_id = self.exemplar_trace_id
        if trace_id is not None:
            # Set by a tracing sink for a kept span: the metrics exemplar for this bucket.
            self.exemplar_trace_id = None
            if self.exemplars is None:
                self.exemplars = {}
            self.exemplars[bucket] = (trace_id, duration, time.time())


def _install_frame_hooks(protocol: Protocol, record: ConnectionRecord, monitor: Monitor) -> None:
    """Count every data frame the sans-I/O protocol parses or serializes.

    The hooks shadow ``recv_frame``/``send_frame`` on this protocol instance only and call
    the originals first, so a frame websockets rejects is not counted.
    """
    orig_recv = protocol.recv_frame
    orig_send = protocol.send_frame
    size_bounds = monitor.size_bounds
    length = monitor.layout.length
    off_out = monitor.layout.size_out
    off_rtt = monitor.layout.rtt
    rtt_bounds = monitor.rtt_bounds
    message_sinks = monitor.message_sinks

    def recv_frame(frame: Frame) -> None:
        orig_recv(frame)
        op = frame.opcode
        if op is _TEXT or op is _BINARY:
            if not frame.fin:
                record.in_op = op
                record.in_size = len(frame.data)
                return
            size = len(frame.data)
        elif op is _CONT:
            size = record.in_size + len(frame.data)
            if not frame.fin:
                record.in_size = size
                return
            op = record.in_op
        elif op is _PONG:
            if record.ping_data is not None and frame.data == record.ping_data:
                rtt = _now() - record.ping_sent_at
                record.ping_data = None
                h = record.h
                if h is None:
                    h = record.h = [0] * length
                h[off_rtt + bisect_left(rtt_bounds, rtt)] += 1
                record.rtt_sum += rtt
            return
        else:
            return
        h = record.h
        if h is None:
            h = record.h = [0] * length
        if op is _TEXT:
            record.in_text += 1
        else:
            record.in_binary += 1
        record.in_bytes += size
        h[bisect_left(size_bounds, size)] += 1

    def send_frame(frame: Frame) -> None:
        orig_send(frame)
        op = frame.opcode
        if op is _TEXT or op is _BINARY:
            if not frame.fin:
                record.out_op = op
                record.out_size = len(frame.data)
                return
            size = len(frame.data)
        elif op is _CONT:
            size = record.out_size + len(frame.data)
            if not frame.fin:
                record.out_size = size
                return
            op = record.out_op
        elif op is _PING:
            # Keepalive and user pings: the matching pong gives the round-trip time.
            record.ping_data = bytes(frame.data)
            record.ping_sent_at = _now()
            return
        else:
            return
        h = record.h
        if h is None:
            h = record.h = [0] * length
        binary = op is _BINARY
        if binary:
            record.out_binary += 1
        else:
            record.out_text += 1
        record.out_bytes += size
        h[off_out + bisect_left(size_bounds, size)] += 1
        if message_sinks:
            for sink in message_sinks:
                sink.message_sent(record, binary, size)

    # Instance attributes shadow the class's methods for this protocol only.
    protocol.recv_frame = recv_frame  # type: ignore[method-assign]
    protocol.send_frame = send_frame  # type: ignore[method-assign]


def classify_close(protocol: Protocol) -> str | None:
    """The ``websocket_errors_total`` type for how a connection ended, or ``None`` if clean."""
    exc = protocol.parser_exc
    if exc is not None:
        if isinstance(exc, PayloadTooBig):
            return "message_too_big"
        if isinstance(exc, UnicodeDecodeError):
            return "invalid_payload"
        if isinstance(exc, ProtocolError):
            return "protocol_error"
        if isinstance(exc, EOFError):
            # The TCP connection ended in the middle of a frame.
            return "connection_reset"
        return "internal_error"
    sent = protocol.close_sent
    if sent is not None and sent.code == 1011 and "timeout" in sent.reason:
        return "timeout"
    if protocol.close_rcvd is None:
        return "connection_reset"
    return None


class Monitor:
    """The core for one instrumented server: configuration, route labels, sinks.

    Thread-safe: the threading server calls it from one thread per connection.
    """

    def __init__(
        self,
        config: Config,
        sinks: list[Sink],
        *,
        privacy: Privacy | None = None,
    ) -> None:
        self.config = config
        self.routes = RouteMapper(config)
        self.privacy = privacy if privacy is not None else Privacy(config)
        self.sinks: tuple[Sink, ...] = tuple(sinks)
        self.message_sinks: tuple[MessageSink, ...] = tuple(
            s for s in sinks if isinstance(s, MessageSink)
        )
        self.layout = HistogramLayout(config)
        self.size_bounds = config.size_buckets
        self.duration_bounds = config.duration_buckets
        self.rtt_bounds = config.rtt_buckets
        # Records must stay cheap to track: the connection holds the record, not the reverse.
        self.count_frames = config.metrics or bool(self.message_sinks)

    # -- dispatch ------------------------------------------------------------------------

    def _dispatch(self, method: str, *args: Any) -> None:
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception:
                # A broken sink must never break the connection it observes.
                logger.exception("ws_monitoring sink %s.%s failed", type(sink).__name__, method)

    # -- handshake -------------------------------------------------------------------------

    def handshake_started(self) -> HandshakeRecord:
        """A TCP connection arrived; its opening handshake starts now."""
        return HandshakeRecord(_now(), time.time())

    def handshake_finished(
        self,
        handshake: HandshakeRecord,
        *,
        request: Request | None,
        response: Response | None,
        accepted: bool,
        error: BaseException | None = None,
        failure: str | None = None,
        health_check: bool = False,
    ) -> None:
        """The handshake ended; ``failure`` names why when no response was sent."""
        handshake.duration = _now() - handshake.started_at
        handshake.request = request
        handshake.response = response
        handshake.error = error
        handshake.health_check = health_check
        if request is not None:
            handshake.path = request.path.split("?", 1)[0]
            handshake.route = self.routes(request.path)
        if accepted:
            handshake.outcome = "accepted"
            handshake.status = 101
        elif response is not None and failure is None:
            handshake.outcome = "rejected"
            handshake.status = response.status_code
        else:
            handshake.outcome = "failed"
            handshake.failure = failure or "error"
        self._dispatch("handshake_finished", handshake)

    # -- connection ------------------------------------------------------------------------

    def open(
        self,
        connection: Any,
        *,
        handshake: HandshakeRecord | None = None,
        request: Request | None = None,
    ) -> ConnectionRecord:
        """A connection opened; returns its record, already hooked into the protocol."""
        request = request if request is not None else connection.request
        raw_path = request.path if request is not None else "/"
        record = ConnectionRecord(
            self,
            connection,
            id=str(connection.id),
            path=raw_path.split("?", 1)[0],
            route=handshake.route if handshake and handshake.route else self.routes(raw_path),
            request=request,
            remote_address=connection.remote_address,
            subprotocol=connection.subprotocol,
            client=self.privacy.client(connection.remote_address, request),
            handshake=handshake,
        )
        if self.count_frames:
            _install_frame_hooks(connection.protocol, record, self)
        self._dispatch("connection_opened", record)
        return record

    def failed(self, record: ConnectionRecord, exc: BaseException) -> None:
        """The handler raised ``exc``; called before it propagates."""
        record.message_done(exc)
        record.error = exc
        record.error_type = "handler_exception"
        self._dispatch("handler_failed", record, exc)

    def closed(self, record: ConnectionRecord, protocol: Protocol) -> None:
        """The connection is closed: finalize the record and hand it to the sinks."""
        record.message_done(None)
        record.closed_at = _now()
        rcvd = protocol.close_rcvd
        record.close_code = rcvd.code if rcvd is not None else 1006
        record.close_reason = rcvd.reason if rcvd is not None else ""
        if record.error_type is None:
            record.error_type = classify_close(protocol)
        self._dispatch("connection_closed", record)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Flush every sink within ``timeout`` seconds in total."""
        deadline = _now() + timeout
        for sink in self.sinks:
            try:
                sink.shutdown(max(0.0, deadline - _now()))
            except Exception:
                logger.exception("ws_monitoring sink %s.shutdown failed", type(sink).__name__)


SinkFactory = Callable[[Config], Sink | None]
