"""Lifecycle logs from real asyncio and threading servers, read back as JSON lines."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect as sync_connect
from websockets.sync.server import ServerConnection as SyncServerConnection

from tests.helpers.servers import RawClient, async_server, async_wait_until, sync_server_async
from tests.logging.helpers import bare_root
from ws_monitoring.config import Config
from ws_monitoring.core import RECORD_ATTR
from ws_monitoring.logging.context import current_connection
from ws_monitoring.logging.lifecycle import LifecycleLogSink, MessageLogSink, build_sink
from ws_monitoring.logging.setup import LoggingSetup, setup_logging
from ws_monitoring.typing import MessageSink


class Logs:
    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.setup: LoggingSetup | None = None

    def start(self, level: str = "INFO", **kwargs: Any) -> None:
        self.setup = setup_logging(level, stream=self.stream, background=False, **kwargs)

    def lines(self, logger: str | None = None) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        return [p for p in parsed if logger is None or p["logger"] == logger]

    def events(self, *names: str) -> list[dict[str, Any]]:
        return [p for p in self.lines() if p.get("event") in names]

    async def wait_for(self, event: str, count: int = 1) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]] | None:
            lines = self.events(event)
            return lines if len(lines) >= count else None

        result = await async_wait_until(found, what=f"{count} {event} line(s)")
        assert result is not None
        return result


@pytest.fixture
def logs() -> Iterator[Logs]:
    captured = Logs()
    try:
        yield captured
    finally:
        if captured.setup is not None:
            captured.setup.close()


OPTIONS = {"metrics": False, "routes": ["/rooms/{room}"]}


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        if message == "crash":
            raise ZeroDivisionError("division by zero")
        await ws.send(message)


# -- sink selection -------------------------------------------------------------------------


def test_build_sink(logs: Logs) -> None:
    assert build_sink(Config(log_lifecycle=False)) is None
    logs.start("INFO")
    sink = build_sink(Config())
    assert type(sink) is LifecycleLogSink
    assert not isinstance(sink, MessageSink)  # costs nothing per message
    logs.setup.close()  # type: ignore[union-attr]
    logs.start("DEBUG")
    assert isinstance(build_sink(Config()), MessageLogSink)
    assert isinstance(build_sink(Config()), MessageSink)
    LifecycleLogSink(Config()).shutdown(1.0)


# -- asyncio server -------------------------------------------------------------------------


async def test_opened_and_closed(logs: Logs) -> None:
    logs.start()
    async with async_server(echo, monitoring=OPTIONS) as server:
        async with connect(server.url("/rooms/42?token=x")) as client:
            for message in ("ab", "cde", b"\x00\x01\x02\x03"):
                await client.send(message)
                await client.recv()
        (closed,) = await logs.wait_for("connection_closed")
    (opened,) = logs.events("connection_opened")
    assert opened["level"] == "INFO"
    assert opened["logger"] == "ws_monitoring.lifecycle"
    assert opened["message"] == "connection opened"
    assert opened["route"] == "/rooms/{room}"
    assert opened["client_ip"] == "127.0.0.0"
    assert opened["subprotocol"] is None
    assert "user_id" not in opened
    assert closed["connection_id"] == opened["connection_id"]
    assert closed["duration_s"] >= 0
    closed.pop("duration_s")
    closed.pop("timestamp")
    assert closed == {
        "level": "INFO",
        "logger": "ws_monitoring.lifecycle",
        "message": "connection closed",
        "service": "unknown_service:python",
        "connection_id": opened["connection_id"],
        "route": "/rooms/{room}",
        "client_ip": "127.0.0.0",
        "event": "connection_closed",
        "close_code": 1000,
        "error_type": None,
        "messages_in": 3,
        "messages_out": 3,
        "bytes_in": 9,
        "bytes_out": 9,
    }
    # websockets' own lines would say the same: they are suppressed.
    ws_lines = [line["message"] for line in logs.lines("websockets.server")]
    assert "connection open" not in ws_lines
    assert "connection closed" not in ws_lines


async def test_handler_crash(logs: Logs) -> None:
    logs.start()
    async with async_server(echo, monitoring=OPTIONS) as server:
        async with connect(server.url()) as client:
            await client.send("crash")
            with pytest.raises(ConnectionClosedError):
                await client.recv()
        (closed,) = await logs.wait_for("connection_closed")
    (crashed,) = logs.events("handler_crashed")
    assert crashed["level"] == "ERROR"
    assert crashed["message"] == "handler crashed"
    assert crashed["error_type"] == "ZeroDivisionError"
    assert crashed["error_message"] == "division by zero"
    assert crashed["stack_trace"].startswith("Traceback (most recent call last):")
    assert 'raise ZeroDivisionError("division by zero")' in crashed["stack_trace"]
    assert crashed["connection_id"] == closed["connection_id"]
    assert (closed["close_code"], closed["error_type"]) == (1011, "handler_exception")
    ws_lines = [line["message"] for line in logs.lines("websockets.server")]
    assert "connection handler failed" not in ws_lines


async def test_handshake_rejected_failed_and_health_check(logs: Logs) -> None:
    logs.start()

    def reject(connection: ServerConnection, request: Any) -> Any:
        if request.path.startswith("/rooms/secret"):
            return connection.respond(403, "Forbidden\n")
        return None

    async with async_server(echo, monitoring=OPTIONS, process_request=reject) as server:
        with pytest.raises(InvalidStatus):
            await connect(server.url("/rooms/secret?token=t"))
        raw = await RawClient.connect(server.port)
        await raw.send(b"NOT HTTP AT ALL\r\n\r\n")
        await raw.read_eof()
        await raw.aclose()
        health = await RawClient.connect(server.port)
        await health.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await health.read_eof()).startswith(b"HTTP/1.1 200")
        await health.aclose()
        (failed,) = await logs.wait_for("handshake_failed")
    (rejected,) = logs.events("handshake_rejected")
    assert rejected["message"] == "handshake rejected"
    assert (rejected["status"], rejected["route"]) == (403, "/rooms/{room}")
    assert rejected["duration_s"] >= 0
    assert "connection_id" not in rejected
    assert failed["failure"] == "invalid_request"
    assert failed["route"] == ""
    # Health checks leave no line, and websockets' handshake lines are suppressed.
    ws_lines = [line["message"] for line in logs.lines("websockets.server")]
    assert not [m for m in ws_lines if m.startswith(("HTTP response sent", "connection rejected"))]
    assert len(logs.lines("ws_monitoring.lifecycle")) == 2


async def test_records_inside_a_handler_carry_the_connection(logs: Logs) -> None:
    with bare_root():
        logs.start(root=True)
        app = logging.getLogger("myapp")

        async def handler(ws: ServerConnection) -> None:
            app.info("inside the handler")
            await ws.send("ok")

        async with async_server(handler, monitoring=OPTIONS) as server:
            async with connect(server.url("/rooms/7")) as client:
                await client.recv()
            await logs.wait_for("connection_closed")
        app.info("outside")
        inside, outside = logs.lines("myapp")
        (opened,) = logs.events("connection_opened")
        assert inside["connection_id"] == opened["connection_id"]
        assert inside["route"] == "/rooms/{room}"
        assert inside["client_ip"] == "127.0.0.0"
        assert "connection_id" not in outside
        assert current_connection.get() is None


async def test_lifecycle_info_off(logs: Logs) -> None:
    logs.start("WARNING")
    async with async_server(echo, monitoring=OPTIONS) as server:
        async with connect(server.url()) as client:
            await client.send("hi")
            await client.recv()
        async with connect(server.url()) as client:
            await client.send("crash")
            with pytest.raises(ConnectionClosedError):
                await client.recv()
        await logs.wait_for("handler_crashed")
    assert [line["event"] for line in logs.lines("ws_monitoring.lifecycle")] == ["handler_crashed"]


async def test_closing_in_another_context_still_clears_it(logs: Logs) -> None:
    logs.start()
    sink = LifecycleLogSink(Config())

    async def handler(ws: ServerConnection) -> None:
        record = getattr(ws, RECORD_ATTR)
        contextvars.copy_context().run(sink.connection_opened, record)
        sink.connection_closed(record)  # a token from another context
        await ws.send(json.dumps(current_connection.get() is None))

    options = {**OPTIONS, "log_lifecycle": False}
    async with async_server(handler, monitoring=options) as server, connect(server.url()) as c:
        assert json.loads(await c.recv()) is True


# -- per-message DEBUG logs -------------------------------------------------------------------


async def test_message_lines_without_payload_by_default(logs: Logs) -> None:
    logs.start("DEBUG")
    async with async_server(echo, monitoring={**OPTIONS, "log_payloads": 100}) as server:
        async with connect(server.url()) as client:
            await client.send("secret-payload")
            await client.recv()
        await logs.wait_for("connection_closed")
    received = logs.events("message_received")
    handled = logs.events("message_handled")
    sent = logs.events("message_sent")
    assert [(r["binary"], r["size"]) for r in received] == [(False, 14)]
    assert [(s["binary"], s["size"]) for s in sent] == [(False, 14)]
    assert [h["error_type"] for h in handled] == [None]
    assert {line["level"] for line in received + handled + sent} == {"DEBUG"}
    assert {line["logger"] for line in received + handled + sent} == {"ws_monitoring.messages"}
    assert "secret-payload" not in logs.stream.getvalue()


async def test_payloads_with_consent_are_truncated(logs: Logs) -> None:
    logs.start("DEBUG")
    options = {**OPTIONS, "log_payloads": 8, "consent_resolver": lambda r: ["payload"]}
    async with async_server(echo, monitoring=options) as server:
        async with connect(server.url()) as client:
            for message in ("short", "été: more than eight bytes", b"\x00binary-data"):
                await client.send(message)
                await client.recv()
            await client.send("crash")
            with pytest.raises(ConnectionClosedError):
                await client.recv()
        await logs.wait_for("connection_closed")
    received = logs.events("message_received")
    assert [
        (r.get("payload"), r.get("payload_base64"), r["payload_truncated"]) for r in received
    ] == [
        ("short", None, False),
        ("été: m", None, True),  # 8 bytes, no split character
        (None, base64.b64encode(b"\x00binary-").decode(), True),
        ("crash", None, False),
    ]
    assert [h["error_type"] for h in logs.events("message_handled")][-1] == "ZeroDivisionError"


async def test_payloads_need_log_payloads(logs: Logs) -> None:
    logs.start("DEBUG")
    options = {**OPTIONS, "consent_resolver": lambda r: ["payload"]}
    async with async_server(echo, monitoring=options) as server:
        async with connect(server.url()) as client:
            await client.send("not-logged")
            await client.recv()
        await logs.wait_for("connection_closed")
    assert "not-logged" not in logs.stream.getvalue()


async def test_broadcast_lines_name_their_connection(logs: Logs) -> None:
    logs.start("DEBUG")
    connections: list[ServerConnection] = []

    async def handler(ws: ServerConnection) -> None:
        connections.append(ws)
        await ws.wait_closed()

    async with async_server(handler, monitoring=OPTIONS) as server:
        async with connect(server.url()) as a, connect(server.url()) as b:
            await async_wait_until(lambda: len(connections) == 2)
            websockets.broadcast(connections, "news")
            assert (await a.recv(), await b.recv()) == ("news", "news")
        await logs.wait_for("connection_closed", 2)
    sent = logs.events("message_sent")
    ids = {str(ws.id) for ws in connections}
    assert {line["connection_id"] for line in sent} == ids


async def test_message_lines_follow_the_logger_level(logs: Logs) -> None:
    logs.start("DEBUG")
    messages = logging.getLogger("ws_monitoring.messages")
    async with async_server(echo, monitoring=OPTIONS) as server:
        async with connect(server.url()) as client:
            await client.send("loud")
            await client.recv()
            # Built at DEBUG, the sink checks the level per message: now it is quiet.
            messages.setLevel(logging.INFO)
            try:
                await client.send("quiet")
                await client.recv()
            finally:
                messages.setLevel(logging.NOTSET)
        await logs.wait_for("connection_closed")
    assert [line["size"] for line in logs.events("message_received")] == [4]
    assert len(logs.events("message_sent")) == 1
    assert len(logs.events("message_handled")) == 1


async def test_closing_a_connection_this_sink_never_opened(logs: Logs) -> None:
    logs.start()
    sink = LifecycleLogSink(Config())

    async def handler(ws: ServerConnection) -> None:
        record = getattr(ws, RECORD_ATTR)
        record.client = record.monitor.privacy.client(None, record.request)  # no peer address
        sink.connection_closed(record)
        await ws.send("done")

    options = {**OPTIONS, "log_lifecycle": False}
    async with async_server(handler, monitoring=options) as server, connect(server.url()) as c:
        assert await c.recv() == "done"
    (line,) = logs.events("connection_closed")
    assert line["route"] == "__unmatched__"
    assert "client_ip" not in line


# -- threading server -----------------------------------------------------------------------


def sync_echo(ws: SyncServerConnection) -> None:
    logging.getLogger("ws_monitoring.app").info("in thread")
    ws.send("ready")
    for message in ws:
        ws.send(message)


async def test_sync_server(logs: Logs) -> None:
    logs.start()

    def talk(url: str) -> None:
        with sync_connect(url) as client:
            assert client.recv() == "ready"
            client.send("abc")
            assert client.recv() == "abc"

    async with sync_server_async(sync_echo, monitoring=OPTIONS) as server:
        await asyncio.to_thread(talk, server.url("/rooms/1"))
        (closed,) = await logs.wait_for("connection_closed")
    (opened,) = logs.events("connection_opened")
    (app,) = logs.lines("ws_monitoring.app")
    assert app["connection_id"] == opened["connection_id"] == closed["connection_id"]
    assert (closed["messages_in"], closed["bytes_out"], closed["close_code"]) == (1, 8, 1000)
