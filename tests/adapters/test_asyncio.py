"""The asyncio adapter: counting however messages move, hooks chained, health checks.

Real ``websockets`` servers and clients on 127.0.0.1; every count is read from a scrape.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.http11 import Request, Response

from tests.helpers.scrape import Samples
from tests.helpers.servers import RawClient, async_server, async_wait_until, echo, settled
from ws_monitoring.core import RECORD_ATTR, ConnectionRecord
from ws_monitoring.typing import NOT_SAMPLED


def messages(samples: Samples, route: str, direction: str, kind: str) -> float | None:
    return samples.get("websocket_messages_total", route=route, direction=direction, type=kind)


def size(samples: Samples, route: str, direction: str) -> tuple[float | None, float | None]:
    labels = {"route": route, "direction": direction}
    return (
        samples.get("websocket_message_size_bytes_count", **labels),
        samples.get("websocket_message_size_bytes_sum", **labels),
    )


async def test_broadcast_counts_one_sent_message_per_connection(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with async_server(handler, monitoring=monitoring) as srv:
        clients = [await connect(srv.url("/news")) for _ in range(3)]
        await async_wait_until(lambda: len(srv.server.connections) == 3)
        broadcast(srv.server.connections, "news")
        broadcast(srv.server.connections, b"\x00\x01\x02")
        for client in clients:
            assert await client.recv() == "news"
            assert await client.recv() == b"\x00\x01\x02"
            await client.close()
        samples = await settled(scrape_metrics, 3)
    assert messages(samples, "/news", "sent", "text") == 3
    assert messages(samples, "/news", "sent", "binary") == 3
    assert size(samples, "/news", "sent") == (6, 3 * 4 + 3 * 3)
    assert messages(samples, "/news", "received", "text") == 0


async def test_send_counts_fragmented_messages_once(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    async def fragments() -> AsyncIterator[str]:
        for part in ("ab", "cd", "é"):
            yield part

    async def handler(ws: ServerConnection) -> None:
        assert await ws.send("plain") is None
        await ws.send(fragments())  # async iterator: one text message in 3 frames
        await ws.send([b"x", b"yz"])  # iterator: one binary message in 2 frames
        await ws.send(b"")
        await ws.wait_closed()

    async with async_server(handler, monitoring=monitoring) as srv:
        async with connect(srv.url("/send")) as client:
            assert [await client.recv() for _ in range(4)] == ["plain", "abcdé", b"xyz", b""]
        samples = await settled(scrape_metrics, 1)
    assert messages(samples, "/send", "sent", "text") == 2
    assert messages(samples, "/send", "sent", "binary") == 2
    # Payload bytes: UTF-8 for text ("é" is 2 bytes).
    assert size(samples, "/send", "sent") == (4, 5 + 6 + 3 + 0)
    bucket = samples.get(
        "websocket_message_size_bytes_bucket", route="/send", direction="sent", le="64.0"
    )
    assert bucket == 4


@pytest.mark.parametrize("tracing", [True, False], ids=["message-sinks", "metrics-only"])
async def test_recv_recv_streaming_and_async_for_are_counted(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples], tracing: bool
) -> None:
    # With tracing on, a message sink sees every message; without, the fast path runs.
    monitoring = {**monitoring, "tracing": tracing}

    async def handler(ws: ServerConnection) -> None:
        first = await ws.recv()
        parts = [fragment async for fragment in ws.recv_streaming()]
        await ws.send(f"{first}|{''.join(parts)}")
        async for message in ws:
            await ws.send(message)

    async with async_server(handler, monitoring=monitoring) as srv:
        async with connect(srv.url("/recv")) as client:
            await client.send("héllo")  # 6 bytes
            await client.send(["frag", "ment", "ed"])  # one message, 3 frames, 10 bytes
            assert await client.recv() == "héllo|fragmented"
            await client.send(b"\xff" * 100)
            assert await client.recv() == b"\xff" * 100
            await client.send("last")
            assert await client.recv() == "last"
        samples = await settled(scrape_metrics, 1)
    assert messages(samples, "/recv", "received", "text") == 3
    assert messages(samples, "/recv", "received", "binary") == 1
    assert size(samples, "/recv", "received") == (4, 6 + 10 + 100 + 4)
    assert messages(samples, "/recv", "sent", "text") == 2
    assert messages(samples, "/recv", "sent", "binary") == 1
    # Handling time: one per message handed to the handler (the streamed one included).
    assert samples["websocket_message_duration_seconds_count", {"route": "/recv"}] == 4


async def test_message_duration_covers_the_handler_work(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            await asyncio.sleep(0.05)  # the work handling this message
            await ws.send(message)

    async with async_server(handler, monitoring=monitoring) as srv:
        async with connect(srv.url("/work")) as client:
            for text in ("a", "b"):
                await client.send(text)
                assert await client.recv() == text
        samples = await settled(scrape_metrics, 1)
    assert samples["websocket_message_duration_seconds_count", {"route": "/work"}] == 2
    assert samples["websocket_message_duration_seconds_sum", {"route": "/work"}] >= 0.1
    # Nothing was handled in under the sleep: the first buckets stay empty.
    bucket = {"route": "/work", "le": "0.025"}
    assert samples["websocket_message_duration_seconds_bucket", bucket] == 0


async def test_active_gauge_and_connection_duration(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with async_server(handler, monitoring=monitoring) as srv:
        first = await connect(srv.url("/live"))
        second = await connect(srv.url("/live"))
        samples = scrape_metrics()
        assert samples["websocket_connections_active", {"route": "/live"}] == 2
        assert samples["websocket_connections_total", {"route": "/live"}] == 2
        await first.close()
        await second.close()
        samples = await settled(scrape_metrics, 2)
    assert samples["websocket_connections_active", {"route": "/live"}] == 0
    assert samples["websocket_connection_duration_seconds_count", {"route": "/live"}] == 2
    assert samples["websocket_connection_duration_seconds_sum", {"route": "/live"}] > 0


async def test_handler_crash_closes_1011_and_counts_the_error(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        raise ValueError("bug")

    async with async_server(handler, monitoring=monitoring) as srv:
        async with connect(srv.url("/crash")) as client:
            await client.send("x")
            with pytest.raises(ConnectionClosedError) as caught:
                await client.recv()
        assert caught.value.rcvd is not None
        assert caught.value.rcvd.code == 1011
        samples = await settled(scrape_metrics, 1)
    assert samples.series("websocket_errors_total") == [
        {"route": "/crash", "type": "handler_exception"}
    ]
    assert samples["websocket_errors_total", {"route": "/crash", "type": "handler_exception"}] == 1
    assert samples["websocket_disconnections_total", {"route": "/crash", "code": "1011"}] == 1
    assert samples["websocket_message_duration_seconds_count", {"route": "/crash"}] == 1


async def test_peer_leaving_under_the_handler_is_no_handler_error(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.recv()  # raises ConnectionClosedOK: the client said goodbye

    async with async_server(handler, monitoring=monitoring) as srv:
        async with connect(srv.url("/bye")) as client:
            await client.send("x")
            await client.close(1001)
        samples = await settled(scrape_metrics, 1)
    assert samples.series("websocket_errors_total") == []
    assert samples["websocket_disconnections_total", {"route": "/bye", "code": "1001"}] == 1


async def test_user_hooks_and_connection_class_keep_working(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    calls: list[str] = []

    class AppConnection(ServerConnection):
        app_state = "custom"

    async def process_request(connection: ServerConnection, request: Request) -> Response | None:
        calls.append(f"request {request.path}")
        assert isinstance(connection, AppConnection)
        if request.path == "/forbidden":
            return connection.respond(403, "no\n")
        return None

    def process_response(
        connection: ServerConnection, request: Request, response: Response
    ) -> Response | None:
        calls.append(f"response {response.status_code}")
        response.headers["X-App"] = "yes"
        return None

    seen: list[Any] = []

    async def handler(ws: ServerConnection) -> None:
        seen.append((type(ws).__mro__[1], ws.app_state))  # type: ignore[attr-defined]
        await ws.send("hi")

    async with async_server(
        handler,
        monitoring=monitoring,
        process_request=process_request,
        process_response=process_response,
        create_connection=AppConnection,
    ) as srv:
        async with connect(srv.url("/ok")) as client:
            assert client.response.headers["X-App"] == "yes"
            assert await client.recv() == "hi"
        with pytest.raises(InvalidStatus) as caught:
            await connect(srv.url("/forbidden"))
        assert caught.value.response.status_code == 403
        assert caught.value.response.headers["X-App"] == "yes"
        samples = await settled(scrape_metrics, 1, handshakes=2)
    assert calls == ["request /ok", "response 101", "request /forbidden", "response 403"]
    assert seen == [(AppConnection, "custom")]
    assert samples["websocket_handshake_failures_total", {"status": "403"}] == 1


async def test_sync_process_request_hook_is_chained(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        return connection.respond(418, "teapot\n") if request.path == "/tea" else None

    async def handler(ws: ServerConnection) -> None:
        await ws.send("coffee")

    async with async_server(handler, monitoring=monitoring, process_request=process_request) as srv:
        with pytest.raises(InvalidStatus):
            await connect(srv.url("/tea"))
        async with connect(srv.url("/coffee")) as client:
            assert await client.recv() == "coffee"
        samples = await settled(scrape_metrics, 1, handshakes=2)
    assert samples["websocket_handshake_failures_total", {"status": "418"}] == 1


async def test_a_failing_connection_class_handshake_is_counted(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    class Broken(ServerConnection):
        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("bug in the application's connection class")

    async def handler(ws: ServerConnection) -> None:
        raise AssertionError("never reached")

    async with async_server(handler, monitoring=monitoring, create_connection=Broken) as srv:
        raw = await RawClient.connect(srv.port)
        assert await raw.read_eof() == b""

        def failed() -> bool:
            return scrape_metrics().get("websocket_handshake_failures_total", status="error") == 1

        await async_wait_until(failed)


async def test_health_check_on_the_websocket_port(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    user_paths: list[str] = []

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        user_paths.append(request.path)
        return None

    async def handler(ws: ServerConnection) -> None:
        await ws.send("hi")

    async with async_server(handler, monitoring=monitoring, process_request=process_request) as srv:
        for path in ("/healthz", "/healthz?probe=k8s"):
            raw = await RawClient.connect(srv.port)
            await raw.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            answer = await raw.read_eof()
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
            assert answer.endswith(b"\r\n\r\nOK\n")
        async with connect(srv.url("/app")) as client:
            assert await client.recv() == "hi"
        samples = await settled(scrape_metrics, 1)
    # The health check never reaches the user's hook and is neither a failure nor timed.
    assert user_paths == ["/app"]
    assert samples.series("websocket_handshake_failures_total") == []
    assert samples["websocket_handshake_duration_seconds_count"] == 1


@pytest.mark.parametrize(
    ("health_path", "probe", "status"),
    [("/ready", "/ready", b"200"), ("/ready", "/healthz", b"426"), (None, "/healthz", b"426")],
)
async def test_health_path_is_configurable(
    registry: CollectorRegistry,
    scrape_metrics: Callable[[], Samples],
    health_path: str | None,
    probe: str,
    status: bytes,
) -> None:
    async def handler(ws: ServerConnection) -> None:
        pass

    monitoring = {"registry": registry, "health_path": health_path}
    async with async_server(handler, monitoring=monitoring) as srv:
        raw = await RawClient.connect(srv.port)
        await raw.send(f"GET {probe} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert (await raw.read_eof()).startswith(b"HTTP/1.1 " + status)

        # Then a WebSocket handshake, timed as usual: the probe must not add to it.
        async with connect(srv.url("/after")):
            pass
        # A plain GET that is not the health check is a failed WebSocket handshake.
        failed = 0 if status == b"200" else 1
        samples = await settled(scrape_metrics, 1, handshakes=1 + failed)
    assert samples.total("websocket_handshake_failures_total") == failed
    assert samples["websocket_handshake_duration_seconds_count"] == 1 + failed


async def test_open_timeout_counts_a_timeout(
    monitoring: dict[str, Any], scrape_metrics: Callable[[], Samples]
) -> None:
    async def handler(ws: ServerConnection) -> None:
        pass

    async with async_server(handler, monitoring=monitoring, open_timeout=0.2) as srv:
        raw = await RawClient.connect(srv.port)
        await raw.send(b"GET / HTTP/1.1\r\n")  # and never the rest
        assert await raw.read_eof() == b""
        await async_wait_until(
            lambda: scrape_metrics().get("websocket_handshake_failures_total", status="timeout")
        )
    assert scrape_metrics()["websocket_handshake_duration_seconds_count"] == 1


# -- review fixes ----------------------------------------------------------------------------


async def test_cancelled_handler_closes_with_1011_like_a_bare_server(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    async def cancelled(ws: ServerConnection) -> None:
        await ws.recv()
        raise asyncio.CancelledError

    codes = []
    for monitoring in (None, {"registry": registry}):
        async with (
            async_server(cancelled, monitoring=monitoring) as srv,
            connect(srv.url("/c")) as client,
        ):
            await client.send("go")
            with pytest.raises(ConnectionClosedError):
                await client.recv()
            codes.append(client.close_code)
    assert codes == [1011, 1011]
    samples = await settled(scrape_metrics, 1)
    assert samples["websocket_disconnections_total", {"route": "/c", "code": "1011"}] == 1
    assert samples.total("websocket_errors_total", type="connection_reset") == 0


async def test_health_path_still_accepts_websocket_connections(
    registry: CollectorRegistry,
) -> None:
    async with async_server(echo, monitoring={"registry": registry}) as srv:
        # Plain HTTP gets the health answer; a WebSocket upgrade on the same path opens.
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()
        async with connect(srv.url("/healthz")) as client:
            await client.send("still a route")
            assert await client.recv() == "still a route"


async def test_basic_auth_username_is_the_pseudonymized_user(
    registry: CollectorRegistry,
) -> None:
    from websockets.asyncio.server import basic_auth

    seen: list[Any] = []

    class UserSink:
        def handshake_finished(self, handshake: Any) -> None: ...
        def handler_failed(self, connection: Any, exc: BaseException) -> None: ...
        def connection_closed(self, connection: Any) -> None: ...
        def shutdown(self, timeout: float) -> None: ...
        def connection_opened(self, connection: Any) -> None:
            seen.append(connection.client.user)

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    options = {"registry": registry, "sinks": [UserSink()], "pseudonym_key": b"k" * 32}
    auth = basic_auth(credentials=("alice", "secret"))
    async with async_server(handler, monitoring=options, process_request=auth) as srv:
        url = srv.url("/").replace("ws://", "ws://alice:secret@")
        async with connect(url):
            pass
        await async_wait_until(lambda: seen, what="connection opened")
    (user,) = seen
    assert user is not None
    assert "alice" not in user


async def test_create_connection_wrapper_function_still_works(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    """websockets documents "a wrapper or a subclass": a function cannot be subclassed."""
    created: list[ServerConnection] = []

    def factory(*args: Any, **kwargs: Any) -> ServerConnection:
        connection = ServerConnection(*args, **kwargs)
        created.append(connection)
        return connection

    options = {"registry": registry}
    async with (
        async_server(echo, monitoring=options, create_connection=factory) as srv,
        connect(srv.url("/w")) as client,
    ):
        await client.send("x")
        assert await client.recv() == "x"
    assert len(created) == 1
    samples = await settled(scrape_metrics, 1)
    labels = {"route": "/w", "direction": "received", "type": "text"}
    assert samples["websocket_messages_total", labels] == 1


async def test_recv_timeouts_tasks_and_cancellation_behave_as_on_a_bare_server(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    """``recv()`` returns a timed awaitable, not websockets' coroutine: same behaviour."""

    async def handler(ws: ServerConnection) -> None:
        log: list[str] = []
        try:
            async with asyncio.timeout(0.05):
                await ws.recv()
        except TimeoutError:
            log.append("timeout")
        log.append(str(await asyncio.wait_for(ws.recv(), 5)))
        log.append(str(await asyncio.create_task(ws.recv())))
        pending = asyncio.ensure_future(ws.recv())
        await asyncio.sleep(0.05)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await ws.send("cancelled")
        log.append(str(await ws.recv()))
        awaitable = ws.recv()
        log.append(str(await awaitable))
        with pytest.raises(RuntimeError):
            await awaitable
        await ws.send(" ".join(log))

    logs = []
    for monitoring in (None, {"registry": registry}):
        async with (
            async_server(handler, monitoring=monitoring) as srv,
            connect(srv.url("/r")) as client,
        ):
            await asyncio.sleep(0.2)
            await client.send("one")
            await client.send("two")
            assert await client.recv() == "cancelled"
            await client.send("three")
            await client.send("four")
            logs.append(await client.recv())
    assert logs[0] == logs[1] == "timeout one two three four"
    samples = await settled(scrape_metrics, 1)
    assert (
        samples[
            "websocket_messages_total", {"route": "/r", "direction": "received", "type": "text"}
        ]
        == 4
    )
    # Four messages handed to the handler, four handling times.
    assert samples["websocket_message_duration_seconds_count", {"route": "/r"}] == 4


class _SamplingSink:
    """One message sink, dispatched by the core (in C when built): records its calls."""

    keep_threshold = 0.05

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def handshake_finished(self, handshake: Any) -> None: ...
    def connection_opened(self, connection: Any) -> None: ...
    def handler_failed(self, connection: Any, exc: BaseException) -> None: ...
    def connection_closed(self, connection: Any) -> None: ...
    def shutdown(self, timeout: float) -> None: ...
    def message_sent(self, connection: Any, binary: bool, size: int) -> None: ...

    def message_started(self, connection: Any, message: Any) -> object:
        self.calls.append(("started", message))
        if message == "boom-start":
            raise RuntimeError("started broke")
        return NOT_SAMPLED if message.startswith("q") else f"token {message}"

    def message_finished(
        self, connection: Any, token: object, duration: float, error: BaseException | None
    ) -> None:
        self.calls.append(("finished", token))
        if token == "token boom-finish":
            raise RuntimeError("finished broke")
        if token == "token exemplar":
            connection.exemplar_trace_id = "ab" * 16
        if token == "token skip2":
            # The next two messages: NOT_SAMPLED, without a message_started call.
            connection.sample_skip = 2


async def test_one_message_sink_gets_exactly_the_calls_it_asked_for(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    sink = _SamplingSink()
    records: list[ConnectionRecord] = []

    async def handler(ws: ServerConnection) -> None:
        records.append(getattr(ws, RECORD_ATTR))
        async for message in ws:
            if "slow" in str(message):
                await asyncio.sleep(0.1)
            await ws.send(message)

    messages = SAMPLING_MESSAGES
    async with (
        async_server(
            handler, monitoring={"registry": registry, "sinks": [sink], "tracing": False}
        ) as srv,
        connect(srv.url("/s")) as client,
    ):
        for message in messages:
            await client.send(message)
            assert await client.recv() == message
    [record] = records
    assert_sampling_calls(sink, messages, caplog, record)


#: What ``_SamplingSink`` is sent, by both adapters' tests.
SAMPLING_MESSAGES = [
    *("a", "q", "qslow", "boom-start", "boom-finish", "exemplar", "skip2", "s1", "s2slow", "b")
]


def assert_sampling_calls(
    sink: _SamplingSink,
    messages: list[str],
    caplog: pytest.LogCaptureFixture,
    record: ConnectionRecord,
) -> None:
    finished = [token for call, token in sink.calls if call == "finished"]
    # Not sampled and quick: no call; not sampled but slow: called with the message;
    # a failed message_started: finished with None; "b" is finished when the handler ends.
    assert finished == [
        "token a",
        "qslow",
        None,
        "token boom-finish",
        "token exemplar",
        "token skip2",
        "s2slow",
        "token b",
    ]
    assert [token for call, token in sink.calls if call == "started"] == [
        m for m in messages if m not in ("s1", "s2slow")
    ]
    failures = [r.getMessage() for r in caplog.records if "ws_monitoring sink" in r.getMessage()]
    assert failures == [
        "ws_monitoring sink _SamplingSink.message_started failed",
        "ws_monitoring sink _SamplingSink.message_finished failed",
    ]
    assert all(r.exc_info for r in caplog.records if "ws_monitoring sink" in r.getMessage())
    assert record.exemplars is not None
    assert ("ab" * 16) in [e[0] for e in record.exemplars.values()]


# -- instrument() on websockets' own serve: the class-level recv, no per-connection hooks --


class _RefusesSubclasses(ServerConnection):
    """A connection class that cannot be subclassed: ws-monitoring falls back to hooks."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        raise TypeError("final class")


class _RefusesClassChange(ServerConnection):
    """A connection whose class cannot change (a ``__class__`` that refuses assignment)."""

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(self)

    @__class__.setter
    def __class__(self, value: type) -> None:
        raise TypeError("this connection keeps its class")


@pytest.mark.parametrize(
    "connection_class", [None, "user subclass", _RefusesSubclasses, _RefusesClassChange]
)
async def test_instrument_on_websockets_serve_times_recv_at_class_level(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples], connection_class: Any
) -> None:
    """The connection moves to a timed subclass of its class: same names, no new method
    on the instance, one class for every connection; counted and timed either way."""
    from ws_monitoring import instrument
    from ws_monitoring.core import SPEEDUPS, _speedups

    class AppConnection(ServerConnection):
        def greeting(self) -> str:
            return "hi"

    base = AppConnection if connection_class == "user subclass" else connection_class
    seen: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection) -> None:
        kind = type(ws)
        seen.append(
            {
                "class": kind,
                "names": (kind.__name__, kind.__qualname__, kind.__module__),
                "repr": repr(ws).split(" object at ")[0],
                "on the instance": sorted(k for k in vars(ws) if k in ("recv", "recv_streaming")),
                "recv": kind.__dict__.get("recv"),
            }
        )
        greeting = getattr(ws, "greeting", None)
        async for message in ws:
            await ws.send(greeting() if greeting else message)

    kwargs = {"create_connection": base} if base is not None else {}
    expected = base or ServerConnection
    async with async_server(instrument(handler, registry=registry), **kwargs) as srv:
        for _ in range(2):
            async with connect(srv.url("/i")) as client:
                await client.send("x")
                assert await client.recv() == ("hi" if base is AppConnection else "x")
        samples = await settled(scrape_metrics, 2)
    assert samples["websocket_message_duration_seconds_count", {"route": "/i"}] == 2
    labels = {"route": "/i", "direction": "received", "type": "text"}
    assert samples["websocket_messages_total", labels] == 2
    first, second = seen
    if expected in (_RefusesSubclasses, _RefusesClassChange):
        assert first["class"] is expected
        assert first["on the instance"] == ["recv", "recv_streaming"]
        return
    assert first["class"] is second["class"]
    assert first["class"].__mro__[1] is expected
    assert first["names"] == (expected.__name__, expected.__qualname__, expected.__module__)
    assert first["repr"] == f"<{expected.__module__}.{expected.__qualname__}"
    assert first["on the instance"] == []
    if SPEEDUPS:
        assert isinstance(first["recv"], _speedups.RecvMethod)
