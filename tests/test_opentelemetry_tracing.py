"""OpenTelemetry tracing, end to end: real servers and clients, real OTLP receivers.

Every test installs its own tracer provider with ``setup_tracing`` (or an application
provider) pointed at a real OTLP/HTTP or OTLP/gRPC receiver on loopback, drives a real
``websockets`` client, and asserts on the spans the receiver decoded with
``opentelemetry-proto`` and on metrics scraped over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.util._once import Once
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

import ws_monitoring
from tests.helpers.otlp import OtlpGrpcReceiver, OtlpHttpReceiver, ReceivedSpan
from tests.helpers.scrape import OPENMETRICS, Samples, fetch, scrape
from tests.helpers.servers import (
    HOST,
    RawClient,
    async_server,
    async_wait_until,
    settled,
    sync_server_async,
)
from tests.helpers.system import free_port
from ws_monitoring.config import Config
from ws_monitoring.instrument import build_monitor
from ws_monitoring.opentelemetry_tracing import (
    DEFAULT_SAMPLE_RATIO,
    Tracing,
    build_sink,
    setup_tracing,
    tracer,
)
from ws_monitoring.tracing_sink import TracingSink

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
ECHO_ATTRS = {
    "messaging.system": "websocket",
    "messaging.destination.name": "/chat",
    "messaging.operation.type": "process",
    "messaging.operation.name": "process",
    "network.protocol.name": "websocket",
    "client.address": "127.0.0.0",
}


def _reset_globals() -> None:
    # What OpenTelemetry's own test utilities do: the global provider is set-once.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture(autouse=True)
def fresh_provider() -> Iterator[None]:
    _reset_globals()
    yield
    _reset_globals()


@pytest.fixture
def receiver() -> Iterator[OtlpHttpReceiver]:
    running = OtlpHttpReceiver()
    yield running
    running.close()


@pytest.fixture
def make_tracing() -> Iterator[Callable[..., Tracing]]:
    """``setup_tracing`` with a short export delay; everything is shut down afterwards."""
    handles: list[Tracing] = []

    def make(**kwargs: Any) -> Tracing:
        kwargs.setdefault("schedule_delay", 0.02)
        handle = setup_tracing(**kwargs)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.shutdown(timeout=2)


@pytest.fixture
def tracing(receiver: OtlpHttpReceiver, make_tracing: Callable[..., Tracing]) -> Tracing:
    """Every span sampled, exported to ``receiver`` over OTLP/HTTP."""
    return make_tracing(service_name="chat-test", endpoint=receiver.url, sample_ratio=1.0)


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def spans_until(
    receiver: OtlpHttpReceiver | OtlpGrpcReceiver,
    predicate: Callable[[list[ReceivedSpan]], bool],
) -> list[ReceivedSpan]:
    """Wait without blocking the event loop the server runs on."""
    return await asyncio.to_thread(receiver.wait, predicate)


def names(spans: list[ReceivedSpan]) -> list[str]:
    return sorted(s.name for s in spans)


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"expected one {name!r} span, got {names(spans)}"
    return found[0]


async def scrape_async(url: str) -> Samples:
    return await asyncio.to_thread(scrape, url)


# -- spans: names, kinds, attributes, links, parents ---------------------------------------


async def test_handshake_message_and_close_spans(
    tracing: Tracing, receiver: OtlpHttpReceiver, registry: CollectorRegistry
) -> None:
    async with async_server(echo, monitoring={"registry": registry}) as server:
        async with connect(server.url("/chat?token=secret-1")) as ws:
            await ws.send("hé")
            assert await ws.recv() == "hé"
            await ws.send(b"\x00\x01\x02")
            assert await ws.recv() == b"\x00\x01\x02"
            await ws.close(1000, "bye")
        spans = await spans_until(receiver, lambda s: len(s) == 4)

    assert names(spans) == ["GET /chat", "close /chat", "process /chat", "process /chat"]
    hs = one(spans, "GET /chat")
    assert hs.kind == "SERVER"
    assert hs.parent_span_id == ""
    assert hs.status == "UNSET"
    assert hs.attributes == {
        "network.protocol.name": "websocket",
        "websocket.handshake.outcome": "accepted",
        "http.request.method": "GET",
        "http.route": "/chat",
        "url.path": "/chat",
        "user_agent.original": hs.attributes["user_agent.original"],
        "http.response.status_code": 101,
        "server.address": HOST,
        "server.port": server.port,
    }
    assert hs.attributes["user_agent.original"].startswith("Python/")
    assert 0 < hs.start <= hs.end
    assert hs.resource["service.name"] == "chat-test"
    assert (hs.scope, hs.scope_version) == ("ws_monitoring", ws_monitoring.__version__)

    text, binary = sorted(
        (s for s in spans if s.name == "process /chat"),
        key=lambda s: s.attributes["websocket.message.type"] != "text",
    )
    conn_id = text.attributes["websocket.connection.id"]
    assert re.fullmatch(r"[0-9a-f-]{36}", conn_id)
    assert text.kind == binary.kind == "CONSUMER"
    assert text.attributes == {
        **ECHO_ATTRS,
        "websocket.connection.id": conn_id,
        "messaging.message.body.size": 3,  # UTF-8 bytes
        "websocket.message.type": "text",
    }
    assert binary.attributes == {
        **text.attributes,
        "messaging.message.body.size": 3,
        "websocket.message.type": "binary",
    }
    for span in (text, binary):
        # A trace of its own, linked to the handshake.
        assert span.parent_span_id == ""
        assert span.trace_id not in (hs.trace_id, TRACE_ID)
        assert [(t, s) for t, s, _ in span.links] == [(hs.trace_id, hs.span_id)]
        assert span.status == "UNSET"
        assert span.events == []
        assert span.flags & 0x3FF == 0x103  # sampled, random trace id, local root
        assert hs.end <= span.start <= span.end
    assert text.trace_id != binary.trace_id

    close = one(spans, "close /chat")
    assert close.kind == "INTERNAL"
    assert (close.trace_id, close.parent_span_id) == (hs.trace_id, hs.span_id)
    duration = close.attributes.pop("websocket.connection.duration")
    assert 0 < duration < 60
    assert close.attributes == {
        "messaging.system": "websocket",
        "messaging.destination.name": "/chat",
        "network.protocol.name": "websocket",
        "client.address": "127.0.0.0",
        "websocket.connection.id": conn_id,
        "websocket.close.code": 1000,
        "websocket.close.reason.length": 3,
        "websocket.messages.received": 2,
        "websocket.messages.sent": 2,
    }
    assert close.status == "UNSET"
    assert "bye" not in close.text()
    assert "secret-1" not in "".join(s.text() for s in spans)


async def test_client_traceparent_continues_into_the_handshake_span(
    tracing: Tracing, receiver: OtlpHttpReceiver, registry: CollectorRegistry, metrics_server: Any
) -> None:
    async with async_server(echo, monitoring={"registry": registry}) as server:
        headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"}
        async with connect(server.url("/chat"), additional_headers=headers) as ws:
            await ws.send("x")
            await ws.recv()
        spans = await spans_until(receiver, lambda s: len(s) == 3)
        samples = await scrape_async(metrics_server.url)

    hs = one(spans, "GET /chat")
    assert (hs.trace_id, hs.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert hs.trace_state == "vendor=abc"
    assert hs.flags & 0x300 == 0x300  # its parent is remote
    message = one(spans, "process /chat")
    # By default each message starts its own trace: only the link leads back.
    assert message.trace_id != TRACE_ID
    assert message.links[0][:2] == (TRACE_ID, hs.span_id)
    carriers = "ws_monitoring_trace_carriers_total"
    assert samples[carriers, {"source": "header", "outcome": "extracted"}] == 1
    assert samples[carriers, {"source": "header", "outcome": "absent"}] == 0


async def test_messages_in_connection_trace(
    tracing: Tracing, receiver: OtlpHttpReceiver, registry: CollectorRegistry
) -> None:
    monitoring = {"registry": registry, "trace_messages_in_connection_trace": True}
    async with async_server(echo, monitoring=monitoring) as server:
        async with connect(
            server.url("/chat"), additional_headers={"traceparent": TRACEPARENT}
        ) as ws:
            for text in ("a", "b"):
                await ws.send(text)
                await ws.recv()
        spans = await spans_until(receiver, lambda s: len(s) == 4)

    hs = one(spans, "GET /chat")
    messages = [s for s in spans if s.name == "process /chat"]
    assert len(messages) == 2
    for message in messages:
        assert (message.trace_id, message.parent_span_id) == (TRACE_ID, hs.span_id)
        assert message.links == []
        assert message.flags & 0x300 == 0x100  # a local parent


async def test_handler_spans_are_children_of_the_message_span(
    tracing: Tracing, receiver: OtlpHttpReceiver, registry: CollectorRegistry
) -> None:
    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            with tracer.start_as_current_span("lookup") as span:
                span.set_attribute("lookup.key", "k")
                with tracer.start_as_current_span("db"):
                    pass
            await ws.send(message)

    async with async_server(handler, monitoring={"registry": registry}) as server:
        async with connect(server.url("/chat")) as ws:
            await ws.send("q")
            await ws.recv()
        spans = await spans_until(receiver, lambda s: len(s) == 5)

    message = one(spans, "process /chat")
    lookup = one(spans, "lookup")
    db = one(spans, "db")
    assert (lookup.trace_id, lookup.parent_span_id) == (message.trace_id, message.span_id)
    assert (db.trace_id, db.parent_span_id) == (message.trace_id, lookup.span_id)
    assert lookup.attributes == {"lookup.key": "k"}
    assert message.start <= lookup.start <= lookup.end <= message.end


async def test_sync_server_spans(
    tracing: Tracing, receiver: OtlpHttpReceiver, registry: CollectorRegistry
) -> None:
    def handler(ws: Any) -> None:
        for message in ws:
            with tracer.start_as_current_span("work"):
                ws.send(message)

    monitoring = {"registry": registry, "trace_sent_messages": True}
    async with sync_server_async(handler, monitoring=monitoring) as server:

        def client() -> None:
            with sync_connect(server.url("/chat")) as ws:
                ws.send("s")
                assert ws.recv() == "s"

        await asyncio.to_thread(client)
        spans = await spans_until(receiver, lambda s: len(s) == 5)

    message = one(spans, "process /chat")
    work = one(spans, "work")
    send = one(spans, "send /chat")
    assert work.parent_span_id == message.span_id
    assert send.kind == "PRODUCER"
    assert (send.trace_id, send.parent_span_id) == (message.trace_id, work.span_id)
    assert send.attributes["messaging.operation.type"] == "send"
    assert send.attributes["messaging.message.body.size"] == 1
    assert send.links == message.links


async def test_sent_messages_outside_a_message_start_their_own_trace(
    tracing: Tracing, receiver: OtlpHttpReceiver, registry: CollectorRegistry
) -> None:
    async def greeter(ws: ServerConnection) -> None:
        await ws.send(b"welcome")
        await ws.wait_closed()

    monitoring = {"registry": registry, "trace_sent_messages": True}
    async with async_server(greeter, monitoring=monitoring) as server:
        async with connect(server.url("/chat")) as ws:
            assert await ws.recv() == b"welcome"
        spans = await spans_until(receiver, lambda s: len(s) == 3)
    send = one(spans, "send /chat")
    assert send.parent_span_id == ""
    assert send.attributes["websocket.message.type"] == "binary"
    assert send.attributes["messaging.message.body.size"] == 7


async def test_no_sent_spans_by_default(
    tracing: Tracing, receiver: OtlpHttpReceiver, registry: CollectorRegistry
) -> None:
    async with async_server(echo, monitoring={"registry": registry}) as server:
        async with connect(server.url("/chat")) as ws:
            await ws.send("x")
            await ws.recv()
        spans = await spans_until(receiver, lambda s: len(s) == 3)
    assert names(spans) == ["GET /chat", "close /chat", "process /chat"]


# -- errors, close codes, sampling that keeps what matters ---------------------------------


async def test_errors_and_slow_messages_are_kept_at_a_zero_ratio(
    receiver: OtlpHttpReceiver,
    make_tracing: Callable[..., Tracing],
    registry: CollectorRegistry,
    metrics_server: Any,
) -> None:
    make_tracing(endpoint=receiver.url, sample_ratio=0.0)

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            with tracer.start_as_current_span("child"):
                if message == "slow":
                    await asyncio.sleep(0.3)
                if message == "boom":
                    raise KeyError("secret-in-message")
            await ws.send(message)

    monitoring = {"registry": registry, "trace_slow_threshold": 0.2}
    async with async_server(handler, monitoring=monitoring) as server:
        async with connect(server.url("/chat")) as ws:
            for text in ("fast", "slow", "fast"):
                await ws.send(text)
                assert await ws.recv() == text
            await ws.send("boom")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        await settled(lambda: scrape(metrics_server.url), 1)
        spans = await spans_until(receiver, lambda s: len(s) == 2)
        await asyncio.to_thread(tracing_flush)
        om = (await asyncio.to_thread(fetch, metrics_server.url, accept=OPENMETRICS))[2]

    # Only the slow and the failed message: no handshake, close, fast or child spans.
    assert names(receiver.spans) == ["process /chat", "process /chat"]
    slow, boom = sorted(spans, key=lambda s: s.status != "UNSET")
    assert slow.status == "UNSET"
    assert slow.end - slow.start >= 200_000_000
    assert boom.status == "ERROR"
    assert boom.status_message == "KeyError"
    assert boom.attributes["error.type"] == "KeyError"
    [(event, at, attrs)] = boom.events
    assert event == "exception"
    assert at == boom.end
    assert attrs["exception.type"] == "KeyError"
    assert "exception.message" not in attrs  # no consent to payload
    assert attrs["exception.stacktrace"].startswith("Traceback (most recent call last):")
    assert 'raise KeyError("secret-in-message")' in attrs["exception.stacktrace"]
    assert "'secret-in-message'" not in boom.text()
    # Kept spans are exemplars of the duration histogram.
    for span in (slow, boom):
        assert f'trace_id="{span.trace_id}"' in om


def tracing_flush() -> None:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    assert provider.force_flush(5000)


async def test_exception_message_with_payload_consent(
    tracing: Tracing, receiver: OtlpHttpReceiver, registry: CollectorRegistry
) -> None:
    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            raise ValueError(f"bad message {message} from 203.0.113.9?token=t0k3n")

    monitoring = {
        "registry": registry,
        "consent_resolver": lambda request: {"purposes": ["payload", "ip"]},
    }
    async with async_server(handler, monitoring=monitoring) as server:
        async with connect(server.url("/chat")) as ws:
            await ws.send("hello")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        spans = await spans_until(receiver, lambda s: len(s) == 3)
    message = one(spans, "process /chat")
    assert message.attributes["client.address"] == "127.0.0.1"  # consented: raw
    [(_, _, attrs)] = message.events
    # Consented, and still scrubbed: IP anonymized, query string dropped.
    assert attrs["exception.message"] == "bad message hello from 203.0.113.0"
    close = one(spans, "close /chat")
    assert close.status == "ERROR"
    assert close.attributes["error.type"] == "handler_exception"
    assert close.attributes["websocket.close.code"] == 1011
    [(name, _, close_attrs)] = close.events
    assert name == "exception"
    assert close_attrs["exception.type"] == "ValueError"


async def test_abnormal_close_is_visible_on_the_close_span(
    tracing: Tracing, receiver: OtlpHttpReceiver, registry: CollectorRegistry
) -> None:
    async with async_server(echo, monitoring={"registry": registry}) as server:
        raw = await RawClient.open(server.port, "/chat")
        raw.reset()
        spans = await spans_until(receiver, lambda s: len(s) == 2)
    close = one(spans, "close /chat")
    assert close.status == "ERROR"
    assert close.status_message == "connection_reset"
    assert close.attributes["error.type"] == "connection_reset"
    assert close.attributes["websocket.close.code"] == 1006


async def test_rejected_handshake_has_an_error_status(
    tracing: Tracing, receiver: OtlpHttpReceiver, registry: CollectorRegistry
) -> None:
    def process_request(connection: Any, request: Any) -> Any:
        return connection.respond(403, "Forbidden\n")

    # Rejected requests only get a route from the templates: their paths claim no label.
    monitoring = {"registry": registry, "routes": ["/chat"]}
    async with async_server(echo, monitoring=monitoring, process_request=process_request) as server:
        with pytest.raises(Exception, match="403"):
            await connect(server.url("/chat"))
        status, _, _ = await asyncio.to_thread(fetch, f"http://{HOST}:{server.port}/healthz")
        assert status == 200
        spans = await spans_until(receiver, lambda s: len(s) == 1)
    [hs] = spans  # the health check makes no span
    assert hs.name == "GET /chat"
    assert hs.status == "ERROR"
    assert hs.status_message == "handshake rejected"
    assert hs.attributes["error.type"] == "403"
    assert hs.attributes["http.response.status_code"] == 403
    assert hs.attributes["websocket.handshake.outcome"] == "rejected"


# -- bad input is harmless -----------------------------------------------------------------


async def test_malformed_traceparent_header_starts_a_new_trace(
    tracing: Tracing, receiver: OtlpHttpReceiver, registry: CollectorRegistry, metrics_server: Any
) -> None:
    async with async_server(echo, monitoring={"registry": registry}) as server:
        for value in ("garbage", f"00-{'0' * 32}-{PARENT_ID}-01", f"ff-{TRACE_ID}-{PARENT_ID}-01"):
            async with connect(
                server.url("/chat"), additional_headers={"traceparent": value}
            ) as ws:
                await ws.send("x")
                assert await ws.recv() == "x"
        spans = await spans_until(receiver, lambda s: len(s) == 9)
        samples = await scrape_async(metrics_server.url)
    for hs in (s for s in spans if s.name == "GET /chat"):
        assert hs.parent_span_id == ""
        assert hs.trace_id != TRACE_ID
    carriers = "ws_monitoring_trace_carriers_total"
    assert samples[carriers, {"source": "header", "outcome": "malformed"}] == 3
    assert samples[carriers, {"source": "header", "outcome": "extracted"}] == 0


async def test_one_megabyte_header_is_rejected_and_counted(
    tracing: Tracing, receiver: OtlpHttpReceiver, registry: CollectorRegistry, metrics_server: Any
) -> None:
    async with async_server(echo, monitoring={"registry": registry}) as server:
        raw = await RawClient.connect(server.port)
        await raw.send(
            b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"traceparent: " + b"0" * (1 << 20) + b"\r\n\r\n"
        )
        answer = await raw.read_eof()
        # websockets refuses header lines over 8 KiB before they reach any hook.
        assert answer.startswith(b"HTTP/1.1 431 ")
        async with connect(server.url("/chat")) as ws:
            await ws.send("still healthy")
            assert await ws.recv() == "still healthy"
        spans = await spans_until(receiver, lambda s: len(s) == 4)
        samples = await scrape_async(metrics_server.url)
    failed = one(spans, "HTTP")
    assert failed.status == "ERROR"
    assert failed.attributes == {
        "network.protocol.name": "websocket",
        "websocket.handshake.outcome": "failed",
        "error.type": "invalid_request",
    }
    assert samples["websocket_handshake_failures_total", {"status": "invalid_request"}] == 1


async def test_context_from_message(
    tracing: Tracing, receiver: OtlpHttpReceiver, registry: CollectorRegistry, metrics_server: Any
) -> None:
    def carrier(message: str | bytes) -> Any:
        envelope = json.loads(message)  # raises on non-JSON: counted as "error"
        if envelope == "not a mapping":
            return envelope
        return envelope.get("trace")

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            with tracer.start_as_current_span("handled"):
                await ws.send(message)

    monitoring = {"registry": registry, "context_from_message": carrier}
    good = json.dumps({"trace": {"traceparent": TRACEPARENT, "baggage": "k=v"}})
    messages = [
        good,
        json.dumps({"data": 1}),  # absent
        json.dumps({"trace": {"traceparent": "00-bad"}}),  # malformed
        json.dumps({"trace": {"tracestate": "only=state"}}),  # absent
        json.dumps({"trace": {"traceparent": 42}}),  # malformed
        json.dumps("not a mapping"),  # malformed
        "not json",  # error
    ]
    async with async_server(handler, monitoring=monitoring) as server:
        async with connect(server.url("/chat")) as ws:
            for message in messages:
                await ws.send(message)
                assert await ws.recv() == message
        spans = await spans_until(receiver, lambda s: len(s) == 2 + 2 * len(messages))
        samples = await scrape_async(metrics_server.url)

    processed = [s for s in spans if s.name == "process /chat"]
    continued = [s for s in processed if s.trace_id == TRACE_ID]
    assert len(continued) == 1
    [span] = continued
    assert span.parent_span_id == PARENT_ID
    assert span.flags & 0x300 == 0x300  # remote parent
    handled = [s for s in spans if s.name == "handled" and s.parent_span_id == span.span_id]
    assert len(handled) == 1
    assert all(s.parent_span_id == "" for s in processed if s is not span)
    carriers = "ws_monitoring_trace_carriers_total"
    expected = {"extracted": 1, "absent": 2, "malformed": 3, "error": 1}
    for outcome, count in expected.items():
        assert samples[carriers, {"source": "message", "outcome": outcome}] == count


async def test_message_carrier_wins_over_the_connection_trace(
    tracing: Tracing, receiver: OtlpHttpReceiver, registry: CollectorRegistry
) -> None:
    monitoring = {
        "registry": registry,
        "trace_messages_in_connection_trace": True,
        "context_from_message": lambda m: json.loads(m),
    }
    async with async_server(echo, monitoring=monitoring) as server:
        async with connect(server.url("/chat")) as ws:
            for message in (json.dumps({"traceparent": TRACEPARENT}), json.dumps({})):
                await ws.send(message)
                await ws.recv()
        spans = await spans_until(receiver, lambda s: len(s) == 4)
    hs = one(spans, "GET /chat")
    carried, plain = sorted(
        (s for s in spans if s.name == "process /chat"), key=lambda s: s.trace_id != TRACE_ID
    )
    assert (carried.trace_id, carried.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert [ln[1] for ln in carried.links] == [hs.span_id]
    assert (plain.trace_id, plain.parent_span_id) == (hs.trace_id, hs.span_id)
    assert plain.links == []


# -- metrics and traces --------------------------------------------------------------------


async def test_sampled_message_trace_id_is_an_exemplar(
    tracing: Tracing, receiver: OtlpHttpReceiver, registry: CollectorRegistry, metrics_server: Any
) -> None:
    async with async_server(echo, monitoring={"registry": registry}) as server:
        async with connect(server.url("/chat")) as ws:
            await ws.send("x")
            await ws.recv()
        spans = await spans_until(receiver, lambda s: len(s) == 3)
        _, content_type, body = await asyncio.to_thread(
            fetch, metrics_server.url, accept=OPENMETRICS
        )
        _, _, plain = await asyncio.to_thread(fetch, metrics_server.url)
    message = one(spans, "process /chat")
    assert content_type.startswith("application/openmetrics-text")
    lines = [
        line
        for line in body.splitlines()
        if line.startswith("websocket_message_duration_seconds_bucket") and "# {" in line
    ]
    assert len(lines) == 1
    assert f'# {{trace_id="{message.trace_id}"}}' in lines[0]
    assert message.trace_id not in plain  # the text format has no exemplars


# -- export faults -------------------------------------------------------------------------


async def test_dead_collector_does_not_stop_traffic(
    make_tracing: Callable[..., Tracing], registry: CollectorRegistry, metrics_server: Any
) -> None:
    handle = make_tracing(
        endpoint=f"http://{HOST}:{free_port()}",
        sample_ratio=1.0,
        timeout=0.2,
        max_queue_size=8,
        max_export_batch_size=4,
    )
    async with async_server(echo, monitoring={"registry": registry}) as server:
        async with connect(server.url("/chat")) as ws:
            for i in range(60):
                await ws.send(str(i))
                assert await ws.recv() == str(i)
        await settled(lambda: scrape(metrics_server.url), 1)
        assert await asyncio.to_thread(handle.shutdown, 2.0) in (True, False)
        samples = await scrape_async(metrics_server.url)
    dropped = {
        reason: samples["ws_monitoring_spans_dropped_total", {"reason": reason}]
        for reason in ("queue_full", "export_failed", "shutdown")
    }
    assert samples["ws_monitoring_spans_exported_total"] == 0
    # Every span (handshake, 60 messages, close) is accounted for, none silently lost.
    assert sum(dropped.values()) == 62
    assert dropped["export_failed"] > 0
    assert dropped["queue_full"] > 0


async def test_refusing_collector_counts_failed_exports(
    receiver: OtlpHttpReceiver,
    make_tracing: Callable[..., Tracing],
    registry: CollectorRegistry,
    metrics_server: Any,
) -> None:
    receiver.status = 400  # not retryable
    handle = make_tracing(endpoint=receiver.traces_url, sample_ratio=1.0)
    async with async_server(echo, monitoring={"registry": registry}) as server:
        async with connect(server.url("/chat")) as ws:
            await ws.send("x")
            await ws.recv()
        await settled(lambda: scrape(metrics_server.url), 1)
        assert await asyncio.to_thread(handle.force_flush, 5.0)
        samples = await scrape_async(metrics_server.url)
    assert samples["ws_monitoring_spans_dropped_total", {"reason": "export_failed"}] == 3
    assert receiver.spans == []


async def test_transient_failures_are_retried(
    receiver: OtlpHttpReceiver,
    make_tracing: Callable[..., Tracing],
    registry: CollectorRegistry,
    metrics_server: Any,
) -> None:
    receiver.statuses.extend([503, 429])
    receiver.retry_after = "0"
    make_tracing(endpoint=receiver.url, sample_ratio=1.0)
    async with async_server(echo, monitoring={"registry": registry}) as server:
        async with connect(server.url("/chat")) as ws:
            await ws.send("x")
            await ws.recv()
        spans = await spans_until(receiver, lambda s: len(s) == 3)
        samples = await scrape_async(metrics_server.url)
    assert names(spans) == ["GET /chat", "close /chat", "process /chat"]
    assert receiver.attempts == receiver.requests + 2  # two retries
    assert samples["ws_monitoring_spans_dropped_total", {"reason": "export_failed"}] == 0
    assert samples["ws_monitoring_spans_exported_total"] == 3
