"""Bad input and faults: each is counted under a bounded label, and the server goes on.

Every case runs against the asyncio and the threading server. After the misbehaving
client, a well-behaved one must still get its echo; the scrape must show the case under
a fixed label value. Ten thousand distinct paths are in ``test_labels.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

from tests.helpers.scrape import Samples
from tests.helpers.servers import (
    RawClient,
    Running,
    async_server,
    async_wait_until,
    close_frame,
    echo,
    frame,
    handlers_done,
    settled,
    sync_echo,
    sync_server_async,
)
from ws_monitoring.labels import ERROR_TYPES, HANDSHAKE_FAILURES


@pytest.fixture(params=["asyncio", "sync"])
def start(
    request: pytest.FixtureRequest, registry: CollectorRegistry
) -> Callable[..., contextlib.AbstractAsyncContextManager[Running]]:
    """Starts an instrumented echo server of either kind: ``async with start(**kw)``."""

    @contextlib.asynccontextmanager
    async def start(**kwargs: Any) -> AsyncIterator[Running]:
        monitoring = {"registry": registry}
        if request.param == "asyncio":
            server = async_server(echo, monitoring=monitoring, **kwargs)
        else:
            server = sync_server_async(sync_echo, monitoring=monitoring, **kwargs)
        async with server as running:
            yield running

    return start


async def still_serves(srv: Running) -> None:
    async with connect(srv.url("/good")) as client:
        await client.send("still there?")
        assert await client.recv() == "still there?"


def errors(samples: Samples) -> dict[tuple[str, str], float]:
    found = {
        (labels["route"], labels["type"]): samples["websocket_errors_total", labels]
        for labels in samples.series("websocket_errors_total")
    }
    assert {kind for _, kind in found} <= set(ERROR_TYPES)
    return found


def codes(samples: Samples) -> dict[tuple[str, str], float]:
    return {
        (labels["route"], labels["code"]): samples["websocket_disconnections_total", labels]
        for labels in samples.series("websocket_disconnections_total")
    }


async def test_invalid_utf8(start: Any, scrape_metrics: Callable[[], Samples]) -> None:
    async with start() as srv:
        raw = await RawClient.open(srv.port, "/bad")
        await raw.send(frame(0x1, b"caf\xc3"))  # truncated UTF-8
        assert await raw.read_close() == (1007, "unexpected end of data at position 3")
        await raw.aclose()
        await still_serves(srv)
        samples = await settled(scrape_metrics, 2)
    assert errors(samples) == {("/bad", "invalid_payload"): 1}
    # The code the server failed the connection with (the raw client never answered).
    assert codes(samples) == {("/bad", "1007"): 1, ("/good", "1000"): 1}
    # It did arrive: websockets rejects it when decoding, after the frame was read.
    received = {"route": "/bad", "direction": "received", "type": "text"}
    assert samples["websocket_messages_total", received] == 1


async def test_message_over_max_size(start: Any, scrape_metrics: Callable[[], Samples]) -> None:
    async with start(max_size=1024) as srv:
        async with connect(srv.url("/big"), max_size=None) as client:
            await client.send("x" * 1025)
            with pytest.raises(ConnectionClosedError) as caught:
                await client.recv()
        assert caught.value.rcvd is not None
        assert caught.value.rcvd.code == 1009
        # Fragments adding up to more than max_size are refused as well.
        async with connect(srv.url("/big"), max_size=None) as client:
            await client.send(["x" * 1000, "x" * 1000])
            with pytest.raises(ConnectionClosedError):
                await client.recv()
        await still_serves(srv)
        samples = await settled(scrape_metrics, 3)
    assert errors(samples) == {("/big", "message_too_big"): 2}
    # The client answered 1009, but websockets ignores the answer after a failure: the
    # code is the one the server sent.
    assert codes(samples) == {("/big", "1009"): 2, ("/good", "1000"): 1}
    received = {"route": "/big", "direction": "received"}
    assert samples["websocket_message_size_bytes_count", received] == 0


@pytest.mark.parametrize(
    "data",
    [
        frame(0x1, b"unmasked", mask=False),
        frame(0xB, b"reserved opcode"),
        frame(0x2, b"x", rsv=0b010),
        frame(0x0, b"no message to continue"),
    ],
    ids=["unmasked", "opcode", "rsv", "continuation"],
)
async def test_protocol_violations(
    start: Any, scrape_metrics: Callable[[], Samples], data: bytes
) -> None:
    async with start() as srv:
        raw = await RawClient.open(srv.port, "/proto")
        await raw.send(data)
        code = await raw.read_close()
        assert code is not None
        assert code[0] == 1002
        await raw.aclose()
        await still_serves(srv)
        samples = await settled(scrape_metrics, 2)
    assert errors(samples) == {("/proto", "protocol_error"): 1}
    assert codes(samples) == {("/proto", "1002"): 1, ("/good", "1000"): 1}


async def test_tcp_reset_in_the_middle_of_a_frame(
    start: Any, scrape_metrics: Callable[[], Samples]
) -> None:
    async with start() as srv:
        raw = await RawClient.open(srv.port, "/reset")
        await raw.send(frame(0x2, b"0123456789")[:8])  # header and half the payload
        raw.reset()
        await still_serves(srv)
        samples = await settled(scrape_metrics, 2)
    assert errors(samples) == {("/reset", "connection_reset"): 1}
    assert codes(samples) == {("/reset", "1006"): 1, ("/good", "1000"): 1}


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",  # TLS to a plaintext port
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nNo colon in this header line\r\n\r\n",
    ],
    ids=["tls", "garbage", "bad-header"],
)
async def test_garbage_instead_of_a_handshake(
    start: Any, scrape_metrics: Callable[[], Samples], request_bytes: bytes
) -> None:
    async with start() as srv:
        raw = await RawClient.connect(srv.port)
        await raw.send(request_bytes)
        assert await raw.read_eof() == b""
        await still_serves(srv)
        samples = await settled(scrape_metrics, 1, handshakes=2)
    assert samples["websocket_handshake_failures_total", {"status": "invalid_request"}] == 1
    assert samples.series("websocket_handshake_failures_total") == [{"status": "invalid_request"}]


UPGRADE = (
    b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


async def test_requests_websockets_answers_with_an_http_error(
    start: Any, scrape_metrics: Callable[[], Samples]
) -> None:
    cases = [
        (b"POST / HTTP/1.1\r\n" + UPGRADE + b"\r\n", b"405", "405"),
        (b"GET / HTTP/1.0\r\n" + UPGRADE + b"\r\n", b"505", "505"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"426", "426"),
        (b"GET / HTTP/1.1\r\n" + UPGRADE.replace(b"13", b"8") + b"\r\n", b"400", "400"),
        # websockets answers these from its parser, before a request exists: no response
        # object reaches the adapter, but the client got that status, so it is counted.
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", b"431", "431"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"414", "414"),
    ]
    async with start() as srv:
        for request_bytes, status, _ in cases:
            raw = await RawClient.connect(srv.port)
            await raw.send(request_bytes)
            assert (await raw.read_eof()).startswith(b"HTTP/1.1 " + status + b" ")
        await still_serves(srv)
        samples = await settled(scrape_metrics, 1, handshakes=len(cases) + 1)
    failures = {
        labels["status"]: samples["websocket_handshake_failures_total", labels]
        for labels in samples.series("websocket_handshake_failures_total")
    }
    assert failures == {"405": 1, "505": 1, "426": 1, "400": 1, "431": 1, "414": 1}
    # The 9000-character path never became a label.
    assert "aaaaaaaa" not in samples.text


async def test_handshake_that_never_completes(
    start: Any, scrape_metrics: Callable[[], Samples]
) -> None:
    async with start(open_timeout=0.2) as srv:
        stalled = [await RawClient.connect(srv.port) for _ in range(3)]
        await stalled[0].send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a request
        await stalled[1].send(b"G")
        # While they hang, others are served.
        await still_serves(srv)
        for raw in stalled:
            assert await raw.read_eof() == b""
        await async_wait_until(
            lambda: (
                scrape_metrics().get("websocket_handshake_failures_total", status="timeout") == 3
            )
        )
        await still_serves(srv)
        samples = await settled(scrape_metrics, 2, handshakes=5)
    assert samples.series("websocket_handshake_failures_total") == [{"status": "timeout"}]
    assert {s["status"] for s in samples.series("websocket_handshake_failures_total")} <= set(
        HANDSHAKE_FAILURES
    )


@pytest.mark.parametrize(
    ("code", "label"),
    [(3000, "3xxx"), (3999, "3xxx"), (4000, "4xxx"), (4999, "4xxx"), (2999, "1002"),
     (5000, "1002"), (1004, "1002"), (65535, "1002")],
)  # fmt: skip
async def test_close_codes_from_clients(
    start: Any, scrape_metrics: Callable[[], Samples], code: int, label: str
) -> None:
    async with start() as srv:
        raw = await RawClient.open(srv.port, "/close")
        await raw.send(close_frame(code, b"reason"))
        answer = await raw.read_close()
        await raw.aclose()
        await still_serves(srv)
        # Both handlers have returned, so both records are closed: one scrape shows
        # them (no polling against a deadline that a loaded machine could miss).
        await handlers_done(srv)
        samples = await asyncio.to_thread(scrape_metrics)
    assert samples.total("websocket_connections_active") == 0
    assert codes(samples) == {("/close", label): 1, ("/good", "1000"): 1}
    if label == "1002":
        # websockets refuses the code itself: a protocol error, closed with 1002.
        assert answer == (1002, "invalid status code")
        assert errors(samples) == {("/close", "protocol_error"): 1}
    else:
        assert answer == (code, "reason")
        assert errors(samples) == {}
