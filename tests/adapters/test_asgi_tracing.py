"""Spans of the ASGI middleware, decoded from a real OTLP/HTTP receiver: the handshake
SERVER span continues the upgrade's ``traceparent``, one CONSUMER span per received
message (the application's spans are its children), the close span; a denied
handshake is an error. The tracing sink is the one the websockets adapters use."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.helpers.asgi import asgi_server
from tests.helpers.asgi_apps import fastapi_app
from tests.helpers.otlp import OtlpHttpReceiver, ReceivedSpan, http_receiver
from tests.helpers.servers import HOST
from tests.tracing.test_setup import _reset_globals
from ws_monitoring.tracing.setup import setup_tracing

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
ROUTE = "/echo/{room}"


@pytest.fixture
def receiver() -> Iterator[OtlpHttpReceiver]:
    _reset_globals()
    with http_receiver() as running:
        tracing = setup_tracing(
            service_name="asgi-test", endpoint=running.url, sample_ratio=1.0, schedule_delay=0.02
        )
        try:
            yield running
        finally:
            tracing.shutdown(timeout=2)
            _reset_globals()


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


@pytest.mark.parametrize("server", ["uvicorn-sansio", "hypercorn"])
async def test_handshake_message_close_and_denied_spans(
    server: str, receiver: OtlpHttpReceiver
) -> None:
    app = fastapi_app([], registry=CollectorRegistry())
    with asgi_server(app, server) as running:
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=abc"}
        async with connect(running.url("/echo/7?token=secret"), additional_headers=headers) as ws:
            await ws.send("trace")
            assert await ws.recv() == "trace"
            await ws.send("crash")
            with contextlib.suppress(ConnectionClosed):
                await ws.recv()
        with pytest.raises(InvalidStatus):
            async with connect(running.url("/deny/x")):
                pass
        expected = [f"GET {ROUTE}", f"process {ROUTE}", f"process {ROUTE}", "lookup",
                    f"close {ROUTE}", "GET /deny/{what}"]  # fmt: skip
        # Recent FastAPI versions add spans of their own (scope "fastapi"): not ours.
        spans = [
            s
            for s in receiver.wait(lambda got: len([s for s in got if s.scope != "fastapi"]) >= 6)
            if s.scope != "fastapi"
        ]

    assert sorted(s.name for s in spans) == sorted(expected)
    hs = one(spans, f"GET {ROUTE}")
    assert hs.kind == "SERVER"
    assert (hs.trace_id, hs.parent_span_id, hs.trace_state) == (TRACE_ID, PARENT_ID, "vendor=abc")
    assert hs.status == "UNSET"
    assert hs.attributes["http.route"] == ROUTE
    # The raw path only with payload consent (README privacy table): identifiers masked.
    assert hs.attributes["url.path"] == "/echo/{id}"
    assert hs.attributes["http.response.status_code"] == 101
    assert hs.attributes["server.address"] == HOST
    assert hs.attributes["server.port"] == running.port

    crashed, handled = sorted(  # "ERROR" < "UNSET"
        (s for s in spans if s.name == f"process {ROUTE}"), key=lambda s: s.status
    )
    for message in (handled, crashed):
        assert message.kind == "CONSUMER"
        assert message.attributes["messaging.destination.name"] == ROUTE
        assert message.attributes["websocket.message.type"] == "text"
        # A trace of its own, linked to the handshake.
        assert [(t, s) for t, s, _ in message.links] == [(TRACE_ID, hs.span_id)]
    assert handled.attributes["messaging.message.body.size"] == 5
    assert handled.status == "UNSET"
    lookup = one(spans, "lookup")
    assert (lookup.trace_id, lookup.parent_span_id) == (handled.trace_id, handled.span_id)
    assert crashed.status == "ERROR"
    assert crashed.attributes["error.type"] == "ValueError"
    assert [name for name, _, _ in crashed.events] == ["exception"]

    close = one(spans, f"close {ROUTE}")
    assert (close.trace_id, close.parent_span_id) == (TRACE_ID, hs.span_id)
    assert close.attributes["websocket.close.code"] == 1011
    assert close.attributes["error.type"] == "handler_exception"
    assert close.attributes["websocket.messages.received"] == 2
    assert close.attributes["websocket.messages.sent"] == 1
    assert close.status == "ERROR"

    denied = one(spans, "GET /deny/{what}")
    assert denied.kind == "SERVER"
    assert denied.status == "ERROR"
    assert denied.attributes["http.response.status_code"] == 403
    assert denied.attributes["websocket.handshake.outcome"] == "rejected"
    assert "secret" not in "".join(s.text() for s in spans)
