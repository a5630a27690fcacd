"""The sans-I/O core: connection events in, records and sink calls out.

Adapters (:mod:`ws_monitoring.adapters.asyncio`, :mod:`ws_monitoring.adapters.sync`) feed a
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

import atexit
import contextlib
import functools
import logging
import math
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from .config import Config
from .labels import RouteMapper, TenantMapper
from .privacy import Client, Privacy
from .typing import NOT_SAMPLED, Data, MessageSink, Sink

#: The client view of a record whose handshake has not finished: nothing known.
NO_CLIENT = Client(ip=None, user=None)
#: ``ConnectionRecord._client`` once the view was built once and not kept.
_BUILT_ONCE = object()

if TYPE_CHECKING:
    from websockets.http11 import Request, Response
    from websockets.protocol import Protocol

__all__ = [
    "HANDSHAKE_ATTR",
    "RECORD_ATTR",
    "SHUTDOWN_TIMEOUT",
    "ConnectionRecord",
    "HandshakeRecord",
    "HistogramLayout",
    "Monitor",
    "at_exit",
    "forget_at_exit",
    "monitor_of",
    "record_of",
    "run_until",
    "shutdown_step",
    "shutdown_timeout",
    "sum_counts",
]

#: Attribute under which an adapter keeps a connection's record on the connection object.
RECORD_ATTR = "_ws_monitoring_record"
#: Attribute under which ``serve()``'s connection classes keep the handshake record.
HANDSHAKE_ATTR = "_ws_monitoring_handshake"

logger = logging.getLogger("ws_monitoring")

_TEXT, _BINARY, _CONT, _PING, _PONG, _CLOSE = (
    Opcode.TEXT,
    Opcode.BINARY,
    Opcode.CONT,
    Opcode.PING,
    Opcode.PONG,
    Opcode.CLOSE,
)
_now = time.perf_counter


def _sink_failed(sink: object, method: str) -> None:
    # A broken sink must never break the connection it observes, nor its other sinks.
    logger.exception("ws_monitoring sink %s.%s failed", type(sink).__name__, method)


def _sink_error(sink: object, method: str, exc: BaseException) -> None:
    """``_sink_failed`` for the C dispatch, which hands over the exception it caught."""
    logger.error("ws_monitoring sink %s.%s failed", type(sink).__name__, method, exc_info=exc)


class HistogramLayout:
    """Offsets of the per-connection histograms inside one flat list of bucket counts.

    One list per connection, allocated on its first message, keeps idle connections
    small. Counts are per bucket (not cumulative); the last bucket of each is +Inf.
    """

    __slots__ = (
        "duration",
        "duration_bounds",
        "length",
        "rtt",
        "rtt_bounds",
        "size_bounds",
        "size_in",
        "size_out",
    )

    def __init__(self, config: Config) -> None:
        self.size_bounds = config.size_buckets
        self.duration_bounds = config.duration_buckets
        self.rtt_bounds = config.rtt_buckets
        n_size = len(config.size_buckets) + 1
        self.size_in = 0
        self.size_out = n_size
        self.duration = 2 * n_size
        self.rtt = self.duration + len(config.duration_buckets) + 1
        self.length = self.rtt + len(config.rtt_buckets) + 1


class _Counts:
    """One connection's counters, in Python: the fallback of ``_speedups.Counts``.

    Both implementations have the same contract: counts of whole messages and payload
    bytes, sums in seconds, ``h`` the per-bucket counts laid out by
    :class:`HistogramLayout` (``None`` before the first count; read-only for sinks).
    """

    __slots__ = (
        "_layout",
        "closed_at",
        "exemplar_trace_id",
        "h",
        "handling_start",
        "handling_sum",
        "in_binary",
        "in_bytes",
        "in_op",  # in_op, in_size, out_op, out_size: the Python frame counter's
        "in_size",  # state of a fragmented message.
        "in_text",
        "opened_at",
        "opened_unix",
        "out_binary",
        "out_bytes",
        "out_op",
        "out_size",
        "out_text",
        "ping_sent_at",
        "rtt_sum",
        "sample_skip",
        "token_deferred",
        "tokens",
    )

    def __init__(self, layout: HistogramLayout) -> None:
        self._layout = layout
        self.in_text = self.in_binary = self.out_text = self.out_binary = 0
        self.in_bytes = self.out_bytes = 0
        self.handling_sum = self.rtt_sum = 0.0
        #: ``perf_counter()`` when the handler got its current message; 0.0: none.
        self.handling_start = 0.0
        # ConnectionRecord's timestamps (C doubles in the speedups: no float object each).
        self.opened_at = self.opened_unix = self.closed_at = self.ping_sent_at = 0.0
        self.h: list[int] | None = None
        self.in_op: Opcode = _TEXT
        self.in_size = 0
        self.out_op: Opcode = _TEXT
        self.out_size = 0
        #: What message_started returned: the only sink's token, or a list (one per sink).
        self.tokens: object = None
        #: True when the only sink returned NOT_SAMPLED (``tokens`` is the message).
        self.token_deferred = False
        #: Set by the only message sink: its next so many messages are NOT_SAMPLED,
        #: without a call (the core counts them down).
        self.sample_skip = 0
        #: Set by a tracing sink that kept the current message's span: its exemplar.
        self.exemplar_trace_id: str | None = None

    def add_duration(self, duration: float) -> int:
        """Count one message's handling time (seconds); returns its bucket's index."""
        layout = self._layout
        h = self.h
        if h is None:
            h = self.h = [0] * layout.length
        bounds = layout.duration_bounds
        # Most messages are handled within the first bucket: no search for them.
        bucket = 0 if duration <= bounds[0] else bisect_left(bounds, duration)
        h[layout.duration + bucket] += 1
        self.handling_sum += duration
        return bucket

    def recv_started(self: Any) -> None:
        """The handler asks for its next message: handling of the previous one ends."""
        start = self.handling_start
        if start:
            if not self.monitor.message_sinks:
                # ``message_done()`` when it has nothing but the histogram to do.
                self.handling_start = 0.0
                self.add_duration(_now() - start)
            else:
                self.message_done()

    def recv_done(self: Any, message: Data) -> None:
        """The handler got ``message`` (from ``recv()``, or a first fragment)."""
        if self.monitor.message_sinks:
            self.message_handed(message)
        else:
            # All ``message_handed`` does without message sinks, minus a call.
            self.handling_start = _now()

    async def timed(self, recv: Awaitable[Data]) -> Data:
        """``recv`` (the connection's own ``recv()``), timing how long messages are handled.

        :meth:`recv_started`, then :meth:`recv_done` with what ``recv`` returns. In C,
        the ``recv_started`` part runs when ``timed`` is called, not when awaited.
        """
        self.recv_started()
        message = await recv
        self.recv_done(message)
        return message

    def add_rtt(self, rtt: float) -> None:
        """Count one ping's round-trip time (seconds)."""
        layout = self._layout
        h = self.h
        if h is None:
            h = self.h = [0] * layout.length
        h[layout.rtt + bisect_left(layout.rtt_bounds, rtt)] += 1
        self.rtt_sum += rtt


#: Column sums of records: message and byte counts, handling and RTT sums, histogram.
CountSums = tuple[int, int, int, int, int, int, float, float, "list[int] | None"]


def _sum_counts(records: Sequence[_Counts], length: int) -> CountSums:
    """Column sums of ``records`` (in Python); ``h`` is ``None`` when no record has one."""
    hs = [h for r in records if (h := r.h) is not None]
    return (
        sum([r.in_text for r in records]),
        sum([r.in_binary for r in records]),
        sum([r.out_text for r in records]),
        sum([r.out_binary for r in records]),
        sum([r.in_bytes for r in records]),
        sum([r.out_bytes for r in records]),
        sum([r.handling_sum for r in records]),
        sum([r.rtt_sum for r in records]),
        list(map(sum, zip(*hs, strict=True))) if hs else None,
    )


def _load_speedups() -> Any:
    """``ws_monitoring._speedups``, or None: not compiled, or WS_MONITORING_NO_SPEEDUPS set."""
    if os.environ.get("WS_MONITORING_NO_SPEEDUPS"):
        return None
    try:
        from . import _speedups
    except ImportError:  # not compiled (no C compiler where it was installed)
        if os.environ.get("WS_MONITORING_REQUIRE_SPEEDUPS"):
            raise
        return None
    return _speedups


_speedups = _load_speedups()
#: True when the C frame counter (``ws_monitoring._speedups``) is in use.
SPEEDUPS = _speedups is not None
if TYPE_CHECKING:
    _CountsBase = _Counts
else:
    _CountsBase = _speedups.Counts if SPEEDUPS else _Counts
#: ``sum_counts(records, layout_length)``: the column sums of a scrape, in C when built.
sum_counts: Callable[[Sequence[Any], int], CountSums] = (
    _speedups.sum_counts if SPEEDUPS else _sum_counts
)


class HandshakeRecord:
    """One opening handshake, accepted or not. Durations in seconds."""

    __slots__ = (
        "context",
        "duration",
        "error",
        "failure",
        "health_check",
        "monitor",
        "outcome",
        "path",
        "remote_address",
        "request",
        "response",
        "route",
        "started_at",
        "started_unix",
        "status",
    )

    def __init__(self, monitor: Monitor, started_at: float, started_unix: float) -> None:
        self.monitor = monitor
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
        #: Bounded route label ("" when no request was read; see ``RouteMapper.peek``).
        self.route = ""
        #: The peer's address (raw: only for the privacy layer); None if unknown.
        self.remote_address: Any = None
        #: True for requests answered by the health check: not a WebSocket handshake.
        self.health_check = False
        #: Scratch space for sinks, keyed by sink (e.g. the handshake span's context).
        self.context: dict[str, Any] = {}


class ConnectionRecord(_CountsBase):
    """Everything the core knows about one open connection.

    Raw client data (``request``, ``remote_address``, ``close_reason``) must not be
    emitted by a sink: ``client`` is the privacy-safe view. Counters (``in_text``,
    ``in_binary``, ``out_text``, ``out_binary``, ``in_bytes``, ``out_bytes``,
    ``handling_sum``, ``rtt_sum`` and the histogram buckets ``h``) are exact for the
    connection's life; sizes are payload bytes (UTF-8 for text, before compression).
    With the C speedups, the record itself counts frames (see ``_install_frame_hooks``).
    """

    #: Shown in ``protocol.extensions`` when the record counts frames; never negotiated.
    name = "ws-monitoring-frame-counter"

    __slots__ = (
        "__weakref__",
        "_client",
        "_context",
        "close_code",
        "close_reason",
        "connection",
        "error",
        "error_type",
        "exemplars",
        "final_id",
        "handshake",
        "monitor",
        "path",
        "ping_data",
        "remote_address",
        "request",
        "route",
        "subprotocol",
        "tenant",
        "tracing_state",
    )

    def __init__(self, monitor: Monitor) -> None:
        # Identity fields are filled in by Monitor.open() once the handshake is done;
        # counting may start earlier (see Monitor.prepare()).
        super().__init__(monitor.counts_layout)
        self.monitor = monitor
        #: The server's connection object; None again once closed (see Monitor.closed),
        #: when ``final_id`` keeps its id.
        self.connection: Any = None
        self.final_id = ""
        self.path = ""
        self.route = ""
        #: The bounded ``tenant`` label ("" without ``config.tenant``; see TenantMapper).
        self.tenant = ""
        self.request: Request | None = None
        self.remote_address: Any = None
        self.subprotocol: str | None = None
        self._client: Client | object | None = None
        #: The opening handshake, for sinks' ``connection_opened``; released afterwards
        #: (``None``): an idle connection should not keep its request and response.
        self.handshake: HandshakeRecord | None = None
        self.opened_at = _now()
        self.opened_unix = time.time()
        self.closed_at = 0.0
        self.ping_data: bytes | None = None
        self.ping_sent_at = 0.0
        self.exemplars: dict[int, tuple[str, float, float]] | None = None
        #: What the close was, as websockets handled it: the code of the peer's close
        #: frame when websockets accepted it; else the code the server sent (1002 for an
        #: invalid close code, 1007 for a reason that is not UTF-8, 1009 when it failed
        #: the connection: websockets ignores the peer's answer then); else 1006.
        self.close_code: int | None = None
        self.close_reason = ""
        self.error: BaseException | None = None
        self.error_type: str | None = None
        self._context: dict[str, Any] | None = None
        #: The tracing sink's per-connection state: a slot of its own, because the sink
        #: every message goes through reads it per message, and an entry in ``context``
        #: would cost each connection its dict (182 B with one key).
        self.tracing_state: Any = None

    @property
    def context(self) -> dict[str, Any]:
        """Sinks' per-connection state, by key of their choosing; made on first use."""
        context = self._context
        if context is None:
            context = self._context = {}
        return context

    def __repr__(self) -> str:
        # Also what ``protocol.extensions`` shows with the C counter: no client data.
        return f"<ws_monitoring connection record {self.id or '(opening)'}>"

    # -- read-only views for sinks ----------------------------------------------------

    @property
    def id(self) -> str:
        """The connection's id (websockets' UUID), or "" before the handshake ended."""
        connection = self.connection
        return self.final_id if connection is None else str(connection.id)

    @property
    def client(self) -> Client:
        """The privacy-safe view of the client (see :class:`~ws_monitoring.privacy.Client`).

        Built when read, with the consent known then, and kept from its second read on
        (or once set, by :func:`ws_monitoring.grant`): a server whose sinks never read
        it (metrics only) spends neither the memory nor the consent lookup, and an idle
        connection read once (its "connection opened" log line) keeps nothing.
        """
        cached = self._client
        if isinstance(cached, Client):
            return cached
        connection = self.connection
        if connection is None:
            return NO_CLIENT
        # A log line formatted while this runs (privacy warnings) reads no client data.
        self._client = NO_CLIENT
        try:
            # websockets' basic_auth() sets ``username`` on the connection first.
            client = self.monitor.privacy.client(
                self.remote_address,
                self.request,
                username=getattr(connection, "username", None),
            )
        finally:
            self._client = None
        # Kept from its second use on: an idle connection whose only reader was its
        # "connection opened" log line keeps none (about 200 B with its strings).
        self._client = client if cached is _BUILT_ONCE else _BUILT_ONCE
        return client

    @client.setter
    def client(self, client: Client) -> None:
        self._client = client

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

    # -- rare frames, from either frame counter ------------------------------------------

    def _ping(self, frame: Frame) -> None:
        # Keepalive and user pings: the matching pong gives the round-trip time.
        self.ping_data = bytes(frame.data)
        self.ping_sent_at = _now()

    def _pong(self, frame: Frame) -> None:
        if self.ping_data is not None and frame.data == self.ping_data:
            self.ping_data = None
            self.add_rtt(_now() - self.ping_sent_at)

    def _close_frame(self, frame: Frame) -> None:
        # Nothing to keep: the close is read from the protocol once the connection is
        # closed (Monitor.closed), as websockets handled it. A peer's close frame may
        # still be rejected after this (an invalid code: the server then sends 1002).
        pass

    # -- events from adapters -----------------------------------------------------------

    def message_handed(self, message: Data) -> None:
        """``recv()`` (or the first fragment of ``recv_streaming()``) returned ``message``."""
        self.handling_start = _now()
        monitor = self.monitor
        sink = monitor.message_sink
        if sink is not None:
            # One message sink (the usual case): its token as is, no list per message.
            skip = self.sample_skip
            if skip > 0:
                self.sample_skip = skip - 1
                token = NOT_SAMPLED
            else:
                try:
                    token = sink.message_started(self, message)
                except Exception:
                    _sink_failed(sink, "message_started")
                    token = None
            if token is NOT_SAMPLED:
                self.tokens = message
                self.token_deferred = True
            else:
                self.tokens = token
            return
        sinks = monitor.message_sinks
        if sinks:
            tokens: list[object] = []
            for sink in sinks:
                try:
                    token = sink.message_started(self, message)
                except Exception:
                    _sink_failed(sink, "message_started")
                    token = None
                # Several sinks: each finishes every message (see NOT_SAMPLED).
                tokens.append(message if token is NOT_SAMPLED else token)
            self.tokens = tokens

    def message_done(self, error: BaseException | None = None) -> None:
        """The handler asked for the next message, returned or raised: handling ended."""
        start = self.handling_start
        if not start:
            return
        duration = _now() - start
        self.handling_start = 0.0
        monitor = self.monitor
        tokens = self.tokens
        deferred = self.token_deferred
        self.tokens = None
        self.token_deferred = False
        single = monitor.message_sink
        if single is not None:
            keep = monitor.keep_threshold
            if not deferred or error is not None or (keep is not None and duration >= keep):
                try:
                    single.message_finished(self, tokens, duration, error)
                except Exception:
                    _sink_failed(single, "message_finished")
        elif tokens is not None:
            for sink, token in zip(monitor.message_sinks, cast(list[object], tokens), strict=True):
                try:
                    sink.message_finished(self, token, duration, error)
                except Exception:
                    _sink_failed(sink, "message_finished")
        bucket = self.add_duration(duration)
        if self.exemplar_trace_id is not None:
            self._exemplar(bucket, duration)

    def _exemplar(self, bucket: int, duration: float) -> None:
        # Set by a tracing sink for a kept span: the metrics exemplar for this bucket.
        trace_id = self.exemplar_trace_id
        self.exemplar_trace_id = None
        if trace_id is not None:
            if self.exemplars is None:
                self.exemplars = {}
            self.exemplars[bucket] = (trace_id, duration, time.time())


#: Sizes up to this many bytes find their histogram bucket in a table, not a search.
_SIZE_TABLE_MAX = 65536


@functools.lru_cache(maxsize=8)
def _size_table(bounds: tuple[float, ...]) -> bytes:
    """``table[size] == bisect_left(bounds, size)`` for every integer size in the table.

    One byte per size up to ``_SIZE_TABLE_MAX`` (shared by every connection with these
    bounds): an index costs a third of a binary search on floats. Empty when a bucket
    index would not fit in a byte.
    """
    if len(bounds) > 255:
        return b""
    top = bounds[-1]
    n = _SIZE_TABLE_MAX + 1 if top >= _SIZE_TABLE_MAX else max(0, math.floor(top)) + 2
    table = bytearray(n)
    start = 0
    for index, bound in enumerate(bounds):
        # Integer sizes s with bounds[index - 1] < s <= bound fall in bucket ``index``.
        stop = min(n, math.floor(bound) + 1) if bound >= 0 else 0
        if stop > start:
            table[start:stop] = bytes((index,)) * (stop - start)
            start = stop
    table[start:] = bytes((len(bounds),)) * (n - start)
    return bytes(table)


def _install_frame_hooks(protocol: Protocol, record: ConnectionRecord, monitor: Monitor) -> None:
    """Count every frame the sans-I/O protocol parses or serializes.

    A frame counter joins the protocol's list of negotiated extensions, in first place:
    websockets hands it every frame it parses, after the other extensions decoded it
    (sizes are before compression), and every frame it serializes, before they encode
    it. It passes frames through unchanged, and does not count what websockets then
    rejects (see :func:`_frame_counter_class`).

    Why not shadow ``recv_frame``/``send_frame`` on the instance: on CPython 3.11+,
    websockets' ``ServerProtocol`` keeps its attributes in a compact table shared with
    its class, with room for one more key. Two new keys (or a change of class) turn it
    into a real dict: about 1.5 KiB more per connection, and every attribute access of
    websockets' parser and serializer gets slower (about 0.7 µs per echoed message).
    Replacing the value of ``extensions`` adds no key.

    Before the handshake (:meth:`Monitor.prepare`), the list is not negotiated yet: the
    counter joins it as the handshake negotiates it, before any frame can arrive.
    """
    counter = monitor.frame_counter(record)
    if protocol.state is not State.CONNECTING:
        protocol.extensions = [counter, *protocol.extensions]
        return
    negotiate = protocol.process_extensions  # type: ignore[attr-defined]

    def process_extensions(headers: Any) -> tuple[Any, list[Any]]:
        header, accepted = negotiate(headers)
        return header, [counter, *accepted]

    # The one key the protocol's shared table has room for; used once, by accept().
    protocol.process_extensions = process_extensions  # type: ignore[attr-defined]


def _record_itself(record: ConnectionRecord) -> ConnectionRecord:
    """The C frame counter: the record (a ``_speedups.Counts``) counts its own frames."""
    return record


def _frame_counter_class(monitor: Monitor) -> type[Any]:
    """The pure-Python frame counters of ``monitor`` (without ``_speedups``).

    One per connection, constants shared; ``_speedups.c`` implements the same rules,
    and the suite runs against both. A counter implements websockets' ``Extension``
    interface (``name``, ``decode``, ``encode``). Received frames websockets will
    reject right after ``decode`` are not counted: reserved bits no extension cleared
    (``Frame.check``), a new message inside a fragmented one or a continuation outside
    one (``recv_frame``), oversized or fragmented control frames. Frames that exceed
    ``max_size`` never reach it.
    """
    size_bounds = monitor.layout.size_bounds
    table = _size_table(size_bounds)
    n_table = len(table)
    length = monitor.layout.length
    off_out = monitor.layout.size_out
    on_sent = monitor.on_sent

    class FrameCounter:
        """Counts one connection's frames into its record (a websockets extension)."""

        __slots__ = ("fragmented", "record")

        #: Shown in ``protocol.extensions``; never negotiated with a client.
        name = "ws-monitoring-frame-counter"

        def __init__(self, record: ConnectionRecord) -> None:
            self.record = record
            self.fragmented = False

        def __repr__(self) -> str:
            return "<ws_monitoring frame counter>"

        def decode(self, frame: Frame, *, max_size: int | None = None) -> Frame:
            op = frame.opcode
            if op is _BINARY or op is _TEXT:
                if self.fragmented or frame.rsv1 or frame.rsv2 or frame.rsv3:
                    return frame
                record = self.record
                size = len(frame.data)
                if not frame.fin:
                    self.fragmented = True
                    record.in_op = op
                    record.in_size = size
                    return frame
            elif op is _CONT:
                if not self.fragmented or frame.rsv1 or frame.rsv2 or frame.rsv3:
                    return frame
                record = self.record
                size = record.in_size + len(frame.data)
                if not frame.fin:
                    record.in_size = size
                    return frame
                self.fragmented = False
                op = record.in_op
            elif op is not _PONG and op is not _CLOSE:
                return frame
            elif frame.rsv1 or frame.rsv2 or frame.rsv3 or not frame.fin or len(frame.data) > 125:
                return frame  # a control frame websockets rejects
            elif op is _PONG:
                self.record._pong(frame)
                return frame
            else:
                self.record._close_frame(frame)
                return frame
            h = record.h
            if h is None:
                h = record.h = [0] * length
            if op is _TEXT:
                record.in_text += 1
            else:
                record.in_binary += 1
            record.in_bytes += size
            h[table[size] if size < n_table else bisect_left(size_bounds, size)] += 1
            return frame

        def encode(self, frame: Frame) -> Frame:
            op = frame.opcode
            if op is _BINARY or op is _TEXT:
                record = self.record
                size = len(frame.data)
                if not frame.fin:
                    record.out_op = op
                    record.out_size = size
                    return frame
            elif op is _CONT:
                record = self.record
                size = record.out_size + len(frame.data)
                if not frame.fin:
                    record.out_size = size
                    return frame
                op = record.out_op
            elif op is _PING:
                self.record._ping(frame)
                return frame
            else:
                return frame
            h = record.h
            if h is None:
                h = record.h = [0] * length
            binary = op is _BINARY
            if binary:
                record.out_binary += 1
            else:
                record.out_text += 1
            record.out_bytes += size
            h[off_out + (table[size] if size < n_table else bisect_left(size_bounds, size))] += 1
            if on_sent is not None:
                on_sent(record, binary, size)
            return frame

    return FrameCounter


#: HTTP statuses websockets' parser sends for requests it cannot read, by exception
#: name (recent websockets releases; earlier ones close without an answer).
_PARSER_ANSWERS = {"RequestLineTooLong": 414, "HeaderLineTooLong": 431, "TooManyHeaders": 431}


def _parser_answer(error: BaseException | None) -> int | None:
    """The status websockets answered a request it could not read with, or ``None``."""
    for cls in type(error).__mro__:
        if cls.__module__ == "websockets.exceptions" and cls.__name__ in _PARSER_ANSWERS:
            return _PARSER_ANSWERS[cls.__name__]
    return None


#: Close codes the server sends when it fails a connection because of the peer.
_FAILURE_CODES = {1002: "protocol_error", 1007: "invalid_payload", 1009: "message_too_big"}


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
    if sent is not None and not protocol.close_rcvd_then_sent:
        # The server closed first (a peer's code echoed back says nothing about it):
        # with 1011, or failing the connection because of the peer, which the parser
        # did not see (invalid UTF-8 is found when recv() decodes a message, too many
        # fragments when it assembles one). A handler's crash never gets here: it is
        # counted as handler_exception first.
        if sent.code == 1011:
            return "timeout" if "timeout" in sent.reason else "internal_error"
        return _FAILURE_CODES.get(sent.code)
    # Without a close frame either way, the connection was dropped (or its handler was
    # cancelled while it was still open).
    return None if protocol.close_rcvd is not None else "connection_reset"


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
        #: The tenant label of a request, with ``config.tenant``; else None.
        self.tenants = TenantMapper(config, self.privacy) if config.tenant is not None else None
        self.sinks: tuple[Sink, ...] = tuple(sinks)
        self.message_sinks: tuple[MessageSink, ...] = tuple(
            s for s in sinks if isinstance(s, MessageSink)
        )
        #: The message sink when there is exactly one: dispatched without a loop.
        self.message_sink = self.message_sinks[0] if len(self.message_sinks) == 1 else None
        #: Its ``keep_threshold`` (see NOT_SAMPLED): seconds, or None.
        self.keep_threshold: float | None = getattr(self.message_sink, "keep_threshold", None)
        # A call per sent message is not free: only sinks that use message_sent get it.
        self.send_sinks: tuple[MessageSink, ...] = tuple(
            s for s in self.message_sinks if getattr(s, "wants_sent_messages", True)
        )
        self.layout = HistogramLayout(config)
        #: Called by the frame counters for each sent message, when a sink wants it.
        self.on_sent: Callable[[ConnectionRecord, bool, int], None] | None = (
            self._message_sent if self.send_sinks else None
        )
        # Records must stay cheap to track: the connection holds the record, not the reverse.
        self.count_frames = config.metrics or bool(self.message_sinks)
        #: Makes the per-connection frame counter (see ``_install_frame_hooks``).
        self.frame_counter: Callable[[ConnectionRecord], Any]
        #: What each record's counters are laid out by (``_speedups.Layout`` in C).
        self.counts_layout: Any
        if SPEEDUPS:
            table = _size_table(self.layout.size_bounds)
            self.counts_layout = _speedups.Layout(
                self.layout,
                table,
                self.on_sent,
                bool(self.message_sinks),
                message_sink=self.message_sink,
                keep_threshold=self.keep_threshold,
                sink_failed=_sink_error,
                not_sampled=NOT_SAMPLED,
            )
            self.frame_counter = _record_itself
        else:
            self.counts_layout = self.layout
            self.frame_counter = _frame_counter_class(self)

    def _message_sent(self, record: ConnectionRecord, binary: bool, size: int) -> None:
        for sink in self.send_sinks:
            try:
                sink.message_sent(record, binary, size)
            except Exception:
                _sink_failed(sink, "message_sent")

    # -- dispatch ------------------------------------------------------------------------

    def _dispatch(self, method: str, *args: Any) -> None:
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception:
                _sink_failed(sink, method)

    # -- handshake -------------------------------------------------------------------------

    def handshake_started(self) -> HandshakeRecord:
        """A TCP connection arrived; its opening handshake starts now."""
        return HandshakeRecord(self, _now(), time.time())

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
        remote_address: Any = None,
        route: str | None = None,
    ) -> None:
        """The handshake ended; ``failure`` names why when no response was sent.

        ``route``: the route template the application's framework matched (see
        :mod:`ws_monitoring.adapters.asgi`), used instead of grouping the request path;
        ``max_routes`` still applies.
        """
        handshake.duration = _now() - handshake.started_at
        handshake.remote_address = remote_address
        handshake.request = request
        handshake.response = response
        handshake.error = error
        handshake.health_check = health_check
        if request is not None:
            handshake.path = request.path.split("?", 1)[0]
            # Rejected requests for arbitrary paths must not fill the bounded route table.
            route_of = self.routes if accepted else self.routes.peek
            if route is None:
                handshake.route = route_of(request.path)
            else:
                handshake.route = route_of(route, grouped=True)
        if accepted:
            handshake.outcome = "accepted"
            handshake.status = 101
        elif response is not None and failure is None:
            handshake.outcome = "rejected"
            handshake.status = response.status_code
        elif failure == "invalid_request" and (status := _parser_answer(error)) is not None:
            # websockets' parser answered the unreadable request itself (no response
            # object reaches the adapter): the client got that status, so do the sinks.
            handshake.outcome = "rejected"
            handshake.status = status
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
        record: ConnectionRecord | None = None,
    ) -> ConnectionRecord:
        """A connection opened; returns its record, hooked into the protocol.

        ``record`` is the one :meth:`prepare` returned, when the adapter hooked the
        protocol before the handshake.
        """
        request = request if request is not None else connection.request
        raw_path = request.path if request is not None else "/"
        if record is None:
            record = self.prepare(connection.protocol)
        record.connection = connection
        record.path = raw_path.split("?", 1)[0]
        record.route = handshake.route if handshake and handshake.route else self.routes(raw_path)
        if self.tenants is not None:
            record.tenant = self.tenants(request)
        record.request = request
        try:
            record.remote_address = connection.remote_address
        except OSError:
            # The threading server's socket is already closed: the client left at once.
            record.remote_address = None
        record.subprotocol = connection.subprotocol
        record.handshake = handshake
        record.opened_at = _now()
        record.opened_unix = time.time()
        self._dispatch("connection_opened", record)
        record.handshake = None
        return record

    def prepare(self, protocol: Protocol) -> ConnectionRecord:
        """A record counting ``protocol``'s frames from now on, before the handshake ends.

        The threading server parses frames in a reader thread that can run before the
        handler starts: hooking the protocol at creation time misses none.
        """
        record = ConnectionRecord(self)
        if self.count_frames:
            _install_frame_hooks(protocol, record, self)
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
        # What the server did, as the peer saw it: the peer's close frame when websockets
        # accepted it; else the code the server closed or failed the connection with
        # (1002 for a peer's invalid close code, 1007 for a reason that is not UTF-8: its
        # parser ignores the peer's answer after a failure); else 1006.
        close = protocol.close_rcvd or protocol.close_sent
        if close is not None:
            record.close_code = close.code
            record.close_reason = close.reason
        else:
            record.close_code = 1006
        if record.error_type is None:
            record.error_type = classify_close(protocol)
        self._dispatch("connection_closed", record)
        # The sinks are done with it: break the reference cycles through the record (the
        # connection holds it, it holds the connection; the protocol's extensions hold
        # it; an exception's traceback holds the handler's frames, which hold the
        # connection), so that a closed connection is freed by reference counting, not
        # left to the cyclic GC (about 70 objects a connection, and in a crash storm,
        # long collections on the event loop).
        record.final_id = record.id
        record.connection = None
        record.error = None

    def shutdown(self, timeout: float | None = None) -> None:
        """Flush every sink, side by side, within ``timeout`` seconds and within the
        shared shutdown deadline (:func:`shutdown_step`): a sink stuck on the network
        costs the others nothing."""
        with shutdown_step(timeout) as deadline:
            run_until(
                deadline,
                [(f"{type(sink).__name__}.shutdown", sink.shutdown) for sink in self.sinks],
            )


SinkFactory = Callable[[Config], Sink | None]


def record_of(connection: Any) -> ConnectionRecord | None:
    """The record of an instrumented connection, or ``None`` (not instrumented, or not yet).

    An ASGI connection (:mod:`ws_monitoring.adapters.asgi`) is found through its scope, or
    an object holding it as ``scope`` (Starlette's and Quart's ``WebSocket``): the scope
    keeps the adapter's connection under the same name.
    """
    record = getattr(connection, RECORD_ATTR, None)
    if record is None:
        scope = getattr(connection, "scope", connection)
        if isinstance(scope, Mapping):
            record = getattr(scope.get(RECORD_ATTR), RECORD_ATTR, None)
    return record


def monitor_of(target: Any) -> Monitor | None:
    """The monitor of an instrumented handler, or of a websockets server serving one."""
    handler = getattr(target, "handler", None)
    for candidate in (target, handler):
        monitor = getattr(candidate, "__ws_monitoring__", None)
        if isinstance(monitor, Monitor):
            return monitor
    # websockets' Server.handler is its own wrapper, a closure over the handler
    # given to serve() (``handler`` in websockets 13 to 17).
    code = getattr(handler, "__code__", None)
    closure = getattr(handler, "__closure__", None)
    if code is None or not closure:
        return None
    cell = dict(zip(code.co_freevars, closure, strict=False)).get("handler")
    try:
        inner = cell.cell_contents if cell is not None else None
    except ValueError:  # an empty cell
        return None
    monitor = getattr(inner, "__ws_monitoring__", None)
    return monitor if isinstance(monitor, Monitor) else None


# -- shutdown: one deadline for everything ws-monitoring does when the process stops ----------

#: Seconds that stopping takes at most, in total, by default: flushing the sinks of a
#: server that closes, then the exit hooks (span exporter, alert queues, log queue).
#: ``WS_MONITORING_SHUTDOWN_TIMEOUT`` (seconds) overrides it.
SHUTDOWN_TIMEOUT = 5.0

#: A shutdown step that starts less than this many seconds after the previous one ended
#: shares its deadline if that one ran out of time, or if this one is the interpreter's
#: exit: a server's close then the exit are one shutdown, and a second close after one
#: that was stuck does not wait again. Steps that start while another runs share too.
SHUTDOWN_GAP = 1.0


class _Shutdown:
    """The last shutdown: its deadline (``time.monotonic()``), steps running, when the
    last one ended and whether it ran out of time."""

    lock = threading.Lock()
    deadline = -math.inf
    running = 0
    ended = -math.inf
    cut = False
    warned = False


def shutdown_timeout() -> float:
    """The shutdown deadline in seconds: ``WS_MONITORING_SHUTDOWN_TIMEOUT`` if set to a
    number of seconds (0 or more), else :data:`SHUTDOWN_TIMEOUT`; another value is logged
    once and ignored."""
    raw = os.environ.get("WS_MONITORING_SHUTDOWN_TIMEOUT", "").strip()
    if not raw:
        return SHUTDOWN_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        if not _Shutdown.warned:
            _Shutdown.warned = True
            logger.warning(
                "WS_MONITORING_SHUTDOWN_TIMEOUT=%r is not a number of seconds: using %g s",
                raw, SHUTDOWN_TIMEOUT,
            )  # fmt: skip
        return SHUTDOWN_TIMEOUT
    return value


@contextlib.contextmanager
def shutdown_step(timeout: float | None = None, *, exiting: bool = False) -> Iterator[float]:
    """One step of a shutdown (a server's close, an exit hook); yields its deadline, a
    ``time.monotonic()`` value.

    A new shutdown gets :func:`shutdown_timeout` seconds; steps of one shutdown (see
    :data:`SHUTDOWN_GAP`) share its deadline. ``timeout`` (seconds) can only bring a
    step's own deadline closer. ``exiting``: the step is the interpreter's exit.
    """
    now = time.monotonic()
    with _Shutdown.lock:
        recent = now - _Shutdown.ended < SHUTDOWN_GAP
        if not _Shutdown.running and not (recent and (_Shutdown.cut or exiting)):
            _Shutdown.deadline = now + shutdown_timeout()
        _Shutdown.running += 1
        deadline = _Shutdown.deadline
    if timeout is not None:
        deadline = min(deadline, now + max(0.0, timeout))
    try:
        yield deadline
    finally:
        with _Shutdown.lock:
            _Shutdown.running -= 1
            _Shutdown.ended = time.monotonic()
            # Within a millisecond of its deadline: something it waited for did not finish.
            _Shutdown.cut = _Shutdown.ended >= deadline - 0.001


def run_until(deadline: float, calls: Sequence[tuple[str, Callable[[float], object]]]) -> bool:
    """Call every ``call(seconds left)`` in a thread of its own and wait for them until
    ``deadline`` (``time.monotonic()``). Returns whether all finished; a call that raises
    is logged, one still running at the deadline is left to its (daemon) thread.

    Where no thread can start (Python 3.12 refuses in exit hooks), the calls run one
    after the other in this thread instead, each with what is left of the deadline.
    """
    threads = []
    for name, call in calls:

        def run(name: str = name, call: Callable[[float], object] = call) -> None:
            try:
                call(max(0.0, deadline - time.monotonic()))
            except Exception:
                logger.exception("ws_monitoring sink %s failed", name)

        thread = threading.Thread(target=run, name=f"ws-monitoring-shutdown-{name}", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            run()
            continue
        threads.append((name, thread))
    late = []
    for name, thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            late.append(name)
    if late:
        logger.warning("ws_monitoring: %s still shutting down at the deadline", ", ".join(late))
    return not late


_exit_hooks: list[Callable[[float], object]] = []


def at_exit(hook: Callable[[float], object]) -> None:
    """Call ``hook(seconds left)`` when the interpreter exits, side by side with the
    other hooks, within the shared shutdown deadline. Registering a hook twice is a no-op."""
    with _Shutdown.lock:
        if hook not in _exit_hooks:
            _exit_hooks.append(hook)


def forget_at_exit(hook: Callable[[float], object]) -> None:
    """Undo :func:`at_exit` (a no-op for a hook not registered)."""
    with _Shutdown.lock:
        if hook in _exit_hooks:
            _exit_hooks.remove(hook)


@atexit.register
def _run_exit_hooks() -> None:  # pragma: no cover - runs at exit (tested in a subprocess)
    with _Shutdown.lock:
        hooks = list(_exit_hooks)
        _exit_hooks.clear()
    if hooks:
        with shutdown_step(exiting=True) as deadline:
            run_until(deadline, [(getattr(h, "__qualname__", repr(h)), h) for h in hooks])
