"""The OTLP export pipeline on its own: wire format, bounded queue, HTTP(S) and gRPC senders.

The encoder is checked against OpenTelemetry's own encoder and decoded with
``opentelemetry-proto``; senders talk to real receivers on loopback.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from tests.helpers.otlp import OtlpHttpReceiver, decode_value
from tests.helpers.servers import HOST
from tests.helpers.system import free_port, require_binary
from ws_monitoring.tracing import export as otlp

RESOURCE = Resource.create({"service.name": "wire", "host.cores": 2, "ok": True})
SCOPE = InstrumentationScope("ws_monitoring", "0.1.0", attributes={"scope.attr": "s"})
SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def _context(trace_id: int, span_id: int, *, remote: bool = False, **kw: Any) -> SpanContext:
    return SpanContext(trace_id, span_id, remote, SAMPLED, **kw)


def full_span() -> ReadableSpan:
    """A span using every field the encoder knows."""
    return ReadableSpan(
        "everything",
        _context(0x1234, 0x99, trace_state=TraceState([("a", "1"), ("b", "2")])),
        _context(0x1234, 0x42, remote=True),
        RESOURCE,
        {
            "s": "text é",
            "b": False,
            "i": -5,
            "big": 2**62,
            "f": 1.5,
            "ls": ["x", "y"],
            "li": [1, 2],
            "lb": [True],
            "lf": [0.25],
        },
        [Event("ev", {"k": "v", "n": 3}, 1_000), Event("bare", None, 2_000)],
        [
            Link(_context(0x5678, 0x77), {"link.attr": 1}),
            Link(_context(0x9ABC, 0x88, remote=True)),
        ],
        SpanKind.SERVER,
        None,
        Status(StatusCode.ERROR, "bad"),
        10,
        20,
        SCOPE,
    )


def http_processor(url: str, **options: Any) -> otlp.ExportProcessor:
    """An export processor for ``RESOURCE`` and ``SCOPE`` sending to ``url`` over HTTP,
    counting into ``ExportStats`` of its own (``processor.stats``) unless given some."""
    options.setdefault("stats", otlp.ExportStats())
    return otlp.ExportProcessor(otlp.HttpSender(url), RESOURCE, SCOPE, **options)


def our_request(spans: list[ReadableSpan]) -> ExportTraceServiceRequest:
    processor = http_processor(f"http://{HOST}:1/v1/traces", schedule_delay=60)
    try:
        body = processor._encode(spans)
    finally:
        processor.shutdown(0)
    return ExportTraceServiceRequest.FromString(body)


def test_encoder_matches_opentelemetry_encoder() -> None:
    spans = [full_span(), ReadableSpan("minimal", _context(1, 2), resource=RESOURCE)]
    ours = our_request(spans)
    theirs = encode_spans(spans)
    # OpenTelemetry's encoder leaves the trace flags out of the span flags; ours sets them.
    for rs in ours.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                assert span.flags & 0xFF == 0x01
                assert all(link.flags & 0xFF == 0x01 for link in span.links)
    assert _same_but_flags(ours, theirs)


def test_spans_are_grouped_by_resource_and_scope() -> None:
    other = Resource.create({"service.name": "other"})
    spans = [
        ReadableSpan("a", _context(1, 2), resource=RESOURCE, instrumentation_scope=SCOPE),
        ReadableSpan("b", _context(1, 3), resource=other, instrumentation_scope=None),
        ReadableSpan("c", _context(1, 4), resource=RESOURCE, instrumentation_scope=SCOPE),
    ]
    request = our_request(spans)
    groups = [
        (
            next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name"),
            [[s.name for s in ss.spans] for ss in rs.scope_spans],
        )
        for rs in request.resource_spans
    ]
    assert groups == [("wire", [["a", "c"]]), ("other", [["b"]])]
    assert _same_but_flags(request, encode_spans(spans))


def _same_but_flags(a: ExportTraceServiceRequest, b: ExportTraceServiceRequest) -> bool:
    for request in (a, b):
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    span.flags &= ~0xFF
                    for link in span.links:
                        link.flags &= ~0xFF
                    if span.status.code == 0 and not span.status.message:
                        # An empty status is the default: we leave it out.
                        span.ClearField("status")
    return a == b


@pytest.mark.parametrize(
    "value",
    [
        "s",
        "",
        True,
        0,
        -1,
        2**63 - 1,
        -(2**63),
        1e-300,
        b"\x00raw",
        None,
        ["x", 1, None],
        {"nested": {"list": [1.5, "a"]}},
        (),
    ],
)
def test_any_value_round_trips(value: Any) -> None:
    decoded = decode_value(AnyValue.FromString(otlp.any_value(value)))
    expected = list(value) if isinstance(value, tuple) else value
    assert decoded == expected


def test_unsupported_attribute_values_are_skipped() -> None:
    with pytest.raises(TypeError, match="object"):
        otlp.any_value(object())
    encoded = otlp.attributes(b"\x0a", {"good": 1, "bad": object(), "also": "x"})
    keys = []
    rest = encoded
    while rest:
        assert rest[0] == 0x0A
        size = rest[1]
        keys.append(KeyValue.FromString(rest[2 : 2 + size]).key)
        rest = rest[2 + size :]
    assert keys == ["good", "also"]


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32, 2**64 - 1])
def test_varint(value: int) -> None:
    encoded = otlp.varint(value)
    assert otlp._read_varint(encoded, 0) == (value, len(encoded))


def test_rejected_spans_parsing() -> None:
    response = ExportTraceServiceResponse()
    assert otlp.rejected_spans(response.SerializeToString()) == 0
    response.partial_success.rejected_spans = 5
    response.partial_success.error_message = "too old"
    assert otlp.rejected_spans(response.SerializeToString()) == 5
    # Unknown fixed-size fields are skipped.
    fixed = b"\x15\x01\x02\x03\x04" + b"\x19" + bytes(8)
    assert otlp.rejected_spans(fixed + response.SerializeToString()) == 5
    # A malformed answer counts as nothing rejected.
    for garbage in (b"\x0a\x05\x08", b"\x0f", b"\x0a\xff", b"\x08" + b"\xff" * 11):
        assert otlp.rejected_spans(garbage) == 0
    # Other fields and wire types where partial_success would be are ignored.
    assert otlp.rejected_spans(b"\x08\x01" + b"\x0a\x02\x12\x00") == 0
    negative = ExportTraceServiceResponse()
    negative.partial_success.rejected_spans = -1
    assert otlp.rejected_spans(negative.SerializeToString()) == 0


def test_retry_after_values() -> None:
    assert otlp._retry_after(None) is None
    assert otlp._retry_after("2.5") == 2.5
    assert otlp._retry_after("-3") == 0.0
    assert otlp._retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None


# -- the processor ---------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[OtlpHttpReceiver]:
    running = OtlpHttpReceiver()
    yield running
    running.close()


def encoded_span(n: int) -> bytes:
    return otlp.span(n + 1, n + 1, 0, otlp.string_field(b"\x2a", f"s{n}"), b"\x30\x01", 1, 2, 1)


def test_bounded_queue_drops_and_counts(receiver: OtlpHttpReceiver) -> None:
    receiver.delay = 5.0
    processor = http_processor(
        receiver.traces_url, max_queue_size=4, max_export_batch_size=1, schedule_delay=60
    )
    stats = processor.stats
    processor.offer_encoded(encoded_span(0))
    _wait_for(lambda: receiver.attempts == 1)  # the export thread is busy now
    for n in range(1, 11):
        processor.offer_encoded(encoded_span(n))
    assert stats.snapshot() == ({"queue_full": 6, "export_failed": 0, "shutdown": 0}, 0)
    processor.shutdown(0.1)  # aborts the export in flight
    processor.offer_encoded(encoded_span(99))
    _wait_for(lambda: stats.snapshot()[0]["export_failed"] == 1)
    assert stats.snapshot() == ({"queue_full": 6, "export_failed": 1, "shutdown": 5}, 0)
    processor.shutdown(1)  # idempotent
    assert receiver.spans == []


def test_full_batches_go_at_once_the_rest_on_schedule(receiver: OtlpHttpReceiver) -> None:
    started = time.monotonic()
    processor = http_processor(receiver.traces_url, max_export_batch_size=4, schedule_delay=0.5)
    for n in range(10):
        processor.offer_encoded(encoded_span(n))
    _wait_for(lambda: receiver.requests == 2)
    # Two full batches, at once; the two spans left wait for the schedule.
    assert [s.name for s in receiver.spans] == [f"s{n}" for n in range(8)]
    _wait_for(lambda: len(receiver.spans) == 10)
    assert time.monotonic() - started >= 0.5
    assert receiver.requests == 3
    processor.offer_encoded(encoded_span(10))
    assert processor.flush(5)  # a flush does not wait for the schedule
    assert receiver.requests == 4
    processor.shutdown(1)
    assert processor.stats.snapshot() == ({"queue_full": 0, "export_failed": 0, "shutdown": 0}, 11)


def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.005)


def test_shutdown_counts_what_it_could_not_send(receiver: OtlpHttpReceiver) -> None:
    receiver.delay = 2.0
    processor = http_processor(
        receiver.traces_url, max_export_batch_size=1, schedule_delay=0.01, export_timeout=10
    )
    stats = processor.stats
    for n in range(3):
        processor.offer_encoded(encoded_span(n))
    _wait_for(lambda: receiver.attempts > 0, timeout=5)
    processor.shutdown(0.1)
    # One batch in flight (failed: the connection was closed under it), two never sent.
    _wait_for(lambda: sum(stats.snapshot()[0].values()) + stats.snapshot()[1] >= 3)
    dropped, exported = stats.snapshot()
    assert dropped["shutdown"] == 2
    assert dropped["export_failed"] + exported == 1
    assert processor.flush(1) is True  # nothing left: the thread is gone


def test_unencodable_span_is_counted(receiver: OtlpHttpReceiver) -> None:
    processor = http_processor(receiver.traces_url, schedule_delay=60)
    stats = processor.stats
    broken = ReadableSpan("broken", _context(1, 2), resource=RESOURCE, kind=None)  # type: ignore[arg-type]
    processor.on_end(broken)
    processor.on_end(ReadableSpan("unsampled", SpanContext(1, 3, False), resource=RESOURCE))
    assert processor.flush(5)
    processor.shutdown(1)
    assert stats.snapshot() == ({"queue_full": 0, "export_failed": 1, "shutdown": 0}, 0)
    assert receiver.requests == 0


def test_unexpected_sender_error_is_counted(receiver: OtlpHttpReceiver) -> None:
    stats = otlp.ExportStats()
    # http.client refuses a header value with a line break (ValueError, not OSError).
    sender = otlp.HttpSender(receiver.traces_url, headers={"x-bad": "a\r\nb"})
    processor = otlp.ExportProcessor(sender, RESOURCE, SCOPE, schedule_delay=60, stats=stats)
    processor.offer_encoded(encoded_span(1))
    assert processor.flush(5)
    processor.shutdown(1)
    assert stats.snapshot()[0]["export_failed"] == 1


def test_connection_is_reused_and_timeouts_counted(receiver: OtlpHttpReceiver) -> None:
    stats = otlp.ExportStats()
    sender = otlp.HttpSender(receiver.traces_url, compression="gzip")
    processor = otlp.ExportProcessor(
        sender, RESOURCE, SCOPE, max_export_batch_size=1, schedule_delay=60, stats=stats,
        export_timeout=0.3,
    )  # fmt: skip
    for n in range(3):
        processor.offer_encoded(encoded_span(n))
    assert processor.flush(5)
    assert [s.name for s in receiver.spans] == ["s0", "s1", "s2"]
    receiver.delay = 1.0  # longer than the export timeout
    processor.offer_encoded(encoded_span(3))
    assert processor.flush(5)
    processor.shutdown(1)
    assert stats.snapshot() == ({"queue_full": 0, "export_failed": 1, "shutdown": 0}, 3)


def test_refused_connection_gives_up_at_the_deadline() -> None:
    sender = otlp.HttpSender(f"http://{HOST}:{free_port()}/v1/traces")
    with pytest.raises(otlp.ExportError, match="ConnectionRefusedError"):
        sender.send(b"", time.monotonic() + 0.5)
    with pytest.raises(otlp.ExportError, match="timed out"):
        sender.send(b"", time.monotonic() - 1)
    sender.close()
    with pytest.raises(otlp.ExportError, match="timed out"):
        sender.send(b"", time.monotonic() + 5)


def test_retry_waits_for_retry_after(receiver: OtlpHttpReceiver) -> None:
    receiver.status = 503
    receiver.retry_after = "30"  # beyond the deadline: give up at once
    sender = otlp.HttpSender(receiver.traces_url)
    with pytest.raises(otlp.ExportError, match="HTTP 503"):
        sender.send(b"", time.monotonic() + 2)
    assert receiver.attempts == 1


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    openssl = require_binary("openssl", "openssl")
    directory: Path = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


def test_https_with_a_private_ca(certificate: tuple[str, str]) -> None:
    cert, key = certificate
    receiver = OtlpHttpReceiver(tls=(cert, key))
    try:
        sender = otlp.HttpSender(
            receiver.traces_url,
            certificate_file=cert,
            client_certificate_file=cert,
            client_key_file=key,
        )
        body = otlp.request([_group([encoded_span(1)])])
        assert sender.send(body, time.monotonic() + 10) == 0
        assert [s.name for s in receiver.spans] == ["s1"]
        sender.close()
        untrusted = otlp.HttpSender(receiver.traces_url)  # the system CAs do not know it
        with pytest.raises(otlp.ExportError, match="SSL"):
            untrusted.send(body, time.monotonic() + 0.5)
        untrusted.close()
    finally:
        receiver.close()


def _group(spans: list[bytes]) -> Any:
    group = otlp._Group(otlp.resource(RESOURCE), "")
    group.scopes[0] = (otlp.scope(SCOPE), "", spans)
    return group


def test_grpc_sender_channels(certificate: tuple[str, str]) -> None:
    cert, key = certificate
    # TLS channels are built without connecting: the first export would.
    for endpoint, kwargs in [
        ("collector:4317", {}),
        ("https://collector:4317", {"certificate_file": cert}),
        ("http://collector:4317", {"insecure": False, "client_key_file": key,
                                   "client_certificate_file": cert, "certificate_file": cert}),
        ("http://collector:4317", {"compression": "deflate"}),
    ]:  # fmt: skip
        sender = otlp.GrpcSender(endpoint, **kwargs)
        assert sender.endpoint == endpoint
        sender.close()
    with pytest.raises(ValueError, match="compression"):
        otlp.GrpcSender("collector:4317", compression="zstd")


def test_dropped_counts_and_schema_urls() -> None:
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider

    provider = TracerProvider(span_limits=SpanLimits(max_attributes=1, max_events=1, max_links=1))
    tracer = provider.get_tracer("lib", schema_url="https://opentelemetry.io/schemas/1.26.0")
    span = tracer.start_span(
        "limited",
        attributes={"a": 1, "b": 2},
        links=[Link(_context(5, 6)), Link(_context(7, 8))],
    )
    span.add_event("one")
    span.add_event("two")
    span.end()
    schema_resource = Resource({"service.name": "s"}, "https://opentelemetry.io/schemas/1.25.0")
    versionless = ReadableSpan(
        "plain",
        _context(1, 2),
        resource=schema_resource,
        instrumentation_scope=InstrumentationScope("noversion"),
    )
    spans = [span, versionless]  # type: ignore[list-item]
    ours = our_request(spans)
    limited = ours.resource_spans[0].scope_spans[0].spans[0]
    assert (
        limited.dropped_attributes_count,
        limited.dropped_events_count,
        limited.dropped_links_count,
    ) == (1, 1, 1)
    assert ours.resource_spans[0].scope_spans[0].schema_url.endswith("1.26.0")
    assert ours.resource_spans[1].schema_url.endswith("1.25.0")
    assert ours.resource_spans[1].scope_spans[0].scope.version == ""
    assert _same_but_flags(ours, encode_spans(spans))
    provider.shutdown()


def test_encoded_resources_cache_stays_bounded(receiver: OtlpHttpReceiver) -> None:
    processor = http_processor(receiver.traces_url, schedule_delay=60)
    try:
        for n in range(100):
            res = Resource({"service.name": f"s{n}"})
            processor._encode([ReadableSpan("x", _context(1, 2), resource=res)])
        assert len(processor._cache) <= 65
    finally:
        processor.shutdown(1)


def test_grpc_sender_after_close() -> None:
    sender = otlp.GrpcSender(f"http://{HOST}:{free_port()}")
    sender.close()
    with pytest.raises(otlp.ExportError, match="timed out"):
        sender.send(b"", time.monotonic() + 5)


def test_http_backoff_retries_then_succeeds(receiver: OtlpHttpReceiver) -> None:
    receiver.statuses.extend([502, 504])  # no Retry-After: exponential backoff
    receiver.keep_alive = False
    sender = otlp.HttpSender(receiver.traces_url, backoff=0.01)
    body = otlp.request([_group([encoded_span(1)])])
    assert sender.send(body, time.monotonic() + 10) == 0
    assert receiver.attempts == 3
    assert [s.name for s in receiver.spans] == ["s1"]
    assert sender.send(body, time.monotonic() + 10) == 0  # a new connection
    sender.close()


def test_grpc_backoff_retries_until_the_deadline() -> None:
    sender = otlp.GrpcSender(f"http://{HOST}:{free_port()}", backoff=0.01)
    started = time.monotonic()
    with pytest.raises(otlp.ExportError, match="UNAVAILABLE"):
        sender.send(b"", started + 0.5)
    sender.close()
