"""The ASGI middleware on real servers: uvicorn (three WebSocket implementations) and
hypercorn, real FastAPI, Starlette and Quart applications, real ``websockets`` clients,
counts read from a real scrape."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp.web
import pytest
import starlette.websockets
from fastapi import FastAPI, WebSocket
from prometheus_client import CollectorRegistry
from quart import Quart
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import ws_monitoring
from tests.helpers.asgi import SERVERS, asgi_server, upgrade_request
from tests.helpers.asgi_apps import fastapi_app, quart_app, starlette_app
from tests.helpers.leak import ClosedCounter
from tests.helpers.scrape import Samples, scrape
from tests.helpers.servers import async_wait_until, settled, wait_until
from ws_monitoring.asgi import MonitoringMiddleware, route_template
from ws_monitoring.config import OPTION_NAMES, Config
from ws_monitoring.logging.setup import LoggingSetup, setup_logging

ECHO = "/echo/{room}"

#: Close codes as each server reports them to the application (see ws_monitoring.asgi).
#: hypercorn reports every client-initiated close as 1006 (pgjones/hypercorn#127).
CLIENT_CLOSES = {
    "uvicorn-websockets": {"1000": 1, "1001": 1, "4xxx": 1},
    "uvicorn-sansio": {"1000": 1, "1001": 1, "4xxx": 1},
    "uvicorn-wsproto": {"1000": 1, "1001": 1, "4xxx": 1},
    "hypercorn": {"1006": 3},
}


async def closed_code(client: ClientConnection) -> int | None:
    """Wait until the server ends ``client``; the code the client saw (None: no close frame)."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await client.recv()
    return client.close_code


async def exchange(client: ClientConnection, *messages: str | bytes) -> None:
    for message in messages:
        await client.send(message)
        assert await client.recv() == message


async def drive_fastapi(url: Callable[[str], str]) -> dict[str, Any]:
    """Every scenario of the counting test, in order; what the clients saw."""
    saw: dict[str, Any] = {}
    async with connect(url("/echo/a")) as client:  # client closes 1000
        await exchange(client, "hello", b"\x01\x02\x03", "h\u00e9llo")
    async with connect(url("/echo/b")) as client:
        await exchange(client, "x")
        await client.close(1001)
    async with connect(url("/echo/c")) as client:  # the application closes 4001
        await client.send("close:4001")
        saw["app close"] = await closed_code(client)
    async with connect(url("/echo/d")) as client:
        await exchange(client, "z")
        await client.close(4002, "done")
    async with connect(url("/echo/e")) as client:  # the handler crashes
        await client.send("crash")
        saw["crash"] = await closed_code(client)
    client = await connect(url("/echo/f"))  # the client resets the TCP connection
    await exchange(client, "y")
    client.transport.abort()
    for path in ("/deny/x", "/denied"):
        with pytest.raises(InvalidStatus) as denied:
            async with connect(url(path)):
                pass
        saw[path] = denied.value.response.status_code
    return saw


@pytest.mark.parametrize("server", SERVERS)
async def test_counts_from_a_real_scrape(
    server: str, registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    seen: list[Any] = []
    app = fastapi_app(seen, registry=registry, tracing=False)
    with asgi_server(app, server) as running:
        saw = await drive_fastapi(running.url)
        samples = await settled(scrape_metrics, 6, handshakes=8)

    # What the clients saw is the server's own behaviour (the transparency tests
    # compare it with a bare run): uvicorn drops the TCP connection of a crashed
    # handler, hypercorn closes it with 1011.
    assert saw == {
        "app close": 4001,
        "crash": 1011 if server == "hypercorn" else 1006,
        "/deny/x": 403,
        "/denied": 401,
    }
    route = {"route": ECHO}
    assert samples.get("websocket_connections_total", **route) == 6
    assert samples.get("websocket_connections_active", **route) == 0
    assert samples.get("websocket_connection_duration_seconds_count", **route) == 6
    codes = dict(CLIENT_CLOSES[server])
    codes["4xxx"] = codes.get("4xxx", 0) + 1  # the application's close(4001)
    codes["1011"] = 1  # the crash
    codes["1006"] = codes.get("1006", 0) + 1  # the reset
    assert {
        labels["code"]: samples.get("websocket_disconnections_total", **labels)
        for labels in samples.series("websocket_disconnections_total")
    } == codes
    resets = codes["1006"]
    assert samples.get("websocket_errors_total", type="handler_exception", **route) == 1
    assert samples.get("websocket_errors_total", type="connection_reset", **route) == resets
    assert samples.total("websocket_errors_total") == 1 + resets

    def messages(direction: str, kind: str) -> float | None:
        return samples.get("websocket_messages_total", direction=direction, type=kind, **route)

    assert messages("received", "text") == 7
    assert messages("received", "binary") == 1
    assert messages("sent", "text") == 5
    assert messages("sent", "binary") == 1
    size = "websocket_message_size_bytes"
    # hello, 3 bytes, héllo (6 UTF-8 bytes), x, close:4001, z, crash, y
    assert (
        samples.get(f"{size}_sum", direction="received", **route) == 5 + 3 + 6 + 1 + 10 + 1 + 5 + 1
    )
    assert samples.get(f"{size}_count", direction="received", **route) == 8
    assert samples.get(f"{size}_sum", direction="sent", **route) == 5 + 3 + 6 + 1 + 1 + 1
    assert samples.get(f"{size}_count", direction="sent", **route) == 6
    # Handling time: one observation per received message, however its handling ended.
    assert samples.get("websocket_message_duration_seconds_count", **route) == 8
    assert samples.get("websocket_handshake_duration_seconds_count") == 8
    assert samples.get("websocket_handshake_failures_total", status="403") == 1
    assert samples.get("websocket_handshake_failures_total", status="401") == 1
    assert samples.total("websocket_handshake_failures_total") == 2
    # Nothing observable through ASGI is faked: no ping round trips.
    assert samples.get("websocket_ping_rtt_seconds_count", **route) == 0


@pytest.mark.parametrize("server", ["uvicorn-sansio", "hypercorn"])
async def test_an_uncaught_disconnect_is_no_crash(
    server: str, registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    """FastAPI's ``WebSocketDisconnect`` reaching the server is the peer leaving."""
    seen: list[Any] = []
    app = fastapi_app(seen, registry=registry, tracing=False)
    with asgi_server(app, server) as running:
        async with connect(running.url("/chat/lobby"), subprotocols=["chat.v1"]) as client:
            assert client.subprotocol == "chat.v1"
            await client.send("hi")
            assert await client.recv() == "lobby: hi"
        samples = await settled(scrape_metrics, 1, handshakes=1)
    assert seen == ["hi", ("disconnect", 1006 if server == "hypercorn" else 1000)]
    assert (
        samples.get("websocket_errors_total", route="/chat/{room}", type="handler_exception") == 0
    )
    assert samples.get("websocket_connections_total", route="/chat/{room}") == 1


@pytest.mark.parametrize("server", ["uvicorn-wsproto", "hypercorn"])
async def test_a_crash_before_accept_is_a_500_handshake(
    server: str, registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    app = fastapi_app([], registry=registry, tracing=False)
    with asgi_server(app, server) as running:
        with pytest.raises(InvalidStatus) as denied:
            async with connect(running.url("/broken")):
                pass
        assert denied.value.response.status_code == 500
        samples = await settled(scrape_metrics, 0, handshakes=1)
    assert samples.get("websocket_handshake_failures_total", status="500") == 1
    assert samples.total("websocket_connections_total") == 0


async def test_starlette_templates_mounts_and_unknown_paths(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    seen: list[Any] = []
    # routes= applies to paths without a template only; templates stay the framework's.
    app = starlette_app(seen, registry=registry, tracing=False, routes=["/elsewhere/{x}"])
    with asgi_server(app, "uvicorn-sansio") as running:
        for room in ("1", "22"):
            async with connect(running.url(f"/rooms/{room}?token=secret")) as client:
                await client.send("hi")
                assert await client.recv() == f"room {room}: hi"
        async with connect(running.url("/v1/chat/alice")) as client:
            await client.send(b"abc")
            assert await client.recv() == b"cba"
        with pytest.raises(InvalidStatus) as denied:  # Starlette closes before accept
            async with connect(running.url("/rooms/not-a-number")):
                pass
        assert denied.value.response.status_code == 403
        samples = await settled(scrape_metrics, 3, handshakes=4)
    assert samples.series("websocket_connections_total") == [
        {"route": "/rooms/{room}"},
        {"route": "/v1/chat/{name}"},
    ]
    assert samples.get("websocket_connections_total", route="/rooms/{room}") == 2
    assert samples.get("websocket_messages_total", route="/v1/chat/{name}", direction="sent",
                       type="binary") == 1  # fmt: skip
    assert samples.get("websocket_handshake_failures_total", status="403") == 1


@pytest.mark.parametrize("server", ["uvicorn-sansio", "hypercorn"])
async def test_quart_with_route_grouping(
    server: str, registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    """Quart puts no route in the scope: ``routes=`` groups the paths, as today."""
    seen: list[Any] = []

    def wrap(app: Any) -> Any:
        app.asgi_app = MonitoringMiddleware(
            app.asgi_app, registry=registry, tracing=False, routes=["/ws/{room}"]
        )
        return app

    with asgi_server(quart_app(seen, wrap=wrap), server) as running:
        for room in ("a", "b"):
            async with connect(running.url(f"/ws/{room}")) as client:
                await exchange(client, "ping", b"\x00")
        async with connect(running.url("/ws/c")) as client:
            await client.send("consent")  # through Quart's ``websocket`` object
            assert await client.recv() == "127.0.0.1"
        samples = await settled(scrape_metrics, 3, handshakes=3)
    assert seen == ["ping", b"\x00", "ping", b"\x00", "consent"]
    route = {"route": "/ws/{room}"}
    assert samples.get("websocket_connections_total", **route) == 3
    assert samples.get("websocket_messages_total", direction="received", type="text", **route) == 3
    assert samples.get("websocket_messages_total", direction="sent", type="binary", **route) == 2


@pytest.mark.parametrize("server", ["uvicorn-sansio", "hypercorn"])
async def test_a_client_that_leaves_before_accept(
    server: str, registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    """A bare ASGI application that waits for the client's next event before accepting."""
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        seen.append((await receive())["type"])  # the client is gone
        if scope["path"] == "/accept-anyway":
            try:
                await send({"type": "websocket.accept"})
            except OSError as exc:  # uvicorn: ClientDisconnected
                seen.append(type(exc).__name__)

    middleware = MonitoringMiddleware(app, registry=registry, tracing=False)
    with asgi_server(middleware, server) as running:
        for path in ("/wait", "/accept-anyway"):
            _, writer = await asyncio.open_connection(running.host, running.port)
            writer.write(upgrade_request(path))
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            await async_wait_until(lambda path=path: len(seen) >= (1 if path == "/wait" else 2))
        samples = await settled(scrape_metrics, 0 if server != "hypercorn" else 1, handshakes=2)
    failures = {"connection_lost": 2} if server != "hypercorn" else {"connection_lost": 1}
    assert {
        labels["status"]: samples.get("websocket_handshake_failures_total", **labels)
        for labels in samples.series("websocket_handshake_failures_total")
    } == failures
    if server == "hypercorn":
        # hypercorn ignores what is sent after the client left: the accept "succeeded".
        assert seen == ["websocket.disconnect", "websocket.disconnect"]
        assert samples.get("websocket_errors_total", route="/accept-anyway",
                           type="connection_reset") == 1  # fmt: skip
    else:
        assert seen == ["websocket.disconnect", "websocket.disconnect", "ClientDisconnected"]
        assert samples.total("websocket_connections_total") == 0


@pytest.mark.parametrize("server", ["uvicorn-sansio", "hypercorn"])
async def test_a_send_after_the_client_left(
    server: str, registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    left = threading.Event()
    app = FastAPI()

    @app.websocket("/late")
    async def late(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()
        await asyncio.to_thread(left.wait, 10)
        await websocket.send_text("too late")

    app.add_middleware(MonitoringMiddleware, registry=registry, tracing=False)
    with asgi_server(app, server) as running:
        async with connect(running.url("/late")) as client:
            await client.send("x")
        left.set()
        samples = await settled(scrape_metrics, 1, handshakes=1)
    route = {"route": "/late"}
    # uvicorn refuses the send (Starlette raises WebSocketDisconnect: the client left, no
    # crash); hypercorn accepts and drops it. The application never saw the close.
    sent = samples.total("websocket_messages_total", direction="sent", **route)
    assert sent == (1 if server == "hypercorn" else 0)
    assert samples.get("websocket_errors_total", type="handler_exception", **route) == 0
    assert samples.get("websocket_errors_total", type="connection_reset", **route) == 1
    assert samples.get("websocket_disconnections_total", code="1006", **route) == 1


@pytest.mark.parametrize("server", ["uvicorn-sansio", "hypercorn"])
async def test_unknown_statuses_and_what_follows_a_close(
    server: str, registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    from starlette.responses import Response as HTTPResponse

    app = FastAPI()
    after_close: list[Any] = []

    @app.websocket("/teapot")
    async def teapot(websocket: WebSocket) -> None:
        await websocket.send_denial_response(HTTPResponse(status_code=499))

    @app.websocket("/closing")
    async def closing(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close(4005)
        after_close.append(await websocket.receive())  # the server's answer to our close

    @app.websocket("/close-then-crash")
    async def close_then_crash(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close(4006)
        raise ValueError("a bug after the close")

    app.add_middleware(MonitoringMiddleware, registry=registry, tracing=False)
    with asgi_server(app, server) as running:
        with pytest.raises(InvalidStatus) as denied:
            async with connect(running.url("/teapot")):
                pass
        assert denied.value.response.status_code == 499
        async with connect(running.url("/closing")) as client:
            assert await closed_code(client) == 4005
        async with connect(running.url("/close-then-crash")) as client:
            assert await closed_code(client) == 4006
        samples = await settled(scrape_metrics, 2, handshakes=3)
    assert after_close[0]["type"] == "websocket.disconnect"
    assert samples.get("websocket_handshake_failures_total", status="499") == 1
    # The code the application sent, whatever the server echoes (hypercorn: 1000).
    assert samples.get("websocket_disconnections_total", code="4xxx", route="/closing") == 1
    # A crash after the close is a crash still; the code stays the one exchanged.
    crashed = {"route": "/close-then-crash"}
    assert samples.get("websocket_disconnections_total", code="4xxx", **crashed) == 1
    assert samples.get("websocket_errors_total", type="handler_exception", **crashed) == 1
    assert samples.total("websocket_errors_total") == 1


def test_route_templates_from_the_scope() -> None:
    class Route:
        path_format = "/chat/{name}"

    assert route_template({}) is None
    assert route_template({"route": object()}) is None
    assert route_template({"route": Route()}) == "/chat/{name}"
    mounted = {"route": Route(), "root_path": "/api/v1", "app_root_path": "/api"}
    assert route_template(mounted) == "/v1/chat/{name}"
    # A root path that is not under the application's: the template alone.
    assert route_template({**mounted, "app_root_path": "/other"}) == "/chat/{name}"


def test_lifespan_flush_outside_asyncio() -> None:
    """Another async library (trio): the flush runs in place, then the server is told."""
    sink = Shutdowns()
    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "lifespan.shutdown.complete"})

    async def send(message: Any) -> None:
        sent.append((message["type"], list(sink.timeouts)))

    middleware = MonitoringMiddleware(app, registry=CollectorRegistry(), tracing=False,
                                      sinks=[sink])  # fmt: skip
    # Driven by hand, as an event loop other than asyncio's would: no asyncio loop runs.
    with pytest.raises(StopIteration):
        middleware({"type": "lifespan"}, None, send).send(None)  # type: ignore[arg-type]
    assert len(sent) == 1
    assert sent[0][0] == "lifespan.shutdown.complete"
    assert len(sent[0][1]) == 1  # flushed before the server heard of it


@pytest.mark.parametrize("server", ["uvicorn-sansio", "uvicorn-wsproto"])
async def test_a_message_too_big_is_known_from_the_close_code(
    server: str, registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    app = fastapi_app([], registry=registry, tracing=False)
    with asgi_server(app, server, ws_max_size=1024) as running:
        async with connect(running.url("/echo/big")) as client:
            await exchange(client, "small")
            await client.send(b"\x00" * 2000)
            assert await closed_code(client) in (1009, 1006)  # as the server closes it
        samples = await settled(scrape_metrics, 1, handshakes=1)
    route = {"route": ECHO}
    assert samples.get("websocket_disconnections_total", code="1009", **route) == 1
    assert samples.get("websocket_errors_total", type="message_too_big", **route) == 1
    assert samples.total("websocket_errors_total") == 1
    assert (
        samples.get("websocket_messages_total", direction="received", type="binary", **route) == 0
    )


async def test_the_readme_example_runs_as_written() -> None:
    """The README's FastAPI block, with its metrics port made free (the only change)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## ASGI (FastAPI, Starlette, Quart)", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert block.count("port=8001") == 1
    namespace: dict[str, Any] = {"__name__": "chat"}
    exec(compile(block.replace("port=8001", "port=0"), "README.md", "exec"), namespace)
    metrics = namespace["metrics"]
    route = {"route": "/rooms/{room_id}"}

    def closed() -> Samples | None:
        samples = scrape(metrics.url)
        return samples if samples.total("websocket_disconnections_total", **route) else None

    try:
        with asgi_server(namespace["app"], "uvicorn-sansio") as running:
            async with connect(running.url("/rooms/42")) as client:
                await client.send("hello")
                assert await client.recv() == "42: hello"
            samples = await asyncio.to_thread(wait_until, closed)
    finally:
        metrics.close()
    assert samples.get("websocket_connections_total", **route) == 1
    assert samples.get("websocket_messages_total", direction="sent", type="text", **route) == 1


class Shutdowns(ClosedCounter):
    """A real sink that also records when it is flushed."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float] = []

    def shutdown(self, timeout: float) -> None:
        self.timeouts.append(timeout)


@pytest.mark.parametrize("server", ["uvicorn-sansio", "hypercorn"])
async def test_lifespan_shutdown_flushes_the_sinks(
    server: str, registry: CollectorRegistry
) -> None:
    sink = Shutdowns()
    app = fastapi_app([], registry=registry, tracing=False, sinks=[sink])
    with asgi_server(app, server, lifespan=True) as running:
        async with connect(running.url("/echo/a")) as client:
            await exchange(client, "hi")
        await async_wait_until(lambda: sink.closed == 1)
        assert sink.timeouts == []
    assert len(sink.timeouts) == 1
    assert 4.0 < sink.timeouts[0] <= 5.0


# -- logs, alerts, consent -----------------------------------------------------------------


@pytest.fixture
def json_logs() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """JSON lines of ws_monitoring's loggers and of the test application's."""
    stream = io.StringIO()
    setup: LoggingSetup = setup_logging("INFO", stream=stream, background=False)
    app_logger = logging.getLogger("tests.asgi_app")
    app_logger.addHandler(setup.handlers[0])
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        app_logger.removeHandler(setup.handlers[0])
        setup.close()


async def test_logs_a_crash_once_with_the_connection(
    json_logs: Callable[[], list[dict[str, Any]]], registry: CollectorRegistry
) -> None:
    app = fastapi_app([], registry=registry, tracing=False)
    with asgi_server(app, "uvicorn-sansio") as running:
        async with connect(running.url("/echo/r1?token=secret")) as client:
            await exchange(client, "log")
            await client.send("crash")
            await closed_code(client)

        def closed_line() -> list[dict[str, Any]]:
            return [line for line in json_logs() if line.get("event") == "connection_closed"]

        await async_wait_until(closed_line)
    lines = json_logs()
    ours = [line for line in lines if line["logger"] == "ws_monitoring.lifecycle"]
    assert [line["event"] for line in ours] == [
        "connection_opened",
        "handler_crashed",
        "connection_closed",
    ]
    crashed = ours[1]
    assert crashed["level"] == "ERROR"
    assert crashed["error_type"] == "ValueError"
    assert "handler bug" in crashed["stack_trace"]
    assert ours[2]["close_code"] == 1011
    assert ours[2]["error_type"] == "handler_exception"
    assert ours[2]["messages_in"] == 2
    # A line the application logs inside the handler carries the connection.
    inside = [line for line in lines if line["logger"] == "tests.asgi_app"]
    assert len(inside) == 1
    assert inside[0]["connection_id"] == ours[0]["connection_id"]
    assert inside[0]["route"] == ECHO
    assert inside[0]["client_ip"] == "127.0.0.0"  # truncated by default
    assert "secret" not in json.dumps(lines)


async def test_consent_through_the_websocket_object(
    registry: CollectorRegistry, json_logs: Callable[[], list[dict[str, Any]]]
) -> None:
    app = FastAPI()
    granted: list[Any] = []

    @app.websocket("/ws")
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()
        granted.append(ws_monitoring.grant(websocket, purposes={"ip"}, policy_version="v1"))
        logging.getLogger("tests.asgi_app").warning("after consent")
        await websocket.close()

    app.add_middleware(MonitoringMiddleware, registry=registry, tracing=False)
    with asgi_server(app, "uvicorn-sansio") as running:
        async with connect(running.url("/ws")) as client:
            await client.send("consent")
            await closed_code(client)
        await async_wait_until(lambda: any(
            line.get("event") == "connection_closed" for line in json_logs()))  # fmt: skip
    assert granted[0].ip == "127.0.0.1"
    inside = [line for line in json_logs() if line["logger"] == "tests.asgi_app"]
    assert inside[0]["client_ip"] == "127.0.0.1"


def test_options_are_checked() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    message = "MonitoringMiddleware(): unknown option 'rutes'; did you mean 'routes'?"
    with pytest.raises(TypeError, match=re.escape(message)):
        MonitoringMiddleware(app, rutes=["/a"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_routes"):
        MonitoringMiddleware(app, max_routes="5")
    config = Config(metrics=False)
    assert MonitoringMiddleware(app, config=config).monitor.config is config
    replaced = MonitoringMiddleware(app, config=config, tracing=False).monitor.config
    assert (replaced.metrics, replaced.tracing) == (False, False)
    with pytest.raises(ValueError, match="max_routes"):
        MonitoringMiddleware(app, max_routes=0)
    with pytest.raises(TypeError, match="ASGI application"):
        MonitoringMiddleware(None)  # type: ignore[arg-type]


def test_its_options_are_instruments() -> None:
    """The middleware takes Config's fields, typed as instrument() types them."""
    from typing import get_overloads

    def options(function: Callable[..., Any]) -> list[tuple[str, Any]]:
        parameters = inspect.signature(function).parameters.values()
        return [(p.name, p.annotation) for p in parameters if p.kind is p.KEYWORD_ONLY]

    expected = options(get_overloads(ws_monitoring.instrument)[0])
    assert options(MonitoringMiddleware.__init__) == expected
    assert [name for name, _ in expected] == ["config", *OPTION_NAMES]


async def test_http_and_lifespan_scopes_pass_through() -> None:
    calls: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append((scope["type"], receive, send))

    middleware = MonitoringMiddleware(app, registry=CollectorRegistry(), tracing=False)

    async def receive() -> Any:
        return {}

    async def send(message: Any) -> None:
        pass

    await middleware({"type": "http"}, receive, send)
    assert calls == [("http", receive, send)]


# -- instrument() is for websockets handlers: a clear TypeError for the others -----------------


def test_instrument_refuses_framework_endpoints_and_applications() -> None:
    app = FastAPI()
    with pytest.raises(TypeError, match=r"FastAPI|fastapi") as info:

        @app.websocket("/ws")
        @ws_monitoring.instrument
        async def endpoint(websocket: WebSocket) -> None: ...

    message = str(info.value)
    assert "'websocket' is a starlette.websockets.WebSocket" in message
    assert "ws_monitoring.asgi.MonitoringMiddleware" in message
    assert "app.add_middleware(MonitoringMiddleware" in message
    assert app.routes[-1].path != "/ws"  # never registered: the app keeps working

    async def starlette_endpoint(ws: starlette.websockets.WebSocket) -> None: ...

    with pytest.raises(TypeError, match=r"starlette endpoint.*MonitoringMiddleware"):
        ws_monitoring.instrument(starlette_endpoint)

    async def aiohttp_handler(request: aiohttp.web.Request) -> aiohttp.web.WebSocketResponse:
        return aiohttp.web.WebSocketResponse()

    with pytest.raises(
        TypeError, match=r"aiohttp servers are not supported: .*ws_monitoring\.serve\(\)"
    ):
        ws_monitoring.instrument(aiohttp_handler)

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None: ...

    for application in (app, Quart("q"), asgi_app):
        with pytest.raises(TypeError, match="MonitoringMiddleware"):
            ws_monitoring.instrument(application)


async def test_an_unannotated_starlette_handler_runs_unmonitored_and_says_so(
    registry: CollectorRegistry,
    scrape_metrics: Callable[[], Samples],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without annotations, instrument() cannot tell: the first connection does."""
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute

    @ws_monitoring.instrument(registry=registry)
    async def endpoint(websocket):  # type: ignore[no-untyped-def]  # as in Starlette's docs
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    with asgi_server(app, "uvicorn-sansio") as running:
        for _ in range(2):
            async with connect(running.url("/ws")) as client:
                await exchange(client, "hi")  # served as without instrument()
                assert await closed_code(client) == 1000
    errors = [r.getMessage() for r in caplog.records if r.name == "ws_monitoring"]
    assert len(errors) == 1, errors
    assert "starlette.websockets.WebSocket is not a websockets.asyncio" in errors[0]
    assert "wrap the application in ws_monitoring.asgi.MonitoringMiddleware" in errors[0]
    assert scrape_metrics().total("websocket_connections_total") == 0


def test_instrument_still_takes_annotated_websockets_handlers() -> None:
    from websockets.asyncio.server import ServerConnection

    async def handler(websocket: ServerConnection) -> None: ...

    async def unresolvable(websocket: Undefined) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    for func in (handler, unresolvable):
        assert ws_monitoring.instrument(func, registry=CollectorRegistry()).__wrapped__ is func
