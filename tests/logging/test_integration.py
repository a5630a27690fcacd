"""The application's own logging: a third-party stdlib JSON formatter, and structlog.

An application that formats its own lines (python-json-logger on its root handler, or
structlog) gets the connection's fields on the records it logs inside a handler
(:class:`ConnectionContextFilter`, :func:`add_connection_context`), renders
ws-monitoring's own records as flat fields, prints every line once, and shows no
personal data without consent.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from pythonjsonlogger.json import JsonFormatter
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosedError

from tests.helpers.servers import async_server, async_wait_until
from tests.logging.helpers import bare_root
from ws_monitoring.logging import (
    CONNECTION_FIELDS,
    EVENT_FIELDS,
    ConnectionContextFilter,
    add_connection_context,
    setup_logging,
)

#: Marker personal data: the client's address (behind a trusted proxy) and user id.
CLIENT_IP = "203.0.113.77"
USER = "alice@example.com"
OPTIONS = {
    "metrics": False,
    "routes": ["/rooms/{room}"],
    "trusted_proxies": ["127.0.0.1/32"],
    "user_id_resolver": lambda request: USER,
    "pseudonym_key": b"k" * 32,
}
HEADERS = {"X-Forwarded-For": CLIENT_IP}

app = logging.getLogger("myapp")


def app_json_handler(stream: io.StringIO) -> logging.Handler:
    """The application's own handler, as python-json-logger's documentation sets it up."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("%(levelname)s %(name)s %(message)s"))
    return handler


def parse(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def assert_flat_and_private(text: str, lines: list[dict[str, Any]]) -> None:
    """No object repr, no nested ws dict, no raw client IP or user id."""
    for line in lines:
        for key, value in line.items():
            assert key not in ("ws", "ws_connection"), line
            assert not isinstance(value, dict), line
            assert " object at 0x" not in str(value), line
            assert "<ws_monitoring" not in str(value), line
    assert CLIENT_IP not in text
    assert USER not in text


async def chat(ws: ServerConnection) -> None:
    async for message in ws:
        if message == "crash":
            raise ZeroDivisionError("division by zero")
        app.info("inside the handler", extra={"room": 7})
        await ws.send(message)


async def talk(url: str, *, crash: bool = False) -> None:
    async with connect(url, additional_headers=HEADERS) as client:
        await client.send("hi")
        await client.recv()
        if crash:
            await client.send("crash")
            with pytest.raises(ConnectionClosedError):
                await client.recv()


async def wait_for_lines(stream: io.StringIO, key: str, value: str, count: int = 1) -> None:
    await async_wait_until(
        lambda: sum(line.get(key) == value for line in parse(stream)) >= count,
        what=f"{count} line(s) with {key}={value}",
    )


@pytest.fixture
def restore_levels() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("", "ws_monitoring", "websockets")]
    saved = [(logger, logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, level, propagate in saved:
        logger.setLevel(level)
        logger.propagate = propagate


# -- the filter, with python-json-logger ---------------------------------------------------


@pytest.mark.usefixtures("restore_levels")
async def test_filter_on_a_python_json_logger_handler() -> None:
    stream = io.StringIO()
    handler = app_json_handler(stream)
    handler.addFilter(ConnectionContextFilter())
    with bare_root() as root:
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        async with async_server(chat, monitoring=OPTIONS) as server:
            await talk(server.url("/rooms/7"))
            await wait_for_lines(stream, "ws_event", "connection_closed")
        app.info("outside")
    # Without setup_logging, websockets' own lines pass too (with its connection object):
    # setup_logging(root=True) suppresses those the lifecycle logs replace (below).
    lines = [line for line in parse(stream) if not line["name"].startswith("websockets")]
    assert_flat_and_private(stream.getvalue(), lines)
    (opened,) = [line for line in lines if line.get("ws_event") == "connection_opened"]
    (inside,) = [line for line in lines if line["message"] == "inside the handler"]
    (closed,) = [line for line in lines if line.get("ws_event") == "connection_closed"]
    (outside,) = [line for line in lines if line["message"] == "outside"]
    for line in (opened, inside, closed):
        assert line["connection_id"] == opened["connection_id"]
        assert line["route"] == "/rooms/{room}"
        assert line["client_ip"] == "203.0.113.0"
        assert line["user_id"] == opened["user_id"]
    assert inside["room"] == 7
    assert closed["name"] == "ws_monitoring.lifecycle"
    assert closed["message"] == "connection closed"
    assert {k: closed[k] for k in ("close_code", "messages_in", "messages_out")} == {
        "close_code": 1000,
        "messages_in": 1,
        "messages_out": 1,
    }
    assert closed["error_type"] is None
    assert closed["duration_s"] >= 0
    assert not set(CONNECTION_FIELDS) & set(outside)


def test_filter_keeps_what_a_record_has_and_never_drops() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    record.route = "/mine"
    assert ConnectionContextFilter().filter(record) is True
    assert record.route == "/mine"
    assert not hasattr(record, "connection_id")


async def test_filter_and_processor_carry_the_current_span() -> None:
    tracer = TracerProvider().get_tracer("test")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    with tracer.start_as_current_span("work") as span:
        ConnectionContextFilter().filter(record)
        event = add_connection_context(None, "info", {"event": "m"})
    context = span.get_span_context()
    expected = {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}
    assert {k: record.__dict__[k] for k in expected} == expected
    assert event == {"event": "m", **expected}


# -- setup_logging(root=True) over the application's handlers ------------------------------


@pytest.mark.usefixtures("restore_levels")
async def test_root_true_attaches_to_the_applications_handlers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = io.StringIO()
    handler = app_json_handler(stream)
    with bare_root() as root:
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
        setup = setup_logging("INFO", root=True)
        try:
            assert setup.shared_handlers == (handler,)
            assert root.handlers == [handler]  # no second output
            assert root.level == logging.WARNING  # the application's to set
            async with async_server(chat, monitoring=OPTIONS) as server:
                app.warning("before")
                await talk(server.url("/rooms/7"), crash=True)
                await wait_for_lines(stream, "ws_event", "connection_closed")
        finally:
            setup.close()
        assert handler.filters == []
        assert logging.getLogger("ws_monitoring").propagate is True
    lines = parse(stream)
    assert_flat_and_private(stream.getvalue(), lines)
    # Every record once; websockets' duplicate of the crash is suppressed.
    events = [line.get("ws_event") for line in lines if line["name"].startswith("ws_monitoring")]
    assert events == ["connection_opened", "handler_crashed", "connection_closed"]
    websockets_lines = [line["message"] for line in lines if line["name"].startswith("websockets")]
    assert [m for m in websockets_lines if not m.startswith("server ")] == []
    (crashed,) = [line for line in lines if line["levelname"] == "ERROR"]
    assert crashed["message"] == "handler crashed"
    assert crashed["exc_info"].count("Traceback") == 1
    assert "ZeroDivisionError" in crashed["exc_info"]
    (before,) = [line for line in lines if line["message"] == "before"]
    assert "connection_id" not in before
    (opened,) = [line for line in lines if line.get("ws_event") == "connection_opened"]
    assert crashed["connection_id"] == opened["connection_id"]
    assert capsys.readouterr().err == ""  # nothing printed beside the application's output


def test_root_true_refuses_a_second_output_beside_the_applications() -> None:
    with bare_root() as root:
        root.addHandler(logging.StreamHandler(io.StringIO()))
        with pytest.raises(ValueError, match="would print every line twice"):
            setup_logging(root=True, stream=io.StringIO())
        with pytest.raises(ValueError, match="would print every line twice"):
            setup_logging(root=True, filename="/dev/null")


@pytest.mark.usefixtures("restore_levels")
def test_root_true_over_a_null_handler_writes_itself() -> None:
    stream = io.StringIO()
    with bare_root() as root:
        null = logging.NullHandler()
        root.addHandler(null)
        setup = setup_logging(root=True, stream=stream, background=False)
        try:
            assert setup.shared_handlers == ()
            app.warning("mine")
        finally:
            setup.close()
        assert root.handlers == [null]
    assert [line["message"] for line in parse(stream)] == ["mine"]


@pytest.mark.usefixtures("restore_levels")
def test_calling_again_replaces_the_attachment() -> None:
    handler = app_json_handler(io.StringIO())
    with bare_root() as root:
        root.addHandler(handler)
        first = setup_logging(root=True)
        second = setup_logging(root=True)
        try:
            assert len(handler.filters) == 1
            assert second.shared_handlers == (handler,)
        finally:
            first.close()
            second.close()
        assert handler.filters == []


# -- structlog ------------------------------------------------------------------------------


@pytest.fixture
def structlog_defaults() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.mark.usefixtures("restore_levels", "structlog_defaults")
async def test_structlog_through_the_standard_library() -> None:
    """structlog's documented stdlib set-up: ProcessorFormatter on the root handler."""
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        add_connection_context,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    log = structlog.get_logger("myapp")

    async def handler_fn(ws: ServerConnection) -> None:
        structlog.contextvars.bind_contextvars(request_kind="chat")
        async for message in ws:
            if message == "crash":
                raise ZeroDivisionError("division by zero")
            log.info("inside the handler", room=7)
            await ws.send(message)

    with bare_root() as root:
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        setup = setup_logging(root=True)
        try:
            async with async_server(handler_fn, monitoring=OPTIONS) as server:
                await talk(server.url("/rooms/7"), crash=True)
                await wait_for_lines(stream, "ws_event", "connection_closed")
            log.info("outside")
        finally:
            setup.close()
    lines = parse(stream)
    assert_flat_and_private(stream.getvalue(), lines)
    assert [line.get("ws_event") for line in lines if "ws_event" in line] == [
        "connection_opened",
        "handler_crashed",
        "connection_closed",
    ]
    # Once each, and websockets' duplicates suppressed (its "server ..." lines remain).
    lines = [line for line in lines if not line["event"].startswith("server ")]
    assert len(lines) == 5
    opened, inside, crashed, closed, outside = lines
    assert inside["event"] == "inside the handler"
    assert inside["request_kind"] == "chat"
    assert inside["room"] == 7
    for line in (inside, crashed, closed):
        for key in ("connection_id", "route", "client_ip", "user_id"):
            assert line[key] == opened[key]
    assert opened["route"] == "/rooms/{room}"
    assert opened["client_ip"] == "203.0.113.0"
    assert closed["event"] == "connection closed"
    assert closed["close_code"] == 1011
    assert closed["error_type"] == "handler_exception"
    assert crashed["level"] == "error"
    assert "ZeroDivisionError" in crashed["exception"]
    assert not set(CONNECTION_FIELDS) & set(outside)


@pytest.mark.usefixtures("structlog_defaults")
async def test_structlog_on_its_own() -> None:
    """structlog without the standard library: the processor reads the connection itself."""
    stream = io.StringIO()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_connection_context,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    log = structlog.get_logger()

    async def handler_fn(ws: ServerConnection) -> None:
        async for message in ws:
            log.info("inside the handler")
            await ws.send(message)

    async with async_server(handler_fn, monitoring=OPTIONS) as server:
        await talk(server.url("/rooms/7"))
    (line,) = parse(stream)
    assert set(line) == {"event", "connection_id", "route", "client_ip", "user_id"}
    assert line["client_ip"] == "203.0.113.0"
    assert_flat_and_private(stream.getvalue(), [line])


def test_the_processor_copies_ws_monitorings_fields_from_a_foreign_record() -> None:
    record = logging.LogRecord("ws_monitoring.lifecycle", logging.INFO, "", 1, "x", (), None)
    record.__dict__.update({"connection_id": "c", "route": "/r", "ws_event": "e", "size": 3})
    event = add_connection_context(None, "info", {"event": "x", "_record": record})
    assert {k: event[k] for k in ("connection_id", "route", "ws_event", "size")} == {
        "connection_id": "c",
        "route": "/r",
        "ws_event": "e",
        "size": 3,
    }
    assert set(EVENT_FIELDS) >= {"ws_event", "size", "close_code"}


def test_both_are_typed_for_their_callers(tmp_path: Path) -> None:
    """mypy --strict accepts them where logging and structlog expect a filter, a processor."""
    snippet = tmp_path / "app.py"
    snippet.write_text(
        "import logging\n"
        "import structlog\n"
        "from structlog.typing import Processor\n"
        "from ws_monitoring.logging import ConnectionContextFilter, add_connection_context\n"
        "processors: list[Processor] = [structlog.contextvars.merge_contextvars,\n"
        "                               add_connection_context]\n"
        "handler = logging.StreamHandler()\n"
        "handler.addFilter(ConnectionContextFilter())\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
         str(snippet)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
