"""The sans-I/O core, fed with a real ``websockets`` ServerProtocol and real frames.

No event loop and no socket: bytes go into the protocol with ``receive_data`` exactly as
a server would feed them, so the frame hooks, the classification of how a connection
ended and the dispatch to sinks are checked without timing noise.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import socket
import struct
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from websockets.extensions.base import Extension, ServerExtensionFactory
from websockets.frames import Frame
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.typing import ExtensionName, ExtensionParameter

from tests.helpers.servers import close_frame, frame
from ws_monitoring.config import Config
from ws_monitoring.core import (
    ConnectionRecord,
    HandshakeRecord,
    HistogramLayout,
    Monitor,
    classify_close,
)
from ws_monitoring.typing import Data, MessageSink, Sink

# -- real protocol objects -------------------------------------------------------------------


def request_bytes(path: str = "/chat?token=secret", extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


@dataclasses.dataclass
class Conn:
    """What Monitor.open reads from a websockets connection object (plain data)."""

    protocol: ServerProtocol
    request: Request | None
    id: uuid.UUID = dataclasses.field(default_factory=uuid.uuid4)
    remote_address: Any = ("203.0.113.77", 50000)
    subprotocol: str | None = None


def conn_with_request(path: str = "/chat?token=secret", **kwargs: Any) -> Conn:
    """A connection whose ``request`` is the parsed opening request, as websockets sets it."""
    protocol = ServerProtocol(**kwargs)
    protocol.receive_data(request_bytes(path))
    [request] = protocol.events_received()
    assert isinstance(request, Request)
    protocol.send_response(protocol.accept(request))
    protocol.data_to_send()
    return Conn(protocol, request)


# -- a recording sink (the real Sink/MessageSink protocol, no mock) --------------------------


class Recorder:
    """Implements MessageSink; records every call in order."""

    def __init__(self, name: str = "rec", fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.events: list[tuple[Any, ...]] = []
        self.shutdown_timeouts: list[float] = []
        self.opened_handshakes: list[HandshakeRecord | None] = []

    def _record(self, *event: Any) -> None:
        self.events.append(event)
        if self.fail:
            raise RuntimeError(f"{self.name} is broken")

    def handshake_finished(self, handshake: HandshakeRecord) -> None:
        self._record("handshake_finished", handshake.outcome)

    def connection_opened(self, connection: ConnectionRecord) -> None:
        self.opened_handshakes.append(connection.handshake)
        self._record("connection_opened", connection.route)

    def handler_failed(self, connection: ConnectionRecord, exc: BaseException) -> None:
        self._record("handler_failed", type(exc).__name__)

    def connection_closed(self, connection: ConnectionRecord) -> None:
        self._record("connection_closed", connection.close_code, connection.error_type)

    def shutdown(self, timeout: float) -> None:
        self.shutdown_timeouts.append(timeout)
        self._record("shutdown")

    def message_started(self, connection: ConnectionRecord, message: Data) -> object:
        self._record("message_started", message)
        return f"token-{message!r}"

    def message_finished(
        self,
        connection: ConnectionRecord,
        token: object,
        duration: float,
        error: BaseException | None,
    ) -> None:
        self._record("message_finished", token, type(error).__name__ if error else None)

    def message_sent(self, connection: ConnectionRecord, binary: bool, size: int) -> None:
        self._record("message_sent", binary, size)


class LifecycleOnly:
    """A plain Sink: no per-message methods, so it costs nothing per message."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def handshake_finished(self, handshake: HandshakeRecord) -> None:
        self.events.append("handshake_finished")

    def connection_opened(self, connection: ConnectionRecord) -> None:
        self.events.append("connection_opened")

    def handler_failed(self, connection: ConnectionRecord, exc: BaseException) -> None:
        self.events.append("handler_failed")

    def connection_closed(self, connection: ConnectionRecord) -> None:
        self.events.append("connection_closed")

    def shutdown(self, timeout: float) -> None:
        self.events.append("shutdown")


def make_monitor(sinks: Sequence[Sink] = (), **options: Any) -> Monitor:
    return Monitor(Config(**options), list(sinks))


def recv(conn: Conn, *frames: bytes) -> None:
    conn.protocol.receive_data(b"".join(frames))
    conn.protocol.events_received()


# -- tests -------------------------------------------------------------------------------------


def test_protocols_are_runtime_checkable() -> None:
    assert isinstance(Recorder(), MessageSink)
    assert isinstance(LifecycleOnly(), Sink)
    assert not isinstance(LifecycleOnly(), MessageSink)
    monitor = make_monitor([Recorder(), LifecycleOnly()])
    assert len(monitor.sinks) == 2
    assert len(monitor.message_sinks) == 1


def test_sinks_can_opt_out_of_sent_messages() -> None:
    quiet = Recorder("quiet")
    quiet.wants_sent_messages = False  # type: ignore[attr-defined]
    loud = Recorder("loud")
    monitor = make_monitor([quiet, loud])
    assert monitor.message_sinks == (quiet, loud)
    assert monitor.send_sinks == (loud,)
    conn = conn_with_request()
    monitor.open(conn)
    conn.protocol.send_text(b"world")
    assert [e for e in loud.events if e[0] == "message_sent"] == [("message_sent", False, 5)]
    assert [e for e in quiet.events if e[0] == "message_sent"] == []


def test_histogram_layout_offsets() -> None:
    config = Config(size_buckets=(1, 2), duration_buckets=(1, 2, 3), rtt_buckets=(1,))
    layout = HistogramLayout(config)
    assert (layout.size_in, layout.size_out, layout.duration, layout.rtt, layout.length) == (
        0,
        3,
        6,
        10,
        12,
    )


def test_dispatch_order_for_one_connection() -> None:
    rec = Recorder()
    monitor = make_monitor([rec])
    conn = conn_with_request()
    handshake = monitor.handshake_started()
    monitor.handshake_finished(
        handshake, request=conn.request, response=None, accepted=True, failure=None
    )
    record = monitor.open(conn, handshake=handshake)
    recv(conn, frame(0x1, b"hello"))
    record.message_handed("hello")
    conn.protocol.send_text(b"world")
    record.message_done()
    recv(conn, frame(0x2, b"\x00\x01"))
    record.message_handed(b"\x00\x01")
    monitor.failed(record, ValueError("boom"))
    recv(conn, close_frame(1000))
    monitor.closed(record, conn.protocol)
    monitor.shutdown(1.0)
    assert rec.events == [
        ("handshake_finished", "accepted"),
        ("connection_opened", "/chat"),
        ("message_started", "hello"),
        ("message_sent", False, 5),
        ("message_finished", "token-'hello'", None),
        ("message_started", b"\x00\x01"),
        ("message_finished", "token-b'\\x00\\x01'", "ValueError"),
        ("handler_failed", "ValueError"),
        ("connection_closed", 1000, "handler_exception"),
        ("shutdown",),
    ]
    assert handshake.status == 101
    # Sinks see the handshake when the connection opens; the record lets go of it then.
    assert rec.opened_handshakes == [handshake]
    assert record.handshake is None
    assert 0 < rec.shutdown_timeouts[0] <= 1.0


def test_record_views_are_privacy_safe_and_query_free() -> None:
    monitor = make_monitor()
    conn = conn_with_request("/rooms/42?token=secret")
    record = monitor.open(conn)
    assert record.path == "/rooms/42"
    # The default grouping: identifier-like segments become {id} (privacy.safe_path).
    assert record.route == "/rooms/{id}"
    assert record.id == str(conn.id)
    assert record.client.ip == "203.0.113.0"
    assert record.request is conn.request
    assert record.subprotocol is None


def test_the_client_view_is_kept_from_its_second_read() -> None:
    record = make_monitor().open(conn_with_request())
    first = record.client
    # Read once (an idle connection's "connection opened" line): nothing kept.
    assert record.client is not first
    assert record.client == first
    second = record.client
    assert record.client is second  # kept now: its sinks' caches stay valid
    granted = record.monitor.privacy.client(None, record.request)
    record.client = granted
    assert record.client is granted


def test_route_comes_from_the_handshake_when_known() -> None:
    monitor = make_monitor(routes=["/rooms/{id}"])
    conn = conn_with_request("/rooms/42")
    handshake = monitor.handshake_started()
    monitor.handshake_finished(handshake, request=conn.request, response=None, accepted=True)
    assert handshake.route == "/rooms/{id}"
    assert handshake.path == "/rooms/42"
    assert monitor.open(conn, handshake=handshake).route == "/rooms/{id}"


def test_open_without_request_uses_root() -> None:
    monitor = make_monitor()
    conn = conn_with_request("/x")
    conn.request = None
    record = monitor.open(conn)
    assert (record.path, record.route) == ("/", "/")


def test_explicit_request_wins_over_the_connection_attribute() -> None:
    monitor = make_monitor()
    conn = conn_with_request("/from-connection")
    other = conn_with_request("/explicit").request
    assert monitor.open(conn, request=other).path == "/explicit"


def test_counts_text_binary_and_fragments_received() -> None:
    monitor = make_monitor(size_buckets=(4, 16))
    conn = conn_with_request()
    record = monitor.open(conn)
    recv(
        conn,
        frame(0x1, "héllo".encode()),  # 6 bytes of UTF-8
        frame(0x2, b"12345678901234567890"),  # 20 bytes
        frame(0x1, b"ab", fin=False),
        frame(0x9, b"ping"),  # a control frame between fragments is not a message
        frame(0x0, b"cd", fin=False),
        frame(0x0, b"e"),  # text message of 5 bytes
        frame(0x2, b"", fin=False),
        frame(0x0, b"xyz"),  # binary message of 3 bytes
    )
    assert (record.in_text, record.in_binary) == (2, 2)
    assert record.in_bytes == 6 + 20 + 5 + 3
    assert record.messages_received == 4
    assert record.h is not None
    assert record.h[0:3] == [1, 2, 1]  # <=4, <=16, +Inf
    assert (record.out_text, record.out_binary, record.out_bytes) == (0, 0, 0)


def test_counts_messages_sent_including_fragments() -> None:
    rec = Recorder()
    monitor = make_monitor([rec], size_buckets=(4, 16))
    conn = conn_with_request()
    record = monitor.open(conn)
    protocol = conn.protocol
    protocol.send_text("ünï".encode())  # 5 bytes
    protocol.send_binary(b"x" * 17)
    protocol.send_binary(b"ab", fin=False)
    protocol.send_ping(b"p")
    protocol.send_continuation(b"cd", fin=False)
    protocol.send_continuation(b"e", fin=True)
    protocol.send_text(b"a", fin=False)
    protocol.send_continuation(b"b", fin=True)
    assert (record.out_text, record.out_binary, record.out_bytes) == (2, 2, 5 + 17 + 5 + 2)
    assert record.messages_sent == 4
    assert record.h is not None
    assert record.h[3:6] == [1, 2, 1]
    assert [e for e in rec.events if e[0] == "message_sent"] == [
        ("message_sent", False, 5),
        ("message_sent", True, 17),
        ("message_sent", True, 5),
        ("message_sent", False, 2),
    ]


def test_frames_websockets_rejects_are_not_counted() -> None:
    monitor = make_monitor()
    conn = conn_with_request(max_size=8)
    record = monitor.open(conn)
    recv(conn, frame(0x2, b"123456789"))
    assert record.in_binary == 0
    assert record.h is None
    assert classify_close(conn.protocol) == "message_too_big"


def test_nothing_is_hooked_without_metrics_or_message_sinks() -> None:
    lifecycle = LifecycleOnly()
    monitor = make_monitor([lifecycle], metrics=False)
    assert not monitor.count_frames
    conn = conn_with_request()
    record = monitor.open(conn)
    assert conn.protocol.extensions == []
    recv(conn, frame(0x1, b"hi"))
    assert record.in_text == 0
    assert lifecycle.events == ["connection_opened"]


def test_the_frame_counter_rides_along_the_negotiated_extensions() -> None:
    monitor = make_monitor()
    conn = conn_with_request()
    monitor.open(conn)
    [counter] = conn.protocol.extensions
    assert counter.name == "ws-monitoring-frame-counter"
    assert repr(counter).startswith("<ws_monitoring ")
    # Before the handshake (the threading server), it joins the list the handshake makes.
    protocol = ServerProtocol()
    record = monitor.prepare(protocol)
    protocol.receive_data(request_bytes())
    [request] = protocol.events_received()
    assert isinstance(request, Request)
    protocol.send_response(protocol.accept(request))
    assert [e.name for e in protocol.extensions] == ["ws-monitoring-frame-counter"]
    protocol.receive_data(frame(0x1, b"counted"))
    assert record.in_text == 1


def test_many_size_buckets_fall_back_to_a_search() -> None:
    # More than 255 bounds: no lookup table, the same buckets by binary search.
    bounds = tuple(float(b) for b in range(1, 301))
    monitor = make_monitor(size_buckets=bounds)
    conn = conn_with_request()
    record = monitor.open(conn)
    recv(conn, frame(0x2, b"x" * 5), frame(0x2, b"x" * 1000))
    conn.protocol.send_binary(b"y" * 300)
    assert record.h is not None
    n = len(bounds) + 1
    assert [i for i, c in enumerate(record.h[:n]) if c] == [4, 300]
    assert [i for i, c in enumerate(record.h[n : 2 * n]) if c] == [299]


def test_a_peer_gone_before_open_has_no_address() -> None:
    """The threading server's socket may be closed by the time the record opens."""

    class ClosedSocketConn:
        def __init__(self, conn: Conn) -> None:
            self.protocol, self.request, self.id = conn.protocol, conn.request, conn.id
            self.subprotocol = None

        @property
        def remote_address(self) -> Any:
            sock = socket.socket()
            sock.close()
            return sock.getpeername()  # OSError, as on a socket the client reset

    monitor = make_monitor()
    record = monitor.open(ClosedSocketConn(conn_with_request()))
    assert record.remote_address is None
    assert record.client.ip is None


def test_message_sinks_alone_turn_frame_counting_on() -> None:
    monitor = make_monitor([Recorder()], metrics=False)
    assert monitor.count_frames
    conn = conn_with_request()
    record = monitor.open(conn)
    recv(conn, frame(0x1, b"hi"))
    assert record.in_text == 1


def test_ping_rtt_from_the_matching_pong_only() -> None:
    monitor = make_monitor(rtt_buckets=(1e-9, 60.0))
    conn = conn_with_request()
    record = monitor.open(conn)
    recv(conn, frame(0xA, b"unsolicited"))  # no ping pending: ignored
    assert record.h is None
    conn.protocol.send_ping(b"abcd")
    recv(conn, frame(0xA, b"nope"))  # not the payload we sent: ignored
    assert record.rtt_sum == 0.0
    recv(conn, frame(0xA, b"abcd"))
    assert record.rtt_sum > 0.0
    assert record.h is not None
    rtt = record.h[monitor.layout.rtt : monitor.layout.length]
    assert rtt == [0, 1, 0]
    recv(conn, frame(0xA, b"abcd"))  # a duplicate pong is not a second sample
    assert record.h[monitor.layout.rtt : monitor.layout.length] == [0, 1, 0]


def test_message_duration_and_exemplars() -> None:
    monitor = make_monitor(duration_buckets=(60.0,))
    record = monitor.open(conn_with_request())
    record.message_done()  # nothing handed yet: nothing to time
    assert record.h is None
    record.message_handed("a")
    record.exemplar_trace_id = "0af7651916cd43dd8448eb211c80319c"
    record.message_done()
    assert record.exemplar_trace_id is None
    assert record.exemplars is not None
    trace_id, value, timestamp = record.exemplars[0]
    assert trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert 0 <= value == record.handling_sum
    assert timestamp > 1e9
    record.message_handed("b")
    record.message_done()
    assert list(record.exemplars) == [0]
    record.message_handed("c")
    record.exemplar_trace_id = "00f067aa0ba902b7a3ce929d0e0e4736"
    record.message_done()
    assert record.exemplars[0][0] == "00f067aa0ba902b7a3ce929d0e0e4736"
    assert record.h is not None
    d = monitor.layout.duration
    assert record.h[d : d + 2] == [3, 0]


def test_sink_exceptions_are_isolated_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    broken, healthy = Recorder("broken", fail=True), Recorder("healthy")
    monitor = make_monitor([broken, healthy])
    conn = conn_with_request()
    handshake = monitor.handshake_started()
    with caplog.at_level(logging.ERROR, logger="ws_monitoring"):
        monitor.handshake_finished(handshake, request=conn.request, response=None, accepted=True)
        record = monitor.open(conn, handshake=handshake)
        record.message_handed("m")
        conn.protocol.send_text(b"r")
        record.message_done()
        monitor.failed(record, KeyError("k"))
        monitor.closed(record, conn.protocol)
        monitor.shutdown(0.5)
    expected = [
        "handshake_finished",
        "connection_opened",
        "message_started",
        "message_sent",
        "message_finished",
        "message_finished",
        "handler_failed",
        "connection_closed",
        "shutdown",
    ]
    # message_done runs twice (done, then failed() on a finished message is a no-op).
    expected.remove("message_finished")
    assert [e[0] for e in healthy.events] == expected
    assert [e[0] for e in broken.events] == expected
    # The broken sink got None as its token: its message_started raised.
    assert ("message_finished", None, None) in broken.events
    failures = [r.getMessage() for r in caplog.records if r.name == "ws_monitoring"]
    assert failures == [f"ws_monitoring sink Recorder.{name} failed" for name in expected]
    assert all(r.exc_info for r in caplog.records)


def test_failed_records_the_handler_exception() -> None:
    rec = Recorder()
    monitor = make_monitor([rec])
    conn = conn_with_request()
    record = monitor.open(conn)
    exc = ZeroDivisionError()
    monitor.failed(record, exc)
    assert record.error is exc
    assert record.error_type == "handler_exception"
    conn.protocol.send_close(1011)
    monitor.closed(record, conn.protocol)
    # handler_exception is not replaced by how the connection ended afterwards.
    assert record.error_type == "handler_exception"
    # No answer from the peer: the code the server sent.
    assert record.close_code == 1011


def test_age_runs_while_open_and_freezes_when_closed() -> None:
    monitor = make_monitor()
    conn = conn_with_request()
    record = monitor.open(conn)
    first = record.age
    assert record.age >= first > 0
    recv(conn, close_frame(1001, b"bye"))
    monitor.closed(record, conn.protocol)
    frozen = record.age
    assert record.age == frozen
    assert (record.close_code, record.close_reason, record.error_type) == (1001, "bye", None)


@pytest.mark.parametrize(
    ("payload", "code", "error"),
    [
        (struct.pack("!H", 5000), 1002, "protocol_error"),
        (struct.pack("!H", 999), 1002, "protocol_error"),
        (struct.pack("!H", 1005), 1002, "protocol_error"),
        (struct.pack("!H", 1004), 1002, "protocol_error"),
        (b"\x03", 1002, "protocol_error"),  # too short to hold a code
        (struct.pack("!H", 1000) + b"\xff", 1007, "invalid_payload"),  # invalid UTF-8 reason
    ],
)
def test_a_close_frame_websockets_rejects_is_recorded_as_the_servers_close(
    payload: bytes, code: int, error: str
) -> None:
    # What the server did, not what the peer asked for: it failed the connection.
    monitor = make_monitor()
    conn = conn_with_request()
    record = monitor.open(conn)
    recv(conn, frame(0x8, payload))
    assert conn.protocol.close_rcvd is None
    assert conn.protocol.close_sent is not None
    assert conn.protocol.close_sent.code == code
    monitor.closed(record, conn.protocol)
    assert record.close_code == code
    assert record.close_reason == conn.protocol.close_sent.reason
    assert record.error_type == error


# -- classify_close ----------------------------------------------------------------------------


class _BrokenExtension(Extension):
    """An extension whose decoder crashes: websockets fails the connection with 1011."""

    name = ExtensionName("x-broken")

    def decode(self, frame: Frame, *, max_size: int | None = None) -> Frame:
        raise RuntimeError("decoder bug")

    def encode(self, frame: Frame) -> Frame:
        return frame


class _BrokenFactory(ServerExtensionFactory):
    name = ExtensionName("x-broken")

    def process_request_params(
        self, params: Sequence[ExtensionParameter], accepted: Sequence[Extension]
    ) -> tuple[list[ExtensionParameter], Extension]:
        return [], _BrokenExtension()


def _closed_protocol(action: str) -> ServerProtocol:
    if action == "broken_extension":
        protocol = ServerProtocol(extensions=[_BrokenFactory()])
        protocol.receive_data(request_bytes(extra="Sec-WebSocket-Extensions: x-broken\r\n"))
        [request] = protocol.events_received()
        assert isinstance(request, Request)
        protocol.send_response(protocol.accept(request))
        protocol.receive_data(frame(0x1, b"x"))
        return protocol
    protocol = conn_with_request(max_size=4).protocol
    if action == "too_big":
        protocol.receive_data(frame(0x2, b"12345"))
    elif action == "bad_utf8_reason":
        protocol.receive_data(frame(0x8, struct.pack("!H", 1000) + b"\xc3"))
    elif action == "unmasked":
        protocol.receive_data(frame(0x1, b"x", mask=False))
    elif action == "eof_mid_frame":
        protocol.receive_data(frame(0x2, b"abcd")[:3])
        protocol.receive_eof()
    elif action == "eof":
        protocol.receive_eof()
    elif action in ("fail_1007", "fail_1009", "fail_1002"):
        protocol.fail(int(action[-4:]), "found by the connection")
        protocol.receive_eof()
    elif action == "ping_timeout":
        protocol.fail(1011, "keepalive ping timeout")
        protocol.receive_eof()
    elif action == "fragment_error":
        protocol.send_text(b"part", fin=False)
        protocol.fail(1011, "error in fragmented message")
        protocol.receive_eof()
    elif action == "peer_1002_echoed":
        # The peer says the server broke the protocol; the server only echoes it.
        protocol.receive_data(close_frame(1002))
    elif action == "fail_normal_code":
        protocol.fail(1008, "policy")
        protocol.receive_eof()
    elif action == "app_1011":
        protocol.send_close(1011, "restarting")
        protocol.receive_data(close_frame(1011))
    elif action == "normal":
        protocol.receive_data(close_frame(1000))
    elif action == "server_closes":
        protocol.send_close(4000, "kicked")
        protocol.receive_data(close_frame(4000))
    return protocol


@pytest.mark.parametrize(
    ("action", "kind"),
    [
        ("too_big", "message_too_big"),
        ("bad_utf8_reason", "invalid_payload"),
        ("unmasked", "protocol_error"),
        ("eof_mid_frame", "connection_reset"),
        ("broken_extension", "internal_error"),
        ("eof", "connection_reset"),
        ("fail_1007", "invalid_payload"),
        ("fail_1009", "message_too_big"),
        ("fail_1002", "protocol_error"),
        ("ping_timeout", "timeout"),
        ("app_1011", "internal_error"),
        ("fragment_error", "internal_error"),
        ("peer_1002_echoed", None),
        ("fail_normal_code", None),
        ("still_open", "connection_reset"),
        ("normal", None),
        ("server_closes", None),
    ],
)
def test_classify_close(action: str, kind: str | None) -> None:
    assert classify_close(_closed_protocol(action)) == kind


# -- handshakes ----------------------------------------------------------------------------------


def test_handshake_outcomes() -> None:
    rec = Recorder()
    monitor = make_monitor([rec])
    protocol = ServerProtocol()
    protocol.receive_data(request_bytes("/private?x=1"))
    [request] = protocol.events_received()
    assert isinstance(request, Request)

    rejected = monitor.handshake_started()
    monitor.handshake_finished(
        rejected, request=request, response=protocol.reject(401, "no"), accepted=False
    )
    assert (rejected.outcome, rejected.status, rejected.failure) == ("rejected", 401, None)
    # A rejected request does not claim a place in the route table.
    assert (rejected.path, rejected.route) == ("/private", "__overflow__")
    assert monitor.routes.peek("/private") == "__overflow__"

    timed_out = monitor.handshake_started()
    monitor.handshake_finished(
        timed_out, request=None, response=None, accepted=False, failure="timeout"
    )
    assert (timed_out.outcome, timed_out.status, timed_out.failure) == ("failed", None, "timeout")
    assert (timed_out.path, timed_out.route) == ("", "")

    unknown = monitor.handshake_started()
    error = OSError("boom")
    monitor.handshake_finished(unknown, request=None, response=None, accepted=False, error=error)
    assert (unknown.outcome, unknown.failure, unknown.error) == ("failed", "error", error)

    # A failure after a response was built (e.g. the client left during a 503) is a failure.
    lost = monitor.handshake_started()
    monitor.handshake_finished(
        lost,
        request=request,
        response=protocol.reject(503, "bye"),
        accepted=False,
        failure="connection_lost",
    )
    assert (lost.outcome, lost.failure) == ("failed", "connection_lost")

    health = monitor.handshake_started()
    monitor.handshake_finished(
        health,
        request=request,
        response=protocol.reject(200, "OK"),
        accepted=False,
        health_check=True,
    )
    assert health.health_check
    assert all(h.duration >= 0 for h in (rejected, timed_out, unknown, lost, health))
    assert [e[1] for e in rec.events] == ["rejected", "failed", "failed", "failed", "rejected"]
