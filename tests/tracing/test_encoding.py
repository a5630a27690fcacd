"""Message spans encoded straight to OTLP say what the same spans built by the SDK say.

The sink exports a kept message span either pre-encoded (its provider's only processor
is the OTLP export processor) or as an SDK ``ReadableSpan`` (another processor was
added). Both paths run here on the same inputs, against a real OTLP/HTTP receiver
decoding with ``opentelemetry-proto``: the decoded spans must be equal.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanContext, TraceFlags, TraceState
from opentelemetry.util._once import Once
from prometheus_client import CollectorRegistry
from websockets.datastructures import Headers
from websockets.http11 import Request

from tests.helpers.otlp import OtlpHttpReceiver, ReceivedSpan
from ws_monitoring.config import Config
from ws_monitoring.core import ConnectionRecord, Monitor
from ws_monitoring.tracing import sink as tracing_sink
from ws_monitoring.tracing.setup import setup_tracing


@pytest.fixture
def receiver() -> Iterator[OtlpHttpReceiver]:
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    running = OtlpHttpReceiver()
    yield running
    running.close()
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


class _Connection:
    def __init__(self) -> None:
        self.id = uuid.UUID(int=7)
        self.request = Request("/rooms/lobby", Headers({"Host": "example"}))
        self.remote_address = ("2001:db8::5", 40000)
        self.subprotocol = None


def _failure() -> BaseException:
    try:
        raise KeyError("k")
    except KeyError as exc:
        return exc


REMOTE = SpanContext(
    0x0AF7651916CD43DD8448EB211C80319C,
    0xB7AD6B7169203331,
    True,
    TraceFlags(1),
    TraceState([("vendor", "v1")]),
)


@pytest.mark.parametrize("parent", [None, REMOTE], ids=["root", "remote parent"])
@pytest.mark.parametrize("error", [None, _failure()], ids=["ok", "error"])
@pytest.mark.parametrize(("size", "binary"), [(5, False), (70_000, True)])
def test_encoded_and_sdk_message_spans_are_the_same(
    receiver: OtlpHttpReceiver,
    parent: SpanContext | None,
    error: BaseException | None,
    size: int,
    binary: bool,
) -> None:
    tracing = setup_tracing("enc", endpoint=receiver.url, sample_ratio=1.0)
    assert tracing.processor is not None
    config = Config(registry=CollectorRegistry(), metrics=False)
    sink = tracing_sink.TracingSink(config)
    monitor = Monitor(config, [sink])
    handshake = monitor.handshake_started()
    conn = _Connection()
    monitor.handshake_finished(
        handshake, request=conn.request, response=None, accepted=True,
        remote_address=conn.remote_address,
    )  # fmt: skip
    record = monitor.open(conn, handshake=handshake, record=ConnectionRecord(monitor))
    state = parent.trace_state if parent is not None else tracing_sink._DEFAULT_STATE
    trace_id = parent.trace_id if parent is not None else 0x1234 << 64 | 0x42
    spans: list[ReceivedSpan] = []
    try:
        for exclusive in (True, False):
            tracing.processor.exclusive = exclusive
            tracing_sink._emit(
                record, record.tracing_state, "process", trace_id, 0x99, 0x03, parent, state,
                1_000, 2_000 + size, size, binary, error,
            )  # fmt: skip
            assert tracing.force_flush(5)
            [span] = receiver.named("process /rooms/lobby")[len(spans) :]
            spans.append(span)
    finally:
        tracing.shutdown(5)
    encoded, sdk = spans
    assert encoded == sdk
    assert encoded.attributes["messaging.message.body.size"] == size
    assert encoded.attributes["websocket.message.type"] == ("binary" if binary else "text")
    assert len(encoded.links) == 1  # to the handshake span
    assert encoded.status == ("ERROR" if error else "UNSET")
