"""OpenTelemetry tracing: a span per handshake and per message, exported over OTLP, cheap.

Tracing
=======

Install the extra (``pip install 'ws-monitoring[tracing]'``; add ``[grpc]`` for OTLP/gRPC),
configure an exporter once, and serve as usual::

    import asyncio
    import ws_monitoring
    from ws_monitoring import setup_tracing, tracer

    async def handler(websocket):
        async for message in websocket:
            with tracer.start_as_current_span("lookup"):   # child of the message span
                reply = await lookup(message)
            await websocket.send(reply)

    async def main():
        tracing = setup_tracing("chat", endpoint="http://otel-collector:4318")
        try:
            async with ws_monitoring.serve(handler, "", 8765):
                await asyncio.get_running_loop().create_future()
        finally:
            # Flushes what is queued, 5 s at most; it blocks: keep it off the event loop.
            await asyncio.to_thread(tracing.shutdown, 5)

``setup_tracing()`` installs an SDK ``TracerProvider`` exporting over OTLP/HTTP
(``protocol="grpc"`` for gRPC) and honours the standard variables:
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``
(``/v1/traces`` is appended to the generic one), ``_HEADERS``, ``_TIMEOUT`` (seconds, as
the Python SDK reads it), ``_COMPRESSION``, ``_CERTIFICATE``, ``_CLIENT_KEY``,
``_CLIENT_CERTIFICATE``, ``_PROTOCOL``, ``_INSECURE`` (gRPC), ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_BSP_MAX_QUEUE_SIZE``, ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``,
``OTEL_BSP_SCHEDULE_DELAY`` and ``OTEL_SDK_DISABLED``. Arguments win over variables.
If the application already set a tracer provider, ``setup_tracing()`` keeps it and
returns a handle on it (``owned`` is false: its shutdown only flushes). No provider at
all: servers make no spans. ``tracing=False`` (or ``WS_MONITORING_TRACING=0``), no
OpenTelemetry installed, or ``OTEL_SDK_DISABLED=true``: the sink is not even created,
so the message path makes no tracing call.

Spans
-----

=====================  ========  ==========================================================
span                   kind      when, parent, attributes
=====================  ========  ==========================================================
``GET {route}``        SERVER    the opening handshake (start and end of the HTTP
                                 upgrade). Parent: the ``traceparent``/``tracestate``/
                                 ``baggage`` headers of the upgrade request. ``url.path``,
                                 ``http.route``, ``http.request.method``,
                                 ``http.response.status_code``, ``server.address``,
                                 ``server.port``, ``network.protocol.name=websocket``,
                                 ``user_agent.original``, ``websocket.handshake.outcome``.
                                 Rejected or failed handshakes: status ERROR, ``error.type``.
``process {route}``    CONSUMER  each received message, from ``recv()`` handing it to the
                                 handler until the handler asks for the next one (or
                                 returns). A new trace per message, linked to the
                                 handshake span. ``messaging.operation.type=process``,
                                 ``messaging.destination.name`` (route),
                                 ``messaging.message.body.size``, ``websocket.message.type``
                                 (text/binary), ``websocket.connection.id``,
                                 ``client.address``, ``user.id`` (privacy-safe views).
                                 With ``recv_streaming()``, the size is the first
                                 fragment's. No handshake span (a handler wrapped with
                                 ``instrument()`` but served by websockets): no link.
                                 A handler exception: status ERROR, ``error.type`` and an
                                 ``exception`` event.
``send {route}``       PRODUCER  each sent message, with ``trace_sent_messages=True`` only
                                 (sent messages are counted in metrics anyway). Child of
                                 the current span (the message being processed).
``close {route}``      INTERNAL  the connection closed; child of the handshake span.
                                 ``websocket.close.code``, ``websocket.close.reason.length``
                                 (never the reason's text), ``websocket.connection.duration``,
                                 message counts; an abnormal end: status ERROR and
                                 ``error.type`` (``connection_reset``, ``protocol_error``...).
=====================  ========  ==========================================================

Spans created by the handler while it processes a message (``with
tracer.start_as_current_span(...)``) are children of that message's span.

Why a trace per message by default: a connection lives for hours and carries
thousands of messages; one trace per connection would be a giant, never-complete trace
that backends truncate, and one sampling decision would keep or drop a whole session.
Each message is the unit of work, sampled on its own, and the link to the handshake
span leads back to the connection. ``trace_messages_in_connection_trace=True`` makes
message spans children of the handshake span instead: one trace per connection, whose
messages share its sampling decision (all kept or all dropped). Use it for short
connections, or when the client's ``traceparent`` on the upgrade must reach every message.

Browsers cannot set headers on the upgrade request: ``context_from_message=`` takes a
function returning a carrier (``{"traceparent": ...}``) from a message, e.g.
``lambda m: json.loads(m).get("trace")`` for a JSON envelope. A message whose carrier
holds a valid ``traceparent`` continues that trace; a missing or malformed carrier (or a
function that raises) starts a new trace, never raises into the handler, and is counted
in ``ws_monitoring_trace_carriers_total{source="message",outcome=...}``.

Sampling
--------

``setup_tracing()`` samples with ``ParentBased(TraceIdRatioBased(sample_ratio))``, 1 % by
default (``sample_ratio=``, ``sampler=`` or ``OTEL_TRACES_SAMPLER``): a message whose
parent (upgrade header, message carrier) is sampled is sampled too. On top of the ratio,
messages whose handler raised, and messages handled slower than
``trace_slow_threshold`` (1 s by default), are always exported. The decision is taken
before the handler runs, as the ratio test on the trace id would take it (a sampled
message's trace id passes that test, so downstream samplers agree), and nothing is
built for a message that is not kept: at the default ratio, an unsampled message
costs a counter decrement. The trade-off: the spans the handler created under a
message first judged unsampled were dropped when they ended, so a kept error or slow
message arrives alone, without its children. For full traces of every message, use
``sample_ratio=1.0``.

Metrics and traces
------------------

When a message span is exported, its trace id becomes the exemplar of the
``websocket_message_duration_seconds`` bucket it fell in (visible in the OpenMetrics
format: ``Accept: application/openmetrics-text``), so a latency spike leads to a trace.

Export faults
-------------

Spans wait in a bounded queue (2048, ``OTEL_BSP_MAX_QUEUE_SIZE``) exported by a background
thread, in full batches (512, ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``) as soon as there is
one and what is left every ``OTEL_BSP_SCHEDULE_DELAY`` (5 s): a request costs about
the same whatever its size. A collector that is down, slow or refusing never blocks the
server, and spans that do not fit are dropped and counted:
``ws_monitoring_spans_dropped_total{reason}`` (``queue_full``, ``export_failed``,
``shutdown``), next to
``ws_monitoring_spans_exported_total``, in the registry of the servers
(``config.registry``, else prometheus_client's default). ``Tracing.shutdown(timeout)``
flushes within that deadline, and within the one deadline that every step of stopping
shares (:data:`ws_monitoring.core.SHUTDOWN_TIMEOUT`, 5 s, or
``WS_MONITORING_SHUTDOWN_TIMEOUT``): closing a server flushes, and at exit the provider
is shut down with what is left, so a collector that never answers delays the exit by
that deadline, not by the export timeout. With an application's own provider, its
processors do the exporting (and their drops are not counted here).

Privacy: span attributes go through the server's :class:`~ws_monitoring.privacy.Privacy`
scrubber; client addresses and user ids are the anonymized views unless the client
consented; close reasons are never exported; an exception's message only for clients
that consented to ``payload``; message payloads never.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ws_monitoring.config import Config
from ws_monitoring.core import at_exit, forget_at_exit, shutdown_step
from ws_monitoring.typing import Sink

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import TracerProvider

    from .export import ExportProcessor

__all__ = ["DEFAULT_SAMPLE_RATIO", "Tracing", "build_sink", "setup_tracing", "tracer"]

logger = logging.getLogger("ws_monitoring.tracing")

#: Share of root traces sampled by :func:`setup_tracing` when nothing else says.
DEFAULT_SAMPLE_RATIO = 0.01

_warned_missing = False


def _sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def build_sink(config: Config) -> Sink | None:
    """The tracing sink for ``config``, or ``None`` when tracing is off or unavailable.

    ``None`` (the core then has no message sink for tracing) when ``config.tracing`` is
    false, ``OTEL_SDK_DISABLED=true``, or the OpenTelemetry SDK is not installed (then
    with one warning per process if tracing was asked for: ``tracing=True``).
    """
    global _warned_missing
    if config.tracing is False or _sdk_disabled():
        return None
    try:
        from .sink import TracingSink
    except ImportError as exc:  # pragma: no cover - tested in a subprocess without it
        if config.tracing and not _warned_missing:
            _warned_missing = True
            logger.warning(
                "tracing is on but OpenTelemetry is not installed (%s): no spans; install "
                "ws-monitoring[tracing] or pass tracing=False",
                exc,
            )
        return None
    return TracingSink(config)


# -- setup -----------------------------------------------------------------------------


class Tracing:
    """What :func:`setup_tracing` set up: ``provider`` (``None`` when disabled), ``owned``.

    Use it as a context manager, or call :meth:`shutdown` when the server stops.
    """

    def __init__(
        self,
        provider: TracerProvider | None,
        *,
        owned: bool,
        processor: ExportProcessor | None = None,
    ) -> None:
        self.provider = provider
        #: True when :func:`setup_tracing` created the provider (and so may shut it down).
        self.owned = owned
        self.processor = processor

    def force_flush(self, timeout: float = 5.0) -> bool:
        """Export the spans queued now within ``timeout`` seconds; ``False`` if late."""
        if self.processor is not None:
            return self.processor.flush(timeout)
        flush = getattr(self.provider, "force_flush", None)
        return bool(flush(int(timeout * 1000))) if flush is not None else True

    def shutdown(self, timeout: float | None = None) -> bool:
        """Flush, then stop exporting, within ``timeout`` seconds and within the shared
        shutdown deadline (:func:`ws_monitoring.core.shutdown_step`); ``False`` if late.

        Blocks the calling thread (from async code: ``asyncio.to_thread``). Spans not
        sent by the deadline are dropped and counted. A provider that
        :func:`setup_tracing` did not create is only flushed. At exit, a provider it
        created is shut down this way (the SDK's own exit hook, which would wait up to
        the export timeout once more, is off).
        """
        with shutdown_step(timeout) as deadline:
            if not self.owned or self.processor is None or self.provider is None:
                return self.force_flush(max(0.0, deadline - time.monotonic()))
            forget_at_exit(self.shutdown)
            flushed = self.processor.flush(max(0.0, deadline - time.monotonic()))
            self.processor.shutdown(max(0.0, deadline - time.monotonic()))
            self.provider.shutdown()  # type: ignore[attr-defined]
        return flushed

    def __enter__(self) -> Tracing:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _env_number(name: str, default: float) -> float:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None


_PROTOCOLS = ("http/protobuf", "grpc")


def setup_tracing(
    service_name: str | None = None,
    *,
    endpoint: str | None = None,
    protocol: str | None = None,
    sampler: Sampler | None = None,
    sample_ratio: float | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = None,
    compression: str | None = None,
    resource_attributes: Mapping[str, Any] | None = None,
    max_queue_size: int | None = None,
    max_export_batch_size: int | None = None,
    schedule_delay: float | None = None,
) -> Tracing:
    """Install an SDK ``TracerProvider`` exporting spans over OTLP; returns its handle.

    Arguments override the ``OTEL_*`` variables (see the module docstring):

    * ``endpoint``: OTLP/HTTP URL (``/v1/traces`` is appended when it has no path) or
      gRPC ``http://host:4317`` (plaintext) / ``https://...``. Default
      ``http://localhost:4318/v1/traces`` or ``http://localhost:4317``.
    * ``protocol``: ``"http/protobuf"`` (default) or ``"grpc"`` (needs ``grpcio``).
    * ``sampler``, else ``sample_ratio`` (``ParentBased(TraceIdRatioBased(ratio))``),
      else ``OTEL_TRACES_SAMPLER``, else :data:`DEFAULT_SAMPLE_RATIO`.
    * ``timeout``: seconds per export, retries included (10). ``compression``: ``gzip``,
      ``deflate`` or ``none``. ``schedule_delay``: seconds between exports (5).
    * ``max_queue_size`` (2048): spans waiting for export beyond it are dropped and
      counted; ``max_export_batch_size`` (512) spans per request.

    An application that already set its own provider keeps it: the handle then has
    ``owned=False``. With ``OTEL_SDK_DISABLED=true`` nothing is installed
    (``provider`` is ``None``).

    Raises:
        ImportError: OpenTelemetry's SDK (or ``grpcio`` for gRPC) is not installed.
        ValueError: an unknown protocol or compression, a ratio outside [0, 1], an
            invalid endpoint or ``OTEL_BSP_*`` value.
    """
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.util.re import parse_env_headers
    except ImportError as exc:
        raise ImportError(
            "setup_tracing() needs OpenTelemetry's SDK: pip install 'ws-monitoring[tracing]'"
        ) from exc

    from . import export as otlp_export
    from .sink import SCOPE, MonitoringTracerProvider

    if _sdk_disabled():
        return Tracing(None, owned=False)
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        logger.info("setup_tracing: the application's tracer provider is kept")
        return Tracing(current, owned=False)

    protocol = protocol or _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = protocol or "http/protobuf"
    if protocol not in _PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(_PROTOCOLS)}, got {protocol!r}")
    if compression is None:
        compression = _env(
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"
        )
    compression = None if compression in (None, "none") else compression
    env_headers = _env("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS") or ""
    all_headers = {**parse_env_headers(env_headers, liberal=True), **(headers or {})}
    if timeout is None:
        timeout = _env_number(
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            _env_number("OTEL_EXPORTER_OTLP_TIMEOUT", 10.0),
        )
    tls: dict[str, Any] = {
        "certificate_file": _env(
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"
        ),
        "client_certificate_file": _env(
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        ),
        "client_key_file": _env(
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY"
        ),
    }
    sender: otlp_export.Sender
    if protocol == "grpc":
        url = endpoint or _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
        insecure = _env("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE")
        sender = otlp_export.GrpcSender(
            url or "http://localhost:4317",
            headers=all_headers,
            compression=compression,
            insecure=None if insecure is None else insecure.lower() == "true",
            **tls,
        )
    else:
        if endpoint is not None:
            has_path = urlsplit(endpoint).path.strip("/")
            url = endpoint if has_path else endpoint.rstrip("/") + "/v1/traces"
        elif (signal := _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) is not None:
            url = signal
        else:
            base = _env("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
            url = base.rstrip("/") + "/v1/traces"
        sender = otlp_export.HttpSender(url, headers=all_headers, compression=compression, **tls)

    if sampler is None and sample_ratio is not None:
        sampler = ParentBased(TraceIdRatioBased(sample_ratio))
    if sampler is None and _env("OTEL_TRACES_SAMPLER") is None:
        sampler = ParentBased(TraceIdRatioBased(DEFAULT_SAMPLE_RATIO))
    attributes = dict(resource_attributes or {})
    if service_name is not None:
        attributes["service.name"] = service_name
    resource = Resource.create(attributes)
    queue = max_queue_size or int(_env_number("OTEL_BSP_MAX_QUEUE_SIZE", 2048))
    batch = max_export_batch_size or int(_env_number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512))
    delay = schedule_delay or _env_number("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
    processor = otlp_export.ExportProcessor(
        sender,
        resource,
        SCOPE,
        max_queue_size=queue,
        max_export_batch_size=batch,
        schedule_delay=delay,
        export_timeout=timeout,
    )
    # sampler=None lets the SDK read OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG.
    provider = MonitoringTracerProvider(
        processor, sampler=sampler, resource=resource, shutdown_on_exit=False
    )
    trace.set_tracer_provider(provider)
    tracing = Tracing(provider, owned=True, processor=processor)
    # Instead of the provider's own exit hook: within the shared shutdown deadline.
    at_exit(tracing.shutdown)
    return tracing


# -- the handler's tracer ------------------------------------------------------------------

try:
    from opentelemetry import trace as _trace
    from opentelemetry.util._decorator import _agnosticcontextmanager
except ImportError:  # pragma: no cover - exercised in a subprocess without OpenTelemetry
    _trace = None  # type: ignore[assignment]


if _trace is not None:

    class _CurrentTracer(_trace.Tracer):
        """A tracer that follows the global provider, even one set (or reset) later."""

        def __init__(self) -> None:
            self._provider: object = None
            self._tracer: _trace.Tracer = _trace.NoOpTracer()

        def _current(self) -> _trace.Tracer:
            provider = _trace.get_tracer_provider()
            if provider is not self._provider:
                self._tracer = provider.get_tracer("ws_monitoring", "0.1.0")
                self._provider = provider
            return self._tracer

        def start_span(self, *args: Any, **kwargs: Any) -> _trace.Span:
            return self._current().start_span(*args, **kwargs)

        @_agnosticcontextmanager
        def start_as_current_span(self, *args: Any, **kwargs: Any) -> Iterator[_trace.Span]:
            with self._current().start_as_current_span(*args, **kwargs) as span:
                yield span

    #: A tracer for handler code: ``with tracer.start_as_current_span("work"): ...``.
    tracer: Any = _CurrentTracer()
else:  # pragma: no cover - exercised in a subprocess without OpenTelemetry
    import contextlib

    class _NoSpan:
        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

        def is_recording(self) -> bool:
            return False

    class _NoTracer:
        """Stands in for a tracer when OpenTelemetry is not installed: spans do nothing."""

        def start_span(self, *args: Any, **kwargs: Any) -> Any:
            return _NoSpan()

        @contextlib.contextmanager
        def start_as_current_span(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
            yield _NoSpan()

    tracer = _NoTracer()
