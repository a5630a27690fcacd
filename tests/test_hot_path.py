"""The per-message hot path: what the benchmark budgets rest on, pinned by tests.

Real ``websockets`` protocol objects fed real bytes, and real servers and clients: the
frame counter must count exactly what the application exchanges (sizes before
compression, no frame websockets rejects), add no key to the protocol's compact
attribute table, and stay out of the way of negotiated extensions.
"""

from __future__ import annotations

import base64
import os
import tracemalloc
import uuid
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request
from websockets.server import ServerProtocol

from tests.helpers.scrape import Samples
from tests.helpers.servers import async_server, echo, frame, settled, sync_echo
from ws_monitoring import core
from ws_monitoring.config import DEFAULT_SIZE_BUCKETS, Config
from ws_monitoring.core import ConnectionRecord, Monitor, _size_table


def _bounds() -> st.SearchStrategy[tuple[float, ...]]:
    values = st.floats(min_value=-10, max_value=200_000, allow_nan=False, allow_infinity=False)
    return st.lists(values, min_size=1, max_size=12, unique=True).map(lambda v: tuple(sorted(v)))


@given(_bounds())
def test_size_table_is_the_binary_search(bounds: tuple[float, ...]) -> None:
    table = _size_table(bounds)
    assert len(table) > 0
    assert all(table[size] == bisect_left(bounds, size) for size in range(len(table)))


def test_size_table_covers_common_sizes_and_gives_up_on_huge_layouts() -> None:
    assert len(_size_table(DEFAULT_SIZE_BUCKETS)) == 65537
    assert _size_table((1.0, 2.0)) == bytes([0, 0, 1, 2])
    assert _size_table(tuple(float(b) for b in range(300))) == b""


# -- the protocol, fed bytes ---------------------------------------------------------------


class _Conn:
    def __init__(self, protocol: ServerProtocol, request: Request) -> None:
        self.protocol = protocol
        self.request = request
        self.id = uuid.uuid4()
        self.remote_address = ("198.51.100.7", 50000)
        self.subprotocol = None


def _request(extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET /hot HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def _opened(monitor: Monitor, *, prepare: bool = False) -> tuple[ServerProtocol, ConnectionRecord]:
    protocol = ServerProtocol()
    record = monitor.prepare(protocol) if prepare else None
    protocol.receive_data(_request())
    [request] = protocol.events_received()
    assert isinstance(request, Request)
    protocol.send_response(protocol.accept(request))
    protocol.data_to_send()
    record = monitor.open(_Conn(protocol, request), record=record)
    return protocol, record


def _monitor() -> Monitor:
    return Monitor(Config(registry=CollectorRegistry(), tracing=False, log_lifecycle=False), [])


def test_counting_adds_no_key_to_the_protocol() -> None:
    monitor = _monitor()
    _opened(monitor)  # the counter class and size table exist from now on
    protocol = ServerProtocol()
    protocol.receive_data(_request())
    [request] = protocol.events_received()
    protocol.send_response(protocol.accept(request))
    conn = _Conn(protocol, request)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        record = monitor.open(conn)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    lines = _install_lines()
    install = sum(
        stat.size_diff
        for stat in after.compare_to(before, "lineno")
        if stat.traceback[0].filename.endswith("core.py") and stat.traceback[0].lineno in lines
    )
    # The counter and the new extension list. A dict built for the protocol's
    # attributes (a second new key, or a change of class) would cost about 1.5 KiB.
    assert 0 < install < 400
    assert type(protocol) is ServerProtocol
    # The C counter is the record itself (no second object); the Python one is not.
    [counter] = protocol.extensions
    assert (counter is record) if core.SPEEDUPS else type(counter).__name__ == "FrameCounter"
    assert protocol.extensions[0].name == "ws-monitoring-frame-counter"
    assert record.in_text == 0


def _install_lines() -> set[int]:
    import inspect

    from ws_monitoring import core

    lines, start = inspect.getsourcelines(core._install_frame_hooks)
    return set(range(start, start + len(lines)))


def _feed(protocol: ServerProtocol, *frames: bytes) -> None:
    protocol.receive_data(b"".join(frames))
    protocol.events_received()


@pytest.mark.parametrize("prepare", [False, True], ids=["open", "prepared"])
def test_counts_what_the_peer_sends_and_nothing_websockets_rejects(prepare: bool) -> None:
    monitor = _monitor()
    protocol, record = _opened(monitor, prepare=prepare)
    _feed(
        protocol,
        frame(0x1, b"hello"),
        frame(0x2, b"ab", fin=False),
        frame(0x0, b"cd", fin=False),
        frame(0x0, b"e"),
    )
    assert (record.in_text, record.in_binary, record.in_bytes) == (1, 1, 10)
    # A continuation with no message to continue: websockets fails the connection.
    _feed(protocol, frame(0x0, b"zz"))
    assert (record.in_text, record.in_binary, record.in_bytes) == (1, 1, 10)
    assert protocol.parser_exc is not None


def test_a_new_message_inside_a_fragmented_one_is_not_counted() -> None:
    protocol, record = _opened(_monitor())
    _feed(protocol, frame(0x1, b"ab", fin=False), frame(0x2, b"x"))
    assert (record.in_text, record.in_binary) == (0, 0)
    assert protocol.parser_exc is not None


def test_reserved_bits_no_extension_cleared_are_not_counted() -> None:
    protocol, record = _opened(_monitor())
    _feed(protocol, frame(0x2, b"x", rsv=4))
    assert record.in_binary == 0
    assert protocol.parser_exc is not None


def test_invalid_control_frames_are_ignored() -> None:
    protocol, record = _opened(_monitor())
    protocol.send_ping(b"1234")
    protocol.data_to_send()
    _feed(protocol, frame(0xA, b"1234", fin=False))  # a fragmented pong: rejected
    assert record.h is None
    assert record.close_code is None


def test_sent_fragments_and_pings() -> None:
    protocol, record = _opened(_monitor())
    protocol.send_text(b"ab", fin=False)
    protocol.send_continuation(b"cd", fin=True)
    protocol.send_binary(b"x" * 70_000)
    protocol.send_ping(b"pp")
    protocol.data_to_send()
    assert (record.out_text, record.out_binary, record.out_bytes) == (1, 1, 70_004)
    assert record.ping_data == b"pp"
    _feed(protocol, frame(0xA, b"pp"))
    assert record.ping_data is None
    assert record.rtt_sum > 0


# -- a real server, a real client ------------------------------------------------------------


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_sizes_are_before_compression(
    registry: CollectorRegistry,
    scrape_metrics: Callable[[], Samples],
    compression: str | None,
) -> None:
    monitoring: dict[str, Any] = {"registry": registry, "tracing": False}
    async with async_server(echo, monitoring=monitoring) as srv:
        async with connect(srv.url("/z"), compression=compression) as client:
            negotiated = client.protocol.extensions
            await client.send("a" * 10_000)
            assert await client.recv() == "a" * 10_000
        samples = await settled(scrape_metrics, 1)
    assert len(negotiated) == (1 if compression else 0)
    for direction in ("received", "sent"):
        assert (
            samples.get("websocket_message_size_bytes_sum", route="/z", direction=direction)
            == 10_000
        )
        assert (
            samples.get("websocket_messages_total", route="/z", direction=direction, type="text")
            == 1
        )


def _live_handshake_records() -> int:
    import gc

    from ws_monitoring.core import HandshakeRecord

    gc.collect()
    # type(), not isinstance(): a dead weakref.proxy among the objects would raise.
    return sum(issubclass(type(o), HandshakeRecord) for o in gc.get_objects())


async def test_open_connections_keep_no_handshake_record(registry: CollectorRegistry) -> None:
    """An idle connection holds neither its handshake record nor, through it, its request."""
    from tests.helpers.servers import sync_server_async

    options = {"registry": registry, "tracing": False, "log_lifecycle": False}
    before = _live_handshake_records()
    async with async_server(echo, monitoring=options) as srv, connect(srv.url("/a")) as client:
        await client.send("x")
        assert await client.recv() == "x"
        assert _live_handshake_records() == before
    async with (
        sync_server_async(sync_echo, monitoring=options) as srv,
        connect(srv.url("/s")) as client,
    ):
        await client.send("x")
        assert await client.recv() == "x"
        assert _live_handshake_records() == before


async def test_an_idle_connection_keeps_little_state_with_the_defaults(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """Tracing and lifecycle logs on: what only a kept span needs (its constant parts, the
    encoded link) is built by the first one; the logger keeps no contextvars token; the
    client view has slots (memory per idle connection, see benchmarks/README.md)."""
    import logging

    from opentelemetry import trace
    from opentelemetry.util._once import Once

    from tests.helpers.otlp import OtlpHttpReceiver
    from ws_monitoring.core import record_of
    from ws_monitoring.tracing.setup import setup_tracing

    caplog.set_level(logging.INFO, logger="ws_monitoring")
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    receiver = OtlpHttpReceiver()
    tracing = setup_tracing(endpoint=receiver.url, sample_ratio=1.0)
    seen: list[Any] = []

    async def handler(ws: ServerConnection) -> None:
        record = record_of(ws)
        assert record is not None
        state = record.tracing_state
        seen.append(
            (
                state.constants,
                state._link,
                record._context,  # no dict: tracing has a slot, lifecycle logs need none
                hasattr(record.client, "__dict__"),
            )
        )
        async for message in ws:
            await ws.send(message)
        seen.append(state.constants is not None)

    try:
        async with (
            async_server(handler, monitoring={"registry": registry}) as srv,
            connect(srv.url("/idle")) as client,
        ):
            await client.send("x")
            assert await client.recv() == "x"
    finally:
        tracing.shutdown(5)
        receiver.close()
        trace._TRACER_PROVIDER_SET_ONCE = Once()
        trace._TRACER_PROVIDER = None
    assert seen == [(None, None, None, False), True]
