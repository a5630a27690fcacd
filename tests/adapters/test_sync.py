"""The threading adapter (``serve_sync``): counting, hooks, health checks, failures.

Real ``websockets.sync`` servers and clients; the server runs in its own threads.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.http11 import Request, Response
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection

from tests.adapters.test_asyncio import SAMPLING_MESSAGES, _SamplingSink, assert_sampling_calls
from tests.helpers.scrape import Samples
from tests.helpers.servers import HOST, settled_sync, sync_echo, sync_server, wait_until
from ws_monitoring.core import RECORD_ATTR, ConnectionRecord, HandshakeRecord


def messages(samples: Samples, route: str, direction: str, kind: str) -> float | None:
    return samples.get("websocket_messages_total", route=route, direction=direction, type=kind)


def size(samples: Samples, route: str, direction: str) -> tuple[float | None, float | None]:
    labels = {"route": route, "direction": direction}
    return (
        samples.get("websocket_message_size_bytes_count", **labels),
        samples.get("websocket_message_size_bytes_sum", **labels),
    )


def http(port: int, data: bytes) -> bytes:
    """Send raw bytes to the WebSocket port; everything it answers until it closes.

    A server that drops the connection with our request unread sends a reset: that
    is an answer of nothing, like a plain close.
    """
    chunks = []
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


@pytest.mark.parametrize("tracing", [True, False], ids=["message-sinks", "metrics-only"])
def test_every_way_to_receive_is_counted(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples], tracing: bool
) -> None:
    # With tracing on, a message sink sees every message; without, the fast path runs.
    monitoring = {**monitoring, "tracing": tracing}

    def handler(ws: ServerConnection) -> None:
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0)  # nothing yet: no message handed, nothing timed
        ws.send("ready")
        first = ws.recv()
        parts = list(ws.recv_streaming())
        ws.send(f"{first}|{''.join(parts)}")
        for message in ws:
            ws.send(message)

    with sync_server(handler, monitoring=monitoring) as srv, connect(srv.url("/r")) as client:
        assert client.recv() == "ready"
        client.send("héllo")
        client.send(["frag", "ment", "ed"])
        assert client.recv() == "héllo|fragmented"
        client.send(b"\x00" * 70)
        assert client.recv() == b"\x00" * 70
    samples = settled_sync(scrape_metrics, 1)
    assert messages(samples, "/r", "received", "text") == 2
    assert messages(samples, "/r", "received", "binary") == 1
    assert size(samples, "/r", "received") == (3, 6 + 10 + 70)
    assert messages(samples, "/r", "sent", "text") == 2
    assert messages(samples, "/r", "sent", "binary") == 1
    assert size(samples, "/r", "sent") == (3, 5 + 17 + 70)
    assert samples["websocket_message_duration_seconds_count", {"route": "/r"}] == 3


def test_fragmented_sends_and_sends_from_other_threads(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    def handler(ws: ServerConnection) -> None:
        ws.send(["ab", "cd", "é"])
        ws.send(iter([b"x", b"yz"]))
        sender = threading.Thread(target=ws.send, args=("from a thread",))
        sender.start()
        sender.join()
        ws.recv()

    with sync_server(handler, monitoring=monitoring) as srv, connect(srv.url("/s")) as client:
        assert [client.recv() for _ in range(3)] == ["abcdé", b"xyz", "from a thread"]
        client.send("done")
    samples = settled_sync(scrape_metrics, 1)
    assert messages(samples, "/s", "sent", "text") == 2
    assert messages(samples, "/s", "sent", "binary") == 1
    assert size(samples, "/s", "sent") == (3, 6 + 3 + 13)


def test_handler_crash_closes_1011_and_counts_the_error(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    def handler(ws: ServerConnection) -> None:
        ws.recv()
        raise ValueError("bug")

    with sync_server(handler, monitoring=monitoring) as srv, connect(srv.url("/c")) as client:
        client.send("x")
        with pytest.raises(ConnectionClosedError) as caught:
            client.recv()
    assert caught.value.rcvd is not None
    assert caught.value.rcvd.code == 1011
    samples = settled_sync(scrape_metrics, 1)
    assert samples["websocket_errors_total", {"route": "/c", "type": "handler_exception"}] == 1
    assert samples["websocket_disconnections_total", {"route": "/c", "code": "1011"}] == 1
    assert samples["websocket_message_duration_seconds_count", {"route": "/c"}] == 1


def test_peer_leaving_under_the_handler_is_no_handler_error(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    def handler(ws: ServerConnection) -> None:
        ws.send("ready")
        ws.recv()  # raises ConnectionClosedOK

    with sync_server(handler, monitoring=monitoring) as srv:
        with connect(srv.url("/bye")) as client:
            assert client.recv() == "ready"
            client.close(1001)
        samples = settled_sync(scrape_metrics, 1)
    assert samples.series("websocket_errors_total") == []
    assert samples["websocket_disconnections_total", {"route": "/bye", "code": "1001"}] == 1


def test_user_hooks_and_connection_class_keep_working(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    class AppConnection(ServerConnection):
        app_state = "custom"

    calls: list[str] = []

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        calls.append(f"request {request.path}")
        if request.path == "/private":
            return connection.respond(401, "who are you?\n")
        return None

    def process_response(
        connection: ServerConnection, request: Request, response: Response
    ) -> Response | None:
        calls.append(f"response {response.status_code}")
        response.headers["X-App"] = "yes"
        return None

    seen: list[Any] = []

    def handler(ws: ServerConnection) -> None:
        seen.append((type(ws).__mro__[1], ws.app_state))  # type: ignore[attr-defined]
        ws.send("hi")

    with sync_server(
        handler,
        monitoring=monitoring,
        process_request=process_request,
        process_response=process_response,
        create_connection=AppConnection,
    ) as srv:
        with connect(srv.url("/ok")) as client:
            assert client.response.headers["X-App"] == "yes"
            assert client.recv() == "hi"
        with pytest.raises(InvalidStatus) as caught:
            connect(srv.url("/private"))
        assert caught.value.response.status_code == 401
        samples = settled_sync(scrape_metrics, 1, handshakes=2)
    assert calls == ["request /ok", "response 101", "request /private", "response 401"]
    assert seen == [(AppConnection, "custom")]
    assert samples["websocket_handshake_failures_total", {"status": "401"}] == 1
    assert samples["websocket_handshake_duration_seconds_count"] == 2


def test_health_check_and_failures_before_a_response(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    def handler(ws: ServerConnection) -> None:
        ws.send("hi")

    monitoring = {"registry": registry, "health_path": "/ready"}
    with sync_server(handler, monitoring=monitoring, open_timeout=0.3) as srv:
        answer = http(srv.port, b"GET /ready?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answer.endswith(b"\r\n\r\nOK\n")
        assert http(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
            b"HTTP/1.1 426 "
        )
        assert http(srv.port, b"NOT HTTP\r\n\r\n") == b""
        assert http(srv.port, b"GET / HTTP/1.1\r\n") == b""  # open_timeout
        with socket.create_connection((HOST, srv.port)):
            pass  # connects and leaves
        with connect(srv.url("/")) as client:
            assert client.recv() == "hi"

        def failures() -> dict[str, float] | None:
            samples = scrape_metrics()
            found = {
                labels["status"]: samples["websocket_handshake_failures_total", labels]
                for labels in samples.series("websocket_handshake_failures_total")
            }
            return found if sum(found.values()) == 4 else None

        assert wait_until(failures) == {
            "426": 1,
            "invalid_request": 1,
            "timeout": 1,
            "connection_lost": 1,
        }
        samples = settled_sync(scrape_metrics, 1)
    assert samples["websocket_handshake_duration_seconds_count"] == 5


def test_a_failing_connection_class_handshake_is_counted(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    class Broken(ServerConnection):
        def handshake(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("bug in the application's connection class")

    def handler(ws: ServerConnection) -> None:
        raise AssertionError("never reached")

    with sync_server(handler, monitoring=monitoring, create_connection=Broken) as srv:
        assert http(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        wait_until(
            lambda: scrape_metrics().get("websocket_handshake_failures_total", status="error")
        )


def test_ping_rtt_is_measured(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    def handler(ws: ServerConnection) -> None:
        ws.recv()

    with (
        sync_server(handler, monitoring=monitoring, ping_interval=0.02) as srv,
        connect(srv.url("/p")) as client,
    ):
        # Live connections are in the scrape: wait for the first keepalive pong.
        wait_until(
            lambda: scrape_metrics().get("websocket_ping_rtt_seconds_count", route="/p"),
            what="a keepalive round trip",
        )
        client.send("done")
    samples = settled_sync(scrape_metrics, 1)
    assert samples["websocket_ping_rtt_seconds_count", {"route": "/p"}] >= 1
    assert samples["websocket_ping_rtt_seconds_sum", {"route": "/p"}] > 0


def test_health_check_off(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    seen: list[str] = []

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        seen.append(request.path)
        return None

    def handler(ws: ServerConnection) -> None:
        ws.send("hi")

    monitoring = {"registry": registry, "health_path": None}
    with sync_server(handler, monitoring=monitoring, process_request=process_request) as srv:
        answer = http(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 426 ")
        samples = settled_sync(scrape_metrics, 0, handshakes=1)
    # The path reaches the user's hook and is an ordinary failed WebSocket handshake.
    assert seen == ["/healthz"]
    assert samples["websocket_handshake_failures_total", {"status": "426"}] == 1


class SlowToOpen:
    """A sink slow to see a handshake end: the client is gone before the handler starts.

    It makes a real interleaving happen on demand: websockets skips the handler of a
    connection that is closed by the end of its handshake.
    """

    def __init__(self) -> None:
        #: Connections by arrival, from the server's process_request.
        self.connections: list[ServerConnection] = []

    def connection_opened(self, connection: ConnectionRecord) -> None: ...
    def handler_failed(self, connection: ConnectionRecord, exc: BaseException) -> None: ...
    def connection_closed(self, connection: ConnectionRecord) -> None: ...
    def shutdown(self, timeout: float) -> None: ...

    def handshake_finished(self, handshake: HandshakeRecord) -> None:
        if handshake.outcome == "accepted" and handshake.path == "/gone":
            reader = self.connections.pop().recv_events_thread
            wait_until(lambda: not reader.is_alive(), what="the reader thread to end")


def test_a_connection_closed_before_its_handler_is_counted(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    ran: list[bool] = []

    def handler(ws: ServerConnection) -> None:
        ran.append(True)

    slow = SlowToOpen()

    def process_request(connection: ServerConnection, request: Request) -> None:
        slow.connections.append(connection)

    monitoring = {"registry": registry, "sinks": [slow]}
    with sync_server(handler, monitoring=monitoring, process_request=process_request) as srv:
        with connect(srv.url("/gone")):
            pass
        samples = settled_sync(scrape_metrics, 1)
    assert ran == []
    assert samples["websocket_connections_total", {"route": "/gone"}] == 1
    assert samples["websocket_disconnections_total", {"route": "/gone", "code": "1000"}] == 1
    assert samples["websocket_connections_active", {"route": "/gone"}] == 0


def test_create_connection_wrapper_function_still_works(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    """websockets documents "a wrapper or a subclass": a function cannot be subclassed."""
    created: list[ServerConnection] = []

    def factory(*args: Any, **kwargs: Any) -> ServerConnection:
        connection = ServerConnection(*args, **kwargs)
        created.append(connection)
        return connection

    options = {"registry": registry}
    with (
        sync_server(sync_echo, monitoring=options, create_connection=factory) as srv,
        connect(srv.url("/w")) as client,
    ):
        client.send("x")
        assert client.recv() == "x"
    assert len(created) == 1
    samples = settled_sync(scrape_metrics, 1)
    labels = {"route": "/w", "direction": "received", "type": "text"}
    assert samples["websocket_messages_total", labels] == 1


def test_one_message_sink_gets_exactly_the_calls_it_asked_for(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """The threading server's recv() dispatches like the asyncio one (in C when built)."""
    sink = _SamplingSink()
    records: list[ConnectionRecord] = []

    def handler(ws: ServerConnection) -> None:
        records.append(getattr(ws, RECORD_ATTR))
        for message in ws:
            if "slow" in str(message):
                time.sleep(0.1)
            ws.send(message)

    options = {"registry": registry, "sinks": [sink], "tracing": False}
    with sync_server(handler, monitoring=options) as srv, connect(srv.url("/s")) as client:
        for message in SAMPLING_MESSAGES:
            client.send(message)
            assert client.recv() == message
    wait_until(lambda: any(call == "finished" and t == "token b" for call, t in sink.calls))
    [record] = records
    assert_sampling_calls(sink, SAMPLING_MESSAGES, caplog, record)


class OpensLate(ServerConnection):
    """Keeps websockets from calling the handler until the client's first frames are parsed.

    What a busy server does by chance: the reader thread parses what a client sends
    right after its handshake (subscribe, authenticate) before the handler starts.
    """

    #: Frames the reader thread must have queued before the handshake returns.
    queued = 3

    def handshake(self, *args: Any, **kwargs: Any) -> None:
        super().handshake(*args, **kwargs)
        frames = self.recv_messages.frames
        wait_until(lambda: frames.qsize() >= self.queued, what="the first frames to be parsed")


@pytest.mark.parametrize("crash", [False, True], ids=["echo", "crash"])
def test_instrument_on_plain_serve_counts_frames_parsed_before_the_handler(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples], crash: bool
) -> None:
    import ws_monitoring

    started = threading.Event()

    def handler(ws: ServerConnection) -> None:
        started.set()
        for message in ws:
            # It crashes on the last message, once the client has sent everything: a crash
            # on the first one would race the client's last frame against the close.
            if crash and message == "fragmented":
                raise ValueError("bad message")
            ws.send(message)

    def fragments() -> Iterator[str]:
        yield "frag"  # parsed before the handler starts...
        started.wait(10)
        yield "mented"  # ...and the rest of the message after.

    instrumented = ws_monitoring.instrument(handler, registry=registry)
    with (
        sync_server(instrumented, create_connection=OpensLate) as srv,
        connect(srv.url("/late")) as client,
    ):
        client.send("first")
        client.send(b"\x00\x01")
        client.send(fragments())
        assert [client.recv(), client.recv()] == ["first", b"\0\1"]
        if crash:
            # Wait for the crash: the server closes with 1011 after the last message.
            with pytest.raises(ConnectionClosedError) as closed:
                client.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1011
        else:
            assert client.recv() == "fragmented"
    samples = settled_sync(scrape_metrics, 1)
    if crash:
        # The handler crashed on the message it received last: it was still counted.
        assert samples["websocket_errors_total", {"route": "/late", "type": "handler_exception"}]
    assert messages(samples, "/late", "received", "text") == 2
    assert messages(samples, "/late", "received", "binary") == 1
    assert size(samples, "/late", "received") == (3, len("first") + 2 + len("fragmented"))
    assert messages(samples, "/late", "sent", "text") == (1 if crash else 2)


def test_instrument_on_plain_serve_with_unknown_internals_says_where_counts_are_exact(
    registry: CollectorRegistry,
    scrape_metrics: Callable[[], Samples],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ws_monitoring
    from ws_monitoring.adapters import sync

    class Events(list[Any]):
        """Not the list websockets uses: like a release whose internals differ."""

    class Unknown(ServerConnection):
        def handshake(self, *args: Any, **kwargs: Any) -> None:
            super().handshake(*args, **kwargs)
            self.protocol.events = Events()

    def echo(ws: ServerConnection) -> None:
        ws.send("ready")
        for message in ws:
            ws.send(message)

    monkeypatch.setattr(sync, "_warned_internals", False)
    instrumented = ws_monitoring.instrument(echo, registry=registry)
    for _ in range(2):
        with (
            sync_server(instrumented, create_connection=Unknown) as srv,
            connect(srv.url("/u")) as client,
        ):
            assert client.recv() == "ready"
            client.send("x")
            assert client.recv() == "x"
    samples = settled_sync(scrape_metrics, 2)
    assert messages(samples, "/u", "received", "text") == 2
    warnings = [r for r in caplog.records if "serve_sync counts them all" in r.getMessage()]
    assert len(warnings) == 1
