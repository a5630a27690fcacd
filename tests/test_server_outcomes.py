"""Labels say what the server did, the same in metrics, logs and spans.

A client's invalid close code (999, 1005, 5000) makes websockets close with 1002, a
close reason that is not UTF-8 with 1007, and an oversized header line gets a 431 from
websockets' parser before any hook runs. Real asyncio and threading servers, a real
OTLP receiver, lifecycle logs read back as JSON lines, metrics scraped over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.util._once import Once
from prometheus_client import CollectorRegistry

from tests.helpers.otlp import OtlpHttpReceiver, ReceivedSpan
from tests.helpers.scrape import Samples
from tests.helpers.servers import (
    RawClient,
    Running,
    async_server,
    close_frame,
    echo,
    frame,
    settled,
    sync_echo,
    sync_server_async,
)
from tests.logging.test_lifecycle import Logs
from ws_monitoring.tracing.setup import Tracing, setup_tracing


@pytest.fixture
def spans() -> Iterator[OtlpHttpReceiver]:
    # The global provider is set-once: reset it as OpenTelemetry's own tests do.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    receiver = OtlpHttpReceiver()
    tracing: Tracing = setup_tracing(
        "outcomes", endpoint=receiver.url, sample_ratio=1.0, schedule_delay=0.02
    )
    try:
        yield receiver
    finally:
        tracing.shutdown(timeout=2)
        receiver.close()
        trace._TRACER_PROVIDER_SET_ONCE = Once()
        trace._TRACER_PROVIDER = None


@pytest.fixture
def logs() -> Iterator[Logs]:
    captured = Logs()
    captured.start()
    try:
        yield captured
    finally:
        assert captured.setup is not None
        captured.setup.close()


@pytest.fixture(params=["asyncio", "sync"])
def start(
    request: pytest.FixtureRequest, registry: CollectorRegistry
) -> Callable[[], contextlib.AbstractAsyncContextManager[Running]]:
    @contextlib.asynccontextmanager
    async def start() -> AsyncIterator[Running]:
        options = {"registry": registry}
        if request.param == "asyncio":
            server = async_server(echo, monitoring=options)
        else:
            server = sync_server_async(sync_echo, monitoring=options)
        async with server as running:
            yield running

    return start


#: Close frames websockets refuses, and the close code the server answers them with.
REFUSED = [
    (close_frame(999), 1002),
    (close_frame(1005), 1002),
    (close_frame(5000), 1002),
    (frame(0x8, struct.pack("!H", 1000) + b"\xff\xfe"), 1007),  # reason not UTF-8
]


def close_codes(spans: list[ReceivedSpan]) -> list[int]:
    return sorted(int(s.attributes["websocket.close.code"]) for s in spans if s.name == "close /x")


async def test_refused_close_frames_are_counted_as_the_servers_close(
    start: Callable[[], contextlib.AbstractAsyncContextManager[Running]],
    scrape_metrics: Callable[[], Samples],
    spans: OtlpHttpReceiver,
    logs: Logs,
) -> None:
    async with start() as srv:
        for data, code in REFUSED:
            raw = await RawClient.open(srv.port, "/x")
            await raw.send(data)
            answer = await raw.read_close()
            assert answer is not None
            assert answer[0] == code  # what the client saw
            await raw.aclose()
        samples = await settled(scrape_metrics, len(REFUSED))
        received = await asyncio.to_thread(
            spans.wait, lambda got: len(close_codes(got)) == len(REFUSED)
        )
        closed = await logs.wait_for("connection_closed", len(REFUSED))
    expected = sorted(code for _, code in REFUSED)
    disconnections = {
        labels["code"]: samples["websocket_disconnections_total", labels]
        for labels in samples.series("websocket_disconnections_total")
    }
    assert disconnections == {"1002": 3, "1007": 1}
    assert samples["websocket_errors_total", {"route": "/x", "type": "protocol_error"}] == 3
    assert samples["websocket_errors_total", {"route": "/x", "type": "invalid_payload"}] == 1
    assert sorted(line["close_code"] for line in closed) == expected
    assert close_codes(received) == expected


async def test_a_431_from_websockets_parser_is_a_431_everywhere(
    start: Callable[[], contextlib.AbstractAsyncContextManager[Running]],
    scrape_metrics: Callable[[], Samples],
    spans: OtlpHttpReceiver,
    logs: Logs,
) -> None:
    async with start() as srv:
        raw = await RawClient.connect(srv.port)
        await raw.send(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
        assert (await raw.read_eof()).startswith(b"HTTP/1.1 431 ")
        samples = await settled(scrape_metrics, 0, handshakes=1)
        received = await asyncio.to_thread(spans.wait, lambda got: len(got) == 1)
        (line,) = await logs.wait_for("handshake_rejected")
    assert samples.series("websocket_handshake_failures_total") == [{"status": "431"}]
    assert samples["websocket_handshake_failures_total", {"status": "431"}] == 1
    assert (line["status"], line.get("failure")) == (431, None)
    (span,) = received
    attributes: dict[str, Any] = span.attributes
    assert attributes["http.response.status_code"] == 431
    assert attributes["websocket.handshake.outcome"] == "rejected"
    assert attributes["error.type"] == "431"
