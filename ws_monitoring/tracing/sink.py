"""The tracing sink: handshake, message, send and close spans from connection records.

Imported only when tracing is on and OpenTelemetry's SDK is installed (see
:mod:`ws_monitoring.tracing.setup`, which documents the spans).

Cost model. Sampling is decided per received message, before the handler runs, as the
provider's sampler would decide it. In the common case (a new trace per message, the
ratio test of ``TraceIdRatioBased`` on random ids, under ``ParentBased`` or not) each
connection keeps a countdown of the messages to leave unsampled before the next
sampled one, drawn from the geometric distribution of that ratio: the same
independent decisions, with the same probability, as testing a fresh random trace id
per message. An unsampled message then costs a decrement: no id, no clock, no
context. Handler spans still need an unsampled parent: one non-recording span per
connection, attached once to the handler's context, serves every unsampled message.
A sampled message gets a trace id drawn among those the ratio test samples, and a
context of its own holding a non-recording span with its ids, so that spans the
handler creates are its children. Messages with a parent (connection trace, message
carrier) follow the parent's flag; other samplers are called. A kept span (sampled,
failed, or slower than ``trace_slow_threshold``; the latter two get ids when handling
ends, outside the sampled range) is built once, when handling ends, with explicit
start and end times: encoded straight into OTLP protobuf bytes when the provider comes
from :func:`~ws_monitoring.tracing.setup.setup_tracing`
(:mod:`ws_monitoring.tracing.export`), or as an SDK ``ReadableSpan`` handed to the span
processors of an application's own provider.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import random
import re
import threading
import time
import traceback
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, cast

from opentelemetry import context as context_api
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation import _SPAN_KEY
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from websockets.datastructures import Headers

from ws_monitoring.config import Config
from ws_monitoring.privacy import Privacy
from ws_monitoring.privacy import exception_type as _exception_type
from ws_monitoring.typing import NOT_SAMPLED

from . import export as otlp

if TYPE_CHECKING:
    from ws_monitoring.core import ConnectionRecord, HandshakeRecord
    from ws_monitoring.privacy import Client
    from ws_monitoring.typing import Data

__all__ = [
    "CARRIER_OUTCOMES",
    "CARRIER_SOURCES",
    "MonitoringTracerProvider",
    "TracingCollector",
    "TracingSink",
]

_VERSION = "0.1.0"
SCOPE = InstrumentationScope("ws_monitoring", _VERSION)
_KEY = "otel"

#: Values of the ``source`` and ``outcome`` labels of ``ws_monitoring_trace_carriers_total``.
CARRIER_SOURCES = ("header", "message")
CARRIER_OUTCOMES = ("extracted", "absent", "malformed", "error")

#: A countdown that never ends in practice (ratio 0), as an integer.
_NEVER = 1 << 62
_TRACE_ID_MASK = (1 << 64) - 1  # TraceIdRatioBased tests the low 64 bits
_ALL = 1 << 64
_SAMPLED = 0x01
_RANDOM = 0x02
_DEFAULT_STATE = TraceState()
_FLAGS = [TraceFlags(i) for i in range(4)]
_new_context = tuple.__new__  # SpanContext without re-validating ids drawn non-zero
_time_ns = time.time_ns
_bits = random.getrandbits
_random = random.random
_log = math.log
# What context_api.attach/detach/get_current end up calling, minus the wrappers (they
# run for every sampled message): the default runtime's ContextVar itself, else the
# runtime's methods. OTEL_PYTHON_CONTEXT still applies.
_runtime = getattr(context_api, "_RUNTIME_CONTEXT", None)
_var = getattr(_runtime, "_current_context", None)
if isinstance(_var, contextvars.ContextVar):
    _attach: Any = _var.set
    _detach: Any = _var.reset
    _get_current: Any = _var.get
else:  # pragma: no cover - another runtime context (OTEL_PYTHON_CONTEXT)
    _attach = getattr(_runtime, "attach", context_api.attach)
    _detach = getattr(_runtime, "detach", context_api.detach)
    _get_current = getattr(_runtime, "get_current", context_api.get_current)


class MonitoringTracerProvider(TracerProvider):
    """The SDK provider :func:`~ws_monitoring.tracing.setup.setup_tracing` installs.

    It exports through one :class:`~ws_monitoring.tracing.export.ExportProcessor`; message
    spans go to it pre-encoded. If the application adds another span processor, message
    spans become SDK spans again so that every processor sees them.
    """

    def __init__(self, processor: otlp.ExportProcessor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.export_processor = processor
        super().add_span_processor(processor)
        processor.exclusive = True

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        self.export_processor.exclusive = False
        super().add_span_processor(span_processor)


# -- metrics -----------------------------------------------------------------------------


class TracingCollector:
    """Tracing counters for one Prometheus registry (registered once per registry).

    ``ws_monitoring_spans_dropped_total{reason}`` and ``ws_monitoring_spans_exported_total``
    count the export pipeline of :func:`~ws_monitoring.tracing.setup.setup_tracing`
    from the moment this registry started to watch it;
    ``ws_monitoring_trace_carriers_total{source,outcome}`` counts the trace contexts
    the servers of this registry looked for.
    """

    _instances: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, TracingCollector]] = (
        weakref.WeakKeyDictionary()
    )
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._carriers = {(s, o): 0 for s in CARRIER_SOURCES for o in CARRIER_OUTCOMES}
        self._base_dropped, self._base_exported = otlp.EXPORT_STATS.snapshot()

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> TracingCollector:
        registry = registry if registry is not None else REGISTRY
        with cls._instances_lock:
            collector = cls._instances.get(registry)
            if collector is None:
                collector = cls._instances[registry] = cls()
                registry.register(collector)
            return collector

    def count(self, source: str, outcome: str) -> None:
        with self._lock:
            self._carriers[source, outcome] += 1

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        dropped, exported = otlp.EXPORT_STATS.snapshot()
        family = CounterMetricFamily(
            "ws_monitoring_spans_dropped",
            "Spans dropped by the OTLP export pipeline, by reason.",
            labels=["reason"],
        )
        for reason in otlp.DROP_REASONS:
            family.add_metric([reason], dropped[reason] - self._base_dropped[reason])
        yield family
        yield CounterMetricFamily(
            "ws_monitoring_spans_exported",
            "Spans the OTLP collector accepted.",
            value=exported - self._base_exported,
        )
        carriers = CounterMetricFamily(
            "ws_monitoring_trace_carriers",
            "Trace contexts looked for in upgrade requests (header) and messages, by outcome.",
            labels=["source", "outcome"],
        )
        with self._lock:
            counts = dict(self._carriers)
        for (source, outcome), value in counts.items():
            carriers.add_metric([source, outcome], value)
        yield carriers


# -- sampling ------------------------------------------------------------------------------


def _root_bound(sampler: Sampler) -> int | None:
    """The ratio bound a root span's trace id is tested against; ``None``: unknown sampler."""
    if isinstance(sampler, TraceIdRatioBased):
        return sampler.bound
    decision = getattr(sampler, "_decision", None) if isinstance(sampler, StaticSampler) else None
    if decision is Decision.RECORD_AND_SAMPLE:
        return _ALL
    if decision is Decision.DROP:
        return 0
    return None


def _analyze(sampler: Sampler) -> tuple[int | None, bool]:
    """(root bound, follow the parent's flag) for samplers decided without calling them."""
    if isinstance(sampler, ParentBased):
        on, off = _ALL, 0
        delegates = [
            _root_bound(getattr(sampler, name, None))  # type: ignore[arg-type]
            for name in (
                "_remote_parent_sampled",
                "_remote_parent_not_sampled",
                "_local_parent_sampled",
                "_local_parent_not_sampled",
            )
        ]
        if delegates != [on, off, on, off]:
            return None, False
        return _root_bound(getattr(sampler, "_root", None)), True  # type: ignore[arg-type]
    return _root_bound(sampler), False


class _Backend:
    """What the sink needs from one SDK ``TracerProvider``, resolved once."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(SCOPE.name, SCOPE.version)
        self.resource = provider.resource
        self.sampler: Sampler = provider.sampler
        self.root_bound, self.follow = _analyze(self.sampler)
        self.processor: otlp.ExportProcessor | None = getattr(provider, "export_processor", None)
        # Each SDK version has kept its multi-processor here: the only way to hand it a
        # span that its sampler would not have created (kept errors and slow messages).
        self.span_processor: SpanProcessor = provider._active_span_processor
        gen = provider.id_generator
        self.random_ids = type(gen) is RandomIdGenerator
        self.id_gen = gen
        #: The root bound when new trace ids are random and tested by ratio (the hot path).
        self.fast_root_bound = self.root_bound if self.random_ids else None
        bound = self._bound = self.fast_root_bound or 0
        #: Every root message sampled (ratio 1): no countdown, any random id.
        self.sample_all = bound >= _ALL
        # log(1 - p), p = bound / 2**64: the geometric draws of skips() (0 < p < 1 only).
        self._log_keep = math.log1p(-bound / _ALL) if 0 < bound < _ALL else 0.0

    def skips(self) -> float:
        """How many root messages to leave unsampled before the next sampled one.

        For the fast root path below ratio 1 (``sample_all`` needs no countdown).
        Geometric with ``p = bound / 2**64``, the ratio test's probability: drawn once
        per sampled message, the countdown makes the same independent decisions, each
        sampled with probability ``p``, as testing a fresh random trace id per message,
        without drawing one. ``inf`` when nothing is sampled.
        """
        if self._bound <= 0:
            return math.inf
        # 1 - random() is in (0, 1]: floor(log(u) / log(1 - p)) is geometric, from 0.
        return int(_log(1.0 - _random()) / self._log_keep)

    def trace_id(self, sampled: bool) -> int:
        """A random trace id whose ratio test says ``sampled``, uniform among those.

        For the fast root path only; ``sampled`` must be possible at this ratio (the
        countdown of :meth:`skips` only asks for what it can give).
        """
        bound = self._bound
        low = _below(bound) if sampled else bound + _below(_ALL - bound)
        # Never 0 (invalid): the high half changes, so the ratio test keeps its answer.
        return ((_bits(64) << 64) | low) or _ALL

    def ids(
        self, parent: SpanContext | None, name: str, kind: SpanKind = SpanKind.CONSUMER
    ) -> tuple[int, int, int, TraceState]:
        """(trace id, span id, trace flags, trace state) of a new span, sampling decided.

        The provider's sampler decides, without building the span: the ratio test of
        ``TraceIdRatioBased`` and the parent's flag of ``ParentBased`` are applied here;
        other samplers are called.
        """
        if parent is None:
            gen = self.id_gen
            trace_id = (_bits(128) or 1) if self.random_ids else gen.generate_trace_id()
            flags = _RANDOM if self.random_ids else 0
            state = _DEFAULT_STATE
        else:
            trace_id = parent.trace_id
            flags = parent.trace_flags & _RANDOM
            state = parent.trace_state
        span_id = (_bits(64) or 1) if self.random_ids else self.id_gen.generate_span_id()
        bound = self.root_bound
        if parent is not None and self.follow:
            sampled = bool(parent.trace_flags & _SAMPLED)
        elif bound is not None:
            sampled = (trace_id & _TRACE_ID_MASK) < bound
        else:
            ctx = Context()
            if parent is not None:
                ctx = trace.set_span_in_context(NonRecordingSpan(parent), ctx)
            result = self.sampler.should_sample(ctx, trace_id, name, kind)
            sampled = result.decision is Decision.RECORD_AND_SAMPLE
            state = result.trace_state or state
        return trace_id, span_id, flags | _SAMPLED if sampled else flags, state


def _below(n: int) -> int:
    """A uniform random int in ``[0, n)``, ``n >= 1``: random bits, rejecting those >= n."""
    if n == _ALL:
        return _bits(64)
    k = n.bit_length()
    r = _bits(k)
    while r >= n:  # fewer than 2 draws on average
        r = _bits(k)
    return r


# -- per-connection state ------------------------------------------------------------------

_PROCESS = "process"
_SEND = "send"
_SIZE_KEY = otlp.string_field(b"\x0a", "messaging.message.body.size")
_TYPE_ATTR = {
    False: otlp.field(otlp.SPAN_ATTRIBUTE, otlp.key_value("websocket.message.type", "text")),
    True: otlp.field(otlp.SPAN_ATTRIBUTE, otlp.key_value("websocket.message.type", "binary")),
}
_OPERATIONS = {
    _PROCESS: (SpanKind.CONSUMER, otlp.span_kind(SpanKind.CONSUMER.value)),
    _SEND: (SpanKind.PRODUCER, otlp.span_kind(SpanKind.PRODUCER.value)),
}
_PARENT_FLAGS = {
    False: otlp.FLAG_HAS_IS_REMOTE,
    True: otlp.FLAG_HAS_IS_REMOTE | otlp.FLAG_IS_REMOTE,
}
_ERROR = StatusCode.ERROR.value
#: Encoded size and type attributes of messages, by ``size * 2 + binary`` (bounded).
_MESSAGE_ATTRS: dict[int, bytes] = {}
_MAX_MESSAGE_ATTRS = 1024
#: Client-view attributes (already anonymized or consented) and bounded labels (the
#: same values as the metrics'): not scrubbed again.
_CLIENT_KEYS = ("client.address", "user.id", "messaging.destination.name", "websocket.tenant")


class _Constant:
    """Constant parts of one connection's spans of one operation, plain and encoded."""

    __slots__ = ("attrs", "client", "encoded_attrs", "encoded_name_kind", "name")

    def __init__(self, name: str, attrs: dict[str, Any], client: Client, operation: str) -> None:
        self.name = name
        self.attrs = attrs
        self.client = client
        #: The ``name`` and ``kind`` fields, which follow each other in a ``Span``.
        self.encoded_name_kind = otlp.string_field(b"\x2a", name) + _OPERATIONS[operation][1]
        self.encoded_attrs = otlp.attributes(otlp.SPAN_ATTRIBUTE, attrs)


@functools.lru_cache(maxsize=1024)
def _span_names(route: str) -> dict[str, str]:
    """Span names of a route's operations, shared by its connections (routes are bounded)."""
    return {_PROCESS: f"process {route}", _SEND: f"send {route}"}


def _pack(context: SpanContext | None) -> bytes | SpanContext | None:
    """``context`` in 58 B instead of about 240 (its ids, flags, tuple and TraceFlags):
    what an idle connection keeps of its handshake span. One with a trace state (from
    the client's ``tracestate``) is kept as it is."""
    if context is None or context.trace_state:
        return context
    flags = int(context.trace_flags) | (_REMOTE_BIT if context.is_remote else 0)
    return (
        context.trace_id.to_bytes(16, "big") + context.span_id.to_bytes(8, "big") + bytes((flags,))
    )


def _unpack(packed: bytes | SpanContext) -> SpanContext:
    """The :class:`SpanContext` that :func:`_pack` packed."""
    if not isinstance(packed, bytes):
        return packed
    flags = packed[24]
    return SpanContext(
        int.from_bytes(packed[:16], "big"),
        int.from_bytes(packed[16:24], "big"),
        is_remote=bool(flags & _REMOTE_BIT),
        trace_flags=TraceFlags(flags & ~_REMOTE_BIT),
        trace_state=_DEFAULT_STATE,
    )


#: Not a W3C flag (those are bits 0 and 1): where _pack() keeps ``is_remote``.
_REMOTE_BIT = 0x80


class _Conn:
    """The tracing state of one connection, in ``record.tracing_state``.

    Kept small for idle connections: what only kept spans need (their constant parts,
    the encoded link to the handshake span) is built by the first one.
    """

    __slots__ = (
        "_handshake",
        "_link",
        "_packed",
        "backend",
        "constants",
        "names",
        "parent",
        "quiet",
        "skip",
    )

    def __init__(
        self,
        backend: _Backend,
        record: ConnectionRecord,
        handshake: SpanContext | None,
        in_connection_trace: bool,
    ) -> None:
        self.backend = backend
        #: The handshake span's context, packed (see :meth:`handshake`); unpacked once read.
        self._packed = _pack(handshake)
        self._handshake: SpanContext | None = None
        #: Parent of every message span (the handshake span), or None: each its own trace.
        self.parent = self.handshake if in_connection_trace else None
        self._link: bytes | None = None
        self.names = _span_names(record.route)
        #: Constant parts of kept spans, per operation; None until the first one.
        self.constants: dict[str, _Constant] | None = None
        #: Token of the unsampled context shared by this connection's unsampled messages.
        self.quiet: contextvars.Token[Context] | None = None
        #: Root messages still to leave unsampled (:meth:`_Backend.skips`) when sampling
        #: is the ratio test of random ids and messages have no parent; -1: not drawn
        #: yet. Always 0 otherwise: every message takes the general path. While it is
        #: positive, ``quiet`` is attached.
        countdown = backend.fast_root_bound is not None and not backend.sample_all
        self.skip: float = -1 if countdown and self.parent is None else 0

    @property
    def handshake(self) -> SpanContext | None:
        """The handshake span's context, or None; the same object on every read."""
        context = self._handshake
        if context is None:
            packed = self._packed
            if packed is None:
                return None
            context = self._handshake = _unpack(packed)
            self._packed = None
        return context

    @property
    def link(self) -> bytes:
        """The encoded link to the handshake span (b"" without one), built on first use."""
        link = self._link
        if link is None:
            hs = self.handshake
            link = self._link = (
                otlp.link(hs.trace_id, hs.span_id, hs.trace_flags, hs.is_remote)
                if hs is not None
                else b""
            )
        return link

    def links(self, parent: SpanContext | None) -> tuple[Link, ...]:
        """Each span links to the handshake span, unless that is its parent."""
        hs = self.handshake
        return (Link(hs),) if hs is not None and hs is not parent else ()

    def rebuild(self, record: ConnectionRecord, operation: str) -> _Constant:
        """(Re)build the constant parts of ``operation``'s spans, for ``record.client``."""
        if self.constants is None:
            self.constants = {}
        const = self.constants[operation] = _Constant(
            self.names[operation],
            _connection_attributes(record, record.monitor.privacy, operation),
            record.client,
            operation,
        )
        return const


def _client_attributes(client: Client) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    if client.ip is not None:
        attrs["client.address"] = client.ip
    if client.user is not None:
        attrs["user.id"] = client.user
    return attrs


def _connection_attributes(
    record: ConnectionRecord, privacy: Privacy, operation: str | None
) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "messaging.system": "websocket",
        "messaging.destination.name": record.route,
        "network.protocol.name": "websocket",
        "websocket.connection.id": record.id,
    }
    if operation is not None:
        attrs["messaging.operation.type"] = operation
        attrs["messaging.operation.name"] = operation
    if record.tenant:
        attrs["websocket.tenant"] = record.tenant
    attrs.update(_client_attributes(record.client))
    return privacy.scrub(attrs, keep=_CLIENT_KEYS)


def _body_size(message: Data) -> int:
    if isinstance(message, str):
        return len(message) if message.isascii() else len(message.encode("utf-8", "surrogatepass"))
    return len(message)


_MAX_FRAMES = 32
_MAX_TEXT = 4096


def _exception_attributes(exc: BaseException, client: Client, privacy: Privacy) -> dict[str, Any]:
    """The ``exception`` event's attributes: type and frames; the message by the privacy
    layer's one rule for every sink (``config.exception_messages``)."""
    name = _exception_type(exc)
    frames = "".join(traceback.format_tb(exc.__traceback__, limit=-_MAX_FRAMES))
    attrs: dict[str, Any] = {
        "exception.type": name,
        "exception.stacktrace": f"Traceback (most recent call last):\n{frames}{name}"[-_MAX_TEXT:],
    }
    if (message := privacy.exception_message(exc)) is not None:
        attrs["exception.message"] = message[:_MAX_TEXT]
    return attrs


# -- carriers ------------------------------------------------------------------------------


class _HeadersGetter(Getter[Headers]):
    """Reads W3C headers from websockets ``Headers`` (repeated headers included)."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        return carrier.get_all(key) or None

    def keys(self, carrier: Headers) -> list[str]:
        return list(carrier.keys())


_HEADERS_GETTER = _HeadersGetter()


def _extracted(ctx: Context) -> SpanContext | None:
    sc = trace.get_current_span(ctx).get_span_context()
    return sc if sc.is_valid else None


# -- the sink ------------------------------------------------------------------------------

#: What ``message_started`` hands to ``message_finished`` for a message whose span has
#: ids (sampled, or with a parent, a carrier or a sampler that had to be asked): the
#: context token, start (ns), trace id, span id, trace flags, parent, connection state,
#: message, trace state. Other tokens: ``None`` (no tracing on the connection), or the
#: message itself for a root message the countdown left unsampled (nothing drawn).
_Token = tuple[
    "contextvars.Token[Context]",
    int,
    int,
    int,
    int,
    "SpanContext | None",
    _Conn,
    "Data",
    TraceState,
]

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})(?::(\d{1,5}))?$")


class TracingSink:
    """Turns connection events into spans (see the module docstring for the cost model).

    It binds to the global SDK ``TracerProvider`` the first time one is set when a
    handshake or connection starts; until then it does nothing. Thread-safe.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        slow = config.trace_slow_threshold
        #: Unsampled messages handled this long (seconds) or longer are kept.
        self._keep_slower = math.inf if slow is None else slow
        #: Read by the core: unsampled messages (NOT_SAMPLED) are finished only if slower.
        self.keep_threshold = slow
        self._in_connection_trace = config.trace_messages_in_connection_trace
        self._send = config.trace_sent_messages
        #: Read by the core: without send spans, sent messages need no call here.
        self.wants_sent_messages = self._send
        self._from_message = config.context_from_message
        self._stats = TracingCollector.for_registry(config.registry)
        self._backend: _Backend | None = None

    def _bind(self) -> _Backend | None:
        backend = self._backend
        if backend is None:
            provider = trace.get_tracer_provider()
            if not isinstance(provider, TracerProvider):
                return None
            # Two threads may both get here: equivalent backends, the last one stays.
            self._backend = backend = _Backend(provider)
        return backend

    # -- lifecycle ---------------------------------------------------------------------

    def handshake_finished(self, handshake: HandshakeRecord) -> None:
        if handshake.health_check:
            return
        backend = self._bind()
        if backend is None:
            return
        request = handshake.request
        parent_ctx = Context()
        if request is not None:
            headers = request.headers
            if "traceparent" not in headers:
                outcome = "absent"
            else:
                try:
                    parent_ctx = propagate.extract(headers, Context(), _HEADERS_GETTER)
                except Exception:
                    parent_ctx = Context()
                outcome = "extracted" if _extracted(parent_ctx) is not None else "malformed"
            self._stats.count("header", outcome)
        start = int(handshake.started_unix * 1e9)
        name = f"GET {handshake.route}" if request is not None else "HTTP"
        span = backend.tracer.start_span(
            name, context=parent_ctx, kind=SpanKind.SERVER, start_time=start
        )
        if span.is_recording():
            span.set_attributes(self._handshake_attributes(handshake))
            if handshake.outcome != "accepted":
                span.set_status(Status(StatusCode.ERROR, f"handshake {handshake.outcome}"))
        span.end(end_time=start + int(handshake.duration * 1e9))
        handshake.context[_KEY] = span.get_span_context()

    def _handshake_attributes(self, handshake: HandshakeRecord) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "network.protocol.name": "websocket",
            "websocket.handshake.outcome": handshake.outcome,
        }
        request = handshake.request
        if request is not None:
            attrs["http.request.method"] = "GET"
            attrs["http.route"] = handshake.route
            attrs["url.path"] = handshake.path
            agent = request.headers.get_all("User-Agent")
            if agent:
                attrs["user_agent.original"] = agent[0][:_MAX_TEXT]
        if handshake.status is not None:
            attrs["http.response.status_code"] = handshake.status
        if handshake.outcome == "rejected":
            attrs["error.type"] = str(handshake.status)
        elif handshake.outcome == "failed":
            attrs["error.type"] = handshake.failure or "error"
        # The server's own privacy layer: same key, so the same pseudonyms as its logs.
        attrs = handshake.monitor.privacy.scrub(attrs, keep=("http.route",))
        # The Host header names this server, not the client: kept when well-formed.
        if request is not None:
            hosts = request.headers.get_all("Host")
            match = _HOST.match(hosts[0]) if len(hosts) == 1 else None
            if match is not None:
                attrs["server.address"] = match.group(1)
                if match.group(2) is not None:
                    attrs["server.port"] = int(match.group(2))
        return attrs

    def connection_opened(self, connection: ConnectionRecord) -> None:
        backend = self._bind()
        if backend is None:
            return
        hs = connection.handshake
        handshake_sc: SpanContext | None = hs.context.get(_KEY) if hs is not None else None
        connection.tracing_state = _Conn(
            backend, connection, handshake_sc, self._in_connection_trace
        )

    def handler_failed(self, connection: ConnectionRecord, exc: BaseException) -> None:
        """Nothing: the message span (``message_finished``) and the close span record it."""

    def connection_closed(self, connection: ConnectionRecord) -> None:
        conn: _Conn | None = connection.tracing_state
        if conn is None:
            return
        if conn.quiet is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                _detach(conn.quiet)
            conn.quiet = None
        backend = conn.backend
        hs = conn.handshake
        parent_ctx = trace.set_span_in_context(NonRecordingSpan(hs), Context()) if hs else Context()
        at = int((connection.opened_unix + connection.age) * 1e9)
        span = backend.tracer.start_span(
            f"close {connection.route}", context=parent_ctx, kind=SpanKind.INTERNAL, start_time=at
        )
        if span.is_recording():
            attrs = _connection_attributes(connection, connection.monitor.privacy, None)
            attrs["websocket.close.code"] = connection.close_code or 0
            attrs["websocket.close.reason.length"] = len(
                connection.close_reason.encode("utf-8", "surrogatepass")
            )
            attrs["websocket.connection.duration"] = connection.age
            attrs["websocket.messages.received"] = connection.messages_received
            attrs["websocket.messages.sent"] = connection.messages_sent
            if connection.error_type is not None:
                attrs["error.type"] = connection.error_type
                span.set_status(Status(StatusCode.ERROR, connection.error_type))
            span.set_attributes(attrs)
            if connection.error is not None:
                span.add_event(
                    "exception",
                    _exception_attributes(
                        connection.error, connection.client, connection.monitor.privacy
                    ),
                    timestamp=at,
                )
        span.end(end_time=at)

    def shutdown(self, timeout: float) -> None:
        """Export what is queued within ``timeout`` seconds (the provider stays up)."""
        backend = self._backend
        if backend is None:
            return
        if backend.processor is not None:
            backend.processor.flush(timeout)
        else:
            backend.provider.force_flush(int(timeout * 1000))

    # -- messages (the hot path) -----------------------------------------------------------

    def message_started(self, connection: ConnectionRecord, message: Data) -> object:
        conn: _Conn | None = connection.tracing_state
        if conn is None:
            return None
        pending = connection.sample_skip
        if pending > 0:
            # Most messages at a ratio: not sampled, and nothing to do. The connection's
            # unsampled context is current, so the handler's spans are unsampled too.
            # Should the message be kept anyway (slow, error), its ids are drawn then.
            # The core counts these down itself when this is its only message sink.
            connection.sample_skip = pending - 1
            return NOT_SAMPLED
        skip = conn.skip
        backend = conn.backend
        parent = conn.parent
        extra: Context | None = None
        if self._from_message is not None:
            extra = self._carrier(message)
            if extra is not None:
                parent = _extracted(extra) or parent
        if parent is None and backend.fast_root_bound is not None:
            # A new trace, sampled by the ratio test of a random id: the countdown
            # decides, then the id is drawn among those the test gives that answer.
            if backend.sample_all:
                trace_id = _bits(128) or 1
                flags = _RANDOM | _SAMPLED
            else:
                if skip < 0:
                    skip = backend.skips()
                sampled = not skip
                skip = conn.skip = backend.skips() if sampled else skip - 1
                if conn.quiet is None and (skip or not sampled):
                    # Attached for good, under this message's own context if any: this
                    # message or the next ones, unsampled, only need an unsampled
                    # current span.
                    quiet = _new_context(
                        SpanContext,
                        (
                            backend.trace_id(False),
                            _bits(64) or 1,
                            False,
                            _FLAGS[_RANDOM],
                            _DEFAULT_STATE,
                            True,
                        ),
                    )
                    conn.quiet = _attach(
                        Context({**_get_current(), _SPAN_KEY: NonRecordingSpan(quiet)})
                    )
                if skip > 0 and self._from_message is None:
                    # Handed to the core (ConnectionRecord.sample_skip): it needs no call
                    # for the next ``skip`` messages. Carriers need one per message.
                    connection.sample_skip = int(min(skip, _NEVER))
                    conn.skip = 0
                if not sampled and extra is None:
                    return NOT_SAMPLED
                trace_id = backend.trace_id(sampled)
                flags = _RANDOM | _SAMPLED if sampled else _RANDOM
            span_id = _bits(64) or 1
            state = _DEFAULT_STATE
        else:
            trace_id, span_id, flags, state = backend.ids(parent, conn.names[_PROCESS])
        sc = _new_context(SpanContext, (trace_id, span_id, False, _FLAGS[flags], state, True))
        current = _get_current()
        if extra:
            current = Context({**current, **extra})
        # Handler code sees this span as current: its spans are the message span's
        # children, sampled or dropped with it.
        span = NonRecordingSpan(sc)
        token = _attach(
            Context({**current, _SPAN_KEY: span}) if current else Context({_SPAN_KEY: span})
        )
        return (token, _time_ns(), trace_id, span_id, flags, parent, conn, message, state)

    def _carrier(self, message: Data) -> Context | None:
        extract = self._from_message
        assert extract is not None
        try:
            carrier = extract(message)
        except Exception:
            self._stats.count("message", "error")
            return None
        if carrier is None:
            self._stats.count("message", "absent")
            return None
        try:
            if not isinstance(carrier, Mapping):
                raise TypeError("context_from_message must return a mapping or None")
            present = "traceparent" in carrier
            ctx = propagate.extract(carrier, Context())
        except Exception:
            self._stats.count("message", "malformed")
            return None
        if not present:
            outcome = "absent"
        else:
            outcome = "extracted" if _extracted(ctx) is not None else "malformed"
        self._stats.count("message", outcome)
        return ctx

    def message_finished(
        self,
        connection: ConnectionRecord,
        token: object,
        duration: float,
        error: BaseException | None,
    ) -> None:
        if token.__class__ is tuple:
            # A context token: a span with ids, sampled or not (see _Token).
            tok: _Token = token  # narrowed to a tuple above; cast() would cost a call
            ctx_token, start, trace_id, span_id, flags, parent, conn, message, state = tok
            # ValueError/RuntimeError: handling ended in another task or thread than it
            # started in; there is nothing to restore there.
            try:  # noqa: SIM105 - contextlib.suppress() costs two calls per message
                _detach(ctx_token)
            except (ValueError, RuntimeError):
                pass
            if not flags & _SAMPLED:
                if error is None and duration < self._keep_slower:
                    return
                flags |= _SAMPLED  # kept although unsampled: an error, or slow
            end = start + int(duration * 1e9)
        else:
            # None (no tracing here) or an unsampled message without ids: its payload.
            if (error is None and duration < self._keep_slower) or token is None:
                return
            found: _Conn | None = connection.tracing_state
            if found is None:  # pragma: no cover - the token came from this connection
                return
            # Kept although unsampled: an error, or slower than trace_slow_threshold. Its
            # ids are drawn now; the handler's spans were under the connection's
            # unsampled context, and are gone.
            conn = found
            message = cast("Data", token)
            trace_id = conn.backend.trace_id(False)
            span_id = _bits(64) or 1
            flags = _RANDOM | _SAMPLED
            parent = None
            state = _DEFAULT_STATE
            end = _time_ns()
            start = end - int(duration * 1e9)
        _emit(
            connection,
            conn,
            _PROCESS,
            trace_id,
            span_id,
            flags,
            parent,
            state,
            start,
            end,
            _body_size(message),
            not isinstance(message, str),
            error,
        )
        connection.exemplar_trace_id = trace_id.to_bytes(16, "big").hex()  # not f"{:032x}": 3x

    def message_sent(self, connection: ConnectionRecord, binary: bool, size: int) -> None:
        if not self._send:
            return
        conn: _Conn | None = connection.tracing_state
        if conn is None:
            return
        backend = conn.backend
        current = trace.get_current_span().get_span_context()
        parent = current if current.is_valid else None
        trace_id, span_id, flags, state = backend.ids(parent, conn.names[_SEND], SpanKind.PRODUCER)
        if flags & _SAMPLED:
            now = _time_ns()
            _emit(
                connection,
                conn,
                _SEND,
                trace_id,
                span_id,
                flags,
                parent,
                state,
                now,
                now,
                size,
                binary,
                None,
            )


def _emit(
    connection: ConnectionRecord,
    conn: _Conn,
    operation: str,
    trace_id: int,
    span_id: int,
    flags: int,
    parent: SpanContext | None,
    state: TraceState,
    start: int,
    end: int,
    size: int,
    binary: bool,
    error: BaseException | None,
) -> None:
    """Export one kept message span: pre-encoded when possible, else as an SDK span."""
    backend = conn.backend
    const = conn.constants.get(operation) if conn.constants is not None else None
    # ``grant``/``withdraw`` replace record.client: rebuild what depends on it.
    if const is None or const.client is not connection.client:
        const = conn.rebuild(connection, operation)
    fast = backend.processor
    if fast is not None and fast.exclusive:
        key = size * 2 + binary
        message_attrs = _MESSAGE_ATTRS.get(key)
        if message_attrs is None:
            message_attrs = otlp.int_attribute(_SIZE_KEY, size) + _TYPE_ATTR[binary]
            if len(_MESSAGE_ATTRS) < _MAX_MESSAGE_ATTRS:
                _MESSAGE_ATTRS[key] = message_attrs
        if parent is None:
            head = b""
            link = conn.link
            flags |= otlp.FLAG_HAS_IS_REMOTE
        else:
            head = otlp.parent_field(parent.span_id)
            link = b"" if parent is conn.handshake else conn.link
            flags |= _PARENT_FLAGS[parent.is_remote]
        if state is not _DEFAULT_STATE:
            head = otlp.trace_state_field(state.to_header()) + head
        if error is None:
            rest: tuple[bytes, ...] = (const.encoded_attrs, message_attrs, link)
        else:
            name = _exception_type(error)
            exc_attrs = _exception_attributes(error, connection.client, connection.monitor.privacy)
            rest = (
                const.encoded_attrs,
                message_attrs,
                otlp.field(otlp.SPAN_ATTRIBUTE, otlp.key_value("error.type", name)),
                otlp.event("exception", end, exc_attrs),
                link,
                otlp.status(_ERROR, name),
            )
        fast.offer_encoded(
            otlp.span_body(
                trace_id, span_id, head, const.encoded_name_kind, start, end, rest, flags
            )
        )
        return
    kind = _OPERATIONS[operation][0]
    attrs = dict(const.attrs)
    attrs["messaging.message.body.size"] = size
    attrs["websocket.message.type"] = "binary" if binary else "text"
    events: tuple[Event, ...] = ()
    status = Status(StatusCode.UNSET)
    if error is not None:
        name = _exception_type(error)
        attrs["error.type"] = name
        status = Status(StatusCode.ERROR, name)
        attrs_exc = _exception_attributes(error, connection.client, connection.monitor.privacy)
        events = (Event("exception", attrs_exc, end),)
    backend.span_processor.on_end(
        ReadableSpan(
            const.name,
            SpanContext(trace_id, span_id, False, _FLAGS[flags], state),
            parent,
            backend.resource,
            attrs,
            events,
            conn.links(parent),
            kind,
            None,
            status,
            start,
            end,
            SCOPE,
        )
    )
