"""Message sampling at a ratio: the share, exact at 0 and 1, and what handlers see.

Each test drives the real core (:class:`~ws_monitoring.core.Monitor` and its records)
the way the adapters do, with the tracing sink bound to a provider from
``setup_tracing`` that exports to a real OTLP/HTTP receiver; the spans asserted on
are the ones the receiver decoded. Every connection runs in a context of its own, as
each handler runs in a task of its own. The module-level ``random`` generator the
sink draws from is seeded: the counts are reproducible.
"""

from __future__ import annotations

import contextvars
import math
import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry.util._once import Once
from prometheus_client import CollectorRegistry
from websockets.datastructures import Headers
from websockets.http11 import Request

from tests.helpers.otlp import OtlpHttpReceiver, ReceivedSpan
from ws_monitoring.config import Config
from ws_monitoring.core import ConnectionRecord, Monitor
from ws_monitoring.tracing.setup import Tracing, setup_tracing, tracer
from ws_monitoring.tracing.sink import TracingSink

LOW_64 = (1 << 64) - 1


def _reset_globals() -> None:
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def receiver() -> Iterator[OtlpHttpReceiver]:
    _reset_globals()
    running = OtlpHttpReceiver()
    yield running
    running.close()
    _reset_globals()


class _Connection:
    """What ``Monitor.open`` reads from a websockets connection."""

    def __init__(self) -> None:
        self.id = uuid.uuid4()
        self.request = Request("/chat", Headers({"Host": "example"}))
        self.remote_address = ("203.0.113.7", 40000)
        self.subprotocol = None


def serve(
    tracing: Tracing,
    connections: int,
    messages: int,
    handle: Callable[[int], None] = lambda n: None,
    **options: Any,
) -> None:
    """``connections`` connections, each handing ``messages`` messages to ``handle``
    (called with the message's number, inside the message, in the connection's own
    context), then closing; returns once the exporter flushed."""
    config = Config(registry=CollectorRegistry(), metrics=False, **options)
    monitor = Monitor(config, [TracingSink(config)])

    def connection() -> None:
        conn = _Connection()
        handshake = monitor.handshake_started()
        monitor.handshake_finished(
            handshake, request=conn.request, response=None, accepted=True,
            remote_address=conn.remote_address,
        )  # fmt: skip
        record = monitor.open(conn, handshake=handshake, record=ConnectionRecord(monitor))
        for n in range(messages):
            record.message_handed(f"message {n}")
            handle(n)
            record.message_done()
        for sink in monitor.sinks:
            sink.connection_closed(record)

    for _ in range(connections):
        contextvars.copy_context().run(connection)
    assert tracing.force_flush(30)


def processed(receiver: OtlpHttpReceiver) -> list[ReceivedSpan]:
    return receiver.named("process /chat")


def passes(span: ReceivedSpan, ratio: float) -> bool:
    """The ratio test of ``TraceIdRatioBased`` on the span's trace id."""
    return int(span.trace_id, 16) & LOW_64 < round(ratio * (LOW_64 + 1))


@pytest.mark.parametrize(
    ("connections", "messages"),
    [(1, 60_000), (12_000, 5)],
    ids=["one long connection", "many short ones"],
)
def test_the_sampled_share_is_the_ratio(
    receiver: OtlpHttpReceiver, connections: int, messages: int
) -> None:
    random.seed(1234)
    ratio = 0.05
    tracing = setup_tracing(endpoint=receiver.url, sample_ratio=ratio, max_queue_size=1 << 17)
    try:
        serve(tracing, connections, messages)
    finally:
        tracing.shutdown(5)
    spans = processed(receiver)
    total = connections * messages
    expected = total * ratio
    # A binomial count: within 4 standard deviations (the seed makes it reproducible).
    assert abs(len(spans) - expected) < 4 * math.sqrt(expected * (1 - ratio))
    # Their ids are what the ratio test of TraceIdRatioBased would have sampled.
    assert all(passes(span, ratio) for span in spans)
    assert len({span.trace_id for span in spans}) == len(spans)


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_ratios_zero_and_one_are_exact(receiver: OtlpHttpReceiver, ratio: float) -> None:
    tracing = setup_tracing(endpoint=receiver.url, sample_ratio=ratio, max_queue_size=1 << 15)
    try:
        serve(tracing, 4, 2_500)
    finally:
        tracing.shutdown(5)
    assert len(processed(receiver)) == (10_000 if ratio == 1.0 else 0)


def test_errors_are_kept_with_ids_the_ratio_did_not_sample(receiver: OtlpHttpReceiver) -> None:
    random.seed(99)
    ratio = 0.25
    tracing = setup_tracing(endpoint=receiver.url, sample_ratio=ratio)
    config = Config(registry=CollectorRegistry(), metrics=False)
    monitor = Monitor(config, [TracingSink(config)])
    record = monitor.open(_Connection(), record=ConnectionRecord(monitor))
    boom = ValueError("boom")

    def run() -> None:
        for _ in range(400):
            record.message_handed("x")
            record.message_done(boom)

    try:
        contextvars.copy_context().run(run)
        assert tracing.force_flush(10)
    finally:
        tracing.shutdown(5)
    spans = processed(receiver)
    assert len(spans) == 400  # every failed message, sampled or not
    assert all(span.status == "ERROR" and span.flags & 0xFF == 0x03 for span in spans)
    sampled = [span for span in spans if passes(span, ratio)]
    # Unsampled ones got ids outside the sampled range: a downstream ratio test agrees.
    assert 60 < len(sampled) < 140
    assert all(span.links == [] and span.parent_span_id == "" for span in spans)


def test_slow_messages_are_kept_and_handler_spans_follow_the_decision(
    receiver: OtlpHttpReceiver,
) -> None:
    random.seed(5)
    ratio = 0.3
    seen: list[tuple[bool, bool, int]] = []

    def handle(n: int) -> None:
        current = trace.get_current_span()
        with tracer.start_as_current_span("child") as child:
            seen.append(
                (
                    current.get_span_context().trace_flags.sampled,
                    child.is_recording(),
                    child.get_span_context().trace_id,
                )
            )
        assert not current.is_recording()  # the message span is never built up front

    tracing = setup_tracing(endpoint=receiver.url, sample_ratio=ratio, max_queue_size=1 << 14)
    try:
        # Every message is slower than a 0 s threshold: all are kept.
        serve(tracing, 50, 40, handle, trace_slow_threshold=0.0)
    finally:
        tracing.shutdown(5)
    messages = processed(receiver)
    assert len(messages) == 2_000
    sampled = {span.span_id: span for span in messages if passes(span, ratio)}
    children = receiver.named("child")
    # Children exist for the messages sampled up front only, as children of them.
    assert len(children) == len(sampled) == sum(recording for _, recording, _ in seen)
    assert all((flag, rec) in ((True, True), (False, False)) for flag, rec, _ in seen)
    for child in children:
        parent = sampled[child.parent_span_id]
        assert child.trace_id == parent.trace_id
    # Unsampled messages' handler spans share one unsampled trace per connection,
    # which the ratio test would not have sampled either.
    unsampled = {trace_id for _, rec, trace_id in seen if not rec}
    assert len(unsampled) <= 50
    assert all(trace_id & LOW_64 >= round(ratio * (LOW_64 + 1)) for trace_id in unsampled)


def test_a_carrier_without_a_parent_is_sampled_by_the_ratio(receiver: OtlpHttpReceiver) -> None:
    """Baggage from a message reaches the handler even when its message is unsampled."""
    random.seed(3)
    ratio = 0.2
    seen: list[tuple[object, bool]] = []

    def handle(n: int) -> None:
        current = trace.get_current_span().get_span_context()
        seen.append((baggage.get_baggage("room"), current.trace_flags.sampled))

    tracing = setup_tracing(endpoint=receiver.url, sample_ratio=ratio)
    try:
        serve(tracing, 5, 200, handle, context_from_message=lambda m: {"baggage": "room=7"})
    finally:
        tracing.shutdown(5)
    assert {room for room, _ in seen} == {"7"}
    sampled = sum(flag for _, flag in seen)
    assert len(processed(receiver)) == sampled
    assert 140 < sampled < 260  # 1 000 messages at 20 %


def test_every_size_is_encoded(receiver: OtlpHttpReceiver) -> None:
    """Sizes past the cache of encoded size attributes, and past one varint byte."""
    sizes = [*range(1_200), 16_383, 16_384, 70_000]
    tracing = setup_tracing(endpoint=receiver.url, sample_ratio=1.0, max_queue_size=4096)
    config = Config(registry=CollectorRegistry(), metrics=False)
    monitor = Monitor(config, [TracingSink(config)])
    record = monitor.open(_Connection(), record=ConnectionRecord(monitor))

    def run() -> None:
        for size in sizes:
            record.message_handed(b"\x00" * size if size % 2 else "é" * (size // 2))
            record.message_done()

    try:
        contextvars.copy_context().run(run)
        assert tracing.force_flush(10)
    finally:
        tracing.shutdown(5)
    got = sorted(
        (s.attributes["messaging.message.body.size"], s.attributes["websocket.message.type"])
        for s in processed(receiver)
    )
    assert got == sorted((size, "binary" if size % 2 else "text") for size in sizes)
