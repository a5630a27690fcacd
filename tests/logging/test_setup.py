"""setup_logging: formats, rotation, idempotence, websockets' duplicates, robustness."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve

import ws_monitoring
from tests.helpers.scrape import Samples
from tests.helpers.servers import HOST, async_server, async_wait_until, echo
from tests.logging.helpers import bare_root
from ws_monitoring.config import Config
from ws_monitoring.core import RECORD_ATTR
from ws_monitoring.logging.formatters import ECS_VERSION
from ws_monitoring.logging.setup import LoggingSetup, setup_logging
from ws_monitoring.privacy import JOURNAL_LOGGER, Privacy

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
KEY = b"k" * 32


class Capture:
    """setup_logging into a string buffer; ``lines()`` parses what was written."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.setups: list[LoggingSetup] = []

    def setup(self, level: int | str = "INFO", **kwargs: Any) -> LoggingSetup:
        kwargs.setdefault("stream", self.stream)
        kwargs.setdefault("background", False)
        kwargs.setdefault("privacy", Privacy(Config(pseudonym_key=KEY)))
        setup = setup_logging(level, **kwargs)
        self.setups.append(setup)
        return setup

    def text(self) -> str:
        for setup in self.setups:
            setup.flush()
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines()]


@pytest.fixture
def capture() -> Iterator[Capture]:
    cap = Capture()
    try:
        yield cap
    finally:
        for setup in cap.setups:
            setup.close()


log = logging.getLogger("ws_monitoring.test")


# -- fields and formats -----------------------------------------------------------------------


def test_json_fields(capture: Capture) -> None:
    capture.setup(service_name="chat", static_fields={"deployment.environment": "prod"})
    log.warning("hello %s", "world", extra={"peer": "203.0.113.5", "token": "t0k", "attempt": 2})
    (line,) = capture.lines()
    assert ISO_UTC.fullmatch(line.pop("timestamp"))
    assert line == {
        "level": "WARNING",
        "logger": "ws_monitoring.test",
        "message": "hello world",
        "service": "chat",
        "deployment.environment": "prod",
        "peer": "203.0.113.0",
        "attempt": 2,
    }


def test_json_message_dict_and_exception(capture: Capture) -> None:
    capture.setup()
    log.info({"action": "login", "client_ip": "203.0.113.5"})
    try:
        raise KeyError("from 198.51.100.7")
    except KeyError:
        log.exception("failed for %s", "198.51.100.7")
    first, second = capture.lines()
    assert first["action"] == "login"
    assert first["client_ip"] == "203.0.113.0"
    assert second["message"] == "failed for 198.51.100.0"
    assert second["error_type"] == "KeyError"
    assert second["error_message"] == "'from 198.51.100.0'"
    assert second["stack_trace"].startswith("Traceback (most recent call last):")
    assert "198.51.100.7" not in json.dumps(second)


def test_scrub_off_still_writes_valid_json(capture: Capture) -> None:
    capture.setup(scrub=False)
    log.info("peer 203.0.113.5 \udc80", extra={"token": "t0k"})
    (line,) = capture.lines()
    assert line["message"] == "peer 203.0.113.5 \ufffd"
    assert line["token"] == "t0k"


def test_ecs_fields_for_kibana(capture: Capture) -> None:
    capture.setup(fmt="ecs", service_name="chat", static_fields={"labels.team": "rt"})
    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        log.error("boom", extra={"http.request.method": "GET", "log": "clash"})
        context = span.get_span_context()
    log.info("outside")
    provider.shutdown()
    inside, outside = capture.lines()
    assert ISO_UTC.fullmatch(inside["@timestamp"])
    assert inside["log"]["level"] == "error"
    assert inside["log"]["logger"] == "ws_monitoring.test"
    assert inside["log"]["origin"]["function"] == "test_ecs_fields_for_kibana"
    assert inside["message"] == "boom"
    assert inside["ecs"] == {"version": ECS_VERSION}
    assert inside["service"] == {"name": "chat"}
    assert inside["trace"] == {"id": f"{context.trace_id:032x}"}
    assert inside["span"] == {"id": f"{context.span_id:016x}"}
    assert inside["http"] == {"request": {"method": "GET"}}
    assert inside["labels"] == {"team": "rt", "log": "clash"}
    assert "trace" not in outside
    assert "span" not in outside


def test_text_format_is_one_line_per_record(capture: Capture) -> None:
    capture.setup(fmt="text")
    log.info("line one\nforged INFO line", extra={"note": "two words", "n": 3, "empty": ""})
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("crashed")
    lines = capture.text().splitlines()
    assert re.fullmatch(
        r"\S+Z INFO     ws_monitoring\.test line one\\nforged INFO line "
        r'note="two words" n=3 empty=""',
        lines[0],
    )
    assert lines[1].endswith("crashed error_type=ValueError error_message=bad")
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: bad"


def test_service_name_defaults_to_otel_service_name(
    capture: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    capture.setup()
    log.info("x")
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    capture.setup()
    log.info("y")
    assert [line["service"] for line in capture.lines()] == ["from-env", "unknown_service:python"]


# -- malicious content ----------------------------------------------------------------------


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


MALICIOUS = [
    'quote " and backslash \\ and }{',
    'newline\n{"level": "CRITICAL"}\r\nsecond',
    "controls \x00\x01\x1b[31m\x7f",
    "separators \u2028 \u2029 \x85",
    "lone surrogates \ud800 \udfff",
    "x" * 200_000,
]


@pytest.mark.parametrize("fmt", ["json", "ecs"])
def test_malicious_content_stays_one_json_line(capture: Capture, fmt: str) -> None:
    capture.setup(fmt=fmt, max_field_length=1000)
    for text in MALICIOUS:
        log.info(text, extra={"field": text, "nested": {"k": [text]}})
    log.info("%s %s", "too few")  # bad arguments
    log.info("extra", extra={"obj": Unprintable()})
    raw = capture.text()
    assert raw.isascii()
    lines = raw.split("\n")
    assert lines[-1] == ""
    assert len(lines) - 1 == len(MALICIOUS) + 2
    parsed = [json.loads(line) for line in lines[:-1]]
    messages = [p["message"] for p in parsed]
    assert messages[1] == 'newline\n{"level": "CRITICAL"}\r\nsecond'
    assert messages[4] == "lone surrogates \ufffd \ufffd"
    assert len(messages[5]) < 1100
    assert messages[6] == "%s %s [bad log arguments]"
    assert parsed[7]["obj"] == "<unprintable Unprintable>"


def test_unformattable_record_still_yields_a_line(capture: Capture) -> None:
    capture.setup(fmt="ecs", static_fields={"a": 1, "a.b": 2})
    log.info("clash")
    capture.setup(fmt="json")
    record = logging.LogRecord("ws_monitoring.test", logging.INFO, __file__, 1, "m", None, None)
    record.created = float("nan")  # the timestamp cannot be formatted
    logging.getLogger("ws_monitoring.test").handle(record)
    first, second = capture.lines()
    assert first["a"] == 1
    assert first["labels"] == {"a_b": "2"}
    assert second["message"] == "[log record could not be formatted: ValueError]"


# -- handlers, rotation, idempotence ---------------------------------------------------------


def _our_handlers() -> list[logging.Handler]:
    return [
        h
        for name in (None, "ws_monitoring", "websockets", JOURNAL_LOGGER)
        for h in logging.getLogger(name).handlers
        if hasattr(h, "_ws_monitoring_setup")
    ]


def test_calling_twice_never_duplicates(capture: Capture) -> None:
    capture.setup()
    capture.setup()
    capture.setup(background=True)
    assert len(_our_handlers()) == 2  # ws_monitoring and websockets: one each
    log.info("once")
    logging.getLogger("websockets.server").info("also once")
    assert [line["message"] for line in capture.lines()] == ["once", "also once"]


def test_root_logger_is_left_alone_unless_asked(capture: Capture) -> None:
    with bare_root():
        root = logging.getLogger()
        before = (list(root.handlers), root.level)
        capture.setup("DEBUG")
        assert (list(root.handlers), root.level) == before
        assert logging.getLogger("ws_monitoring").propagate is False
        logging.getLogger("myapp").warning("not ours")
        assert capture.text() == ""
        setup = capture.setup("INFO", root=True)
        assert root.level == logging.INFO
        logging.getLogger("myapp").warning("now ours")
        log.info("ours too")
        assert [line["message"] for line in capture.lines()] == ["now ours", "ours too"]
        setup.close()
        assert (list(root.handlers), root.level) == before
        assert logging.getLogger("ws_monitoring").propagate is True


def test_levels_and_websockets_debug(capture: Capture) -> None:
    capture.setup("DEBUG")
    assert logging.getLogger("ws_monitoring").level == logging.DEBUG
    # websockets' DEBUG lines carry frame payloads: not unless asked.
    assert logging.getLogger("websockets").level == logging.INFO
    capture.setup("WARNING", websockets_level="DEBUG")
    assert logging.getLogger("websockets").level == logging.DEBUG
    assert logging.getLogger("ws_monitoring").level == logging.WARNING


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"fmt": "xml"}, "fmt='xml': expected one of json, ecs, text"),
    ({"level": "LOUD"}, "level='LOUD': not a logging level"),
    ({"websockets_level": "LOUD"}, "websockets_level='LOUD': not a logging level"),
    ({"max_bytes": -1}, "must be >= 0"),
    ({"queue_size": 0}, "queue_size >= 1"),
    ({"max_field_length": 3}, "at least 16"),
])  # fmt: skip
def test_invalid_arguments(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        setup_logging(**kwargs)
    assert _our_handlers() == []


def test_json_without_python_json_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pythonjsonlogger.json", None)
    with pytest.raises(ImportError, match=r"pip install 'ws-monitoring\[logging\]'"):
        setup_logging(fmt="json")
    assert _our_handlers() == []


def test_size_rotation(capture: Capture, tmp_path: Path) -> None:
    path = tmp_path / "ws.log"
    capture.setup(filename=path, stream=None, max_bytes=2000, backup_count=3)
    for i in range(60):
        log.info("line %d %s", i, "x" * 50)
    capture.text()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["ws.log", "ws.log.1", "ws.log.2", "ws.log.3"]
    for f in files:
        assert 0 < f.stat().st_size <= 2000
        for line in f.read_text().splitlines():
            assert json.loads(line)["logger"] == "ws_monitoring.test"
    last = [json.loads(line)["message"] for line in path.read_text().splitlines()]
    assert last[-1] == f"line 59 {'x' * 50}"


def test_time_rotation(capture: Capture, tmp_path: Path) -> None:
    path = tmp_path / "ws.log"
    setup = capture.setup(filename=path, stream=None, when="midnight", backup_count=2)
    (handler,) = setup.handlers
    assert isinstance(handler, logging.handlers.TimedRotatingFileHandler)
    assert (handler.when, handler.utc, handler.backupCount) == ("MIDNIGHT", True, 2)
    log.info("before midnight")
    handler.rolloverAt = 0  # midnight has passed
    log.info("after midnight")
    capture.text()
    rotated = [f for f in tmp_path.iterdir() if f.name != "ws.log"]
    assert len(rotated) == 1
    assert json.loads(rotated[0].read_text())["message"] == "before midnight"
    assert json.loads(path.read_text())["message"] == "after midnight"


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    setup = setup_logging(fmt="text", background=False)
    try:
        log.info("to stderr")
    finally:
        setup.close()
    assert "to stderr" in capsys.readouterr().err


# -- background writing ---------------------------------------------------------------------


class BlockingStream(io.StringIO):
    """A stream whose writes wait until released: a stuck log collector."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, s: str) -> int:
        self.entered.set()
        assert self.release.wait(10)
        return super().write(s)


def test_full_queue_drops_instead_of_blocking(capture: Capture) -> None:
    stream = BlockingStream()
    setup = capture.setup(stream=stream, background=True, queue_size=2)
    log.info("first")  # taken by the writer thread, which then blocks
    assert stream.entered.wait(10)
    for i in range(5):
        log.info("queued %d", i)
    assert setup.dropped == 3
    assert not setup.flush(timeout=0.05)
    stream.release.set()
    assert setup.flush()
    messages = [json.loads(line)["message"] for line in stream.getvalue().splitlines()]
    assert messages == ["first", "queued 0", "queued 1"]


def test_close_writes_what_is_queued(tmp_path: Path) -> None:
    path = tmp_path / "ws.log"
    setup = setup_logging(filename=path, background=True)
    for i in range(100):
        log.info("n%d", i)
    setup.close()
    setup.close()
    assert len(path.read_text().splitlines()) == 100
    assert _our_handlers() == []


@pytest.mark.parametrize("background", [True, False])
def test_a_log_file_that_cannot_be_written_is_counted_and_reported_once(
    background: bool,
    registry: CollectorRegistry,
    scrape_metrics: Callable[[], Samples],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A full device (``/dev/full``): no ``--- Logging error ---`` traceback per record."""
    setup = setup_logging(filename="/dev/full", background=background, registry=registry)
    try:
        for i in range(50):
            log.warning("record %d", i)
        setup.flush()
        samples = scrape_metrics()
        assert samples["ws_monitoring_log_records_dropped_total", {"reason": "write_error"}] == 50
        assert samples["ws_monitoring_log_records_dropped_total", {"reason": "queue_full"}] == 0
        assert setup.write_errors == 50
    finally:
        setup.close()  # flushing what is buffered fails too: no exception
    err = capsys.readouterr().err
    assert "Logging error" not in err
    assert "Traceback" not in err
    (report,) = err.splitlines()
    assert report.startswith("ws-monitoring: cannot write log records to /dev/full (OSError: ")
    assert "No space left on device" in report
    assert 'ws_monitoring_log_records_dropped_total{reason="write_error"}' in report


def test_a_full_queue_is_counted_in_the_metric(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    stream = BlockingStream()
    setup = setup_logging(stream=stream, queue_size=1, registry=registry)
    try:
        log.info("first")
        assert stream.entered.wait(10)
        for i in range(4):
            log.info("queued %d", i)
        assert setup.dropped == 3
        samples = scrape_metrics()
        assert samples["ws_monitoring_log_records_dropped_total", {"reason": "queue_full"}] == 3
    finally:
        stream.release.set()
        setup.close()


# -- consent journal ------------------------------------------------------------------------


def test_consent_journal_file(capture: Capture, tmp_path: Path) -> None:
    journal = tmp_path / "consent.jsonl"
    p = Privacy(Config(pseudonym_key=KEY))
    for background in (False, True):
        capture.setup(consent_journal=journal, background=background, service_name="chat")
        p.grant_user("alice", purposes={"ip"}, policy_version="v1")
        p.withdraw_user("alice")
        log.info("main")
    capture.text()
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [(e["action"], e["purposes"], e["service"]) for e in entries] == [
        ("grant", ["ip"], "chat"),
        ("withdraw", ["ip"], "chat"),
    ] * 2
    assert "alice" not in journal.read_text()
    # The journal's records stay out of the main log.
    assert [line["message"] for line in capture.lines()] == ["main", "main"]


def test_without_journal_file_consent_goes_to_the_main_log(capture: Capture) -> None:
    capture.setup()
    Privacy(Config(pseudonym_key=KEY)).grant_user("alice", purposes={"user"}, policy_version="v9")
    (line,) = capture.lines()
    assert line["logger"] == JOURNAL_LOGGER
    assert line["consent_entry"]["policy_version"] == "v9"


def test_journal_formatter_tolerates_foreign_records(capture: Capture, tmp_path: Path) -> None:
    journal = tmp_path / "consent.jsonl"
    capture.setup(consent_journal=journal)
    logging.getLogger(JOURNAL_LOGGER).info("written by hand")
    capture.text()
    (entry,) = [json.loads(line) for line in journal.read_text().splitlines()]
    assert entry["message"] == "written by hand"
    assert ISO_UTC.fullmatch(entry["time"])


# -- websockets' own lifecycle lines --------------------------------------------------------


async def _one_connection(url: str) -> None:
    async with connect(url) as client:
        await client.send("hi")
        await client.recv()


def _messages(capture: Capture, logger: str) -> list[str]:
    return [line["message"] for line in capture.lines() if line["logger"] == logger]


async def test_websockets_duplicates_are_suppressed(capture: Capture) -> None:
    capture.setup()
    async with async_server(echo, monitoring={"metrics": False}) as server:
        await _one_connection(server.url())
        await async_wait_until(
            lambda: "connection closed" in _messages(capture, "ws_monitoring.lifecycle")
        )
    assert "connection open" not in _messages(capture, "websockets.server")
    assert "connection closed" not in _messages(capture, "websockets.server")
    listening = f"server listening on 127.0.0.1:{server.port}"
    assert listening in _messages(capture, "websockets.server")


async def test_websockets_lines_kept_when_asked_or_not_duplicated(capture: Capture) -> None:
    capture.setup(suppress_websockets_lifecycle=False)
    async with async_server(echo, monitoring={"metrics": False}) as server:
        await _one_connection(server.url())
    assert "connection open" in _messages(capture, "websockets.server")
    capture.setup()
    # Lifecycle logs off: websockets' lines are the only ones, so they stay.
    async with async_server(echo, monitoring={"metrics": False, "log_lifecycle": False}) as server:
        await _one_connection(server.url())
    websockets_lines = _messages(capture, "websockets.server")
    assert websockets_lines.count("connection open") == 2


async def test_instrumented_handler_on_plain_websockets_serve(capture: Capture) -> None:
    capture.setup()
    handler = ws_monitoring.instrument(echo, metrics=False)

    async def reject(connection: ServerConnection, request: Any) -> Any:
        return connection.respond(403, "no\n") if request.path == "/no" else None

    async with ws_serve(handler, HOST, 0, process_request=reject) as server:
        port = server.sockets[0].getsockname()[1]
        await _one_connection(f"ws://{HOST}:{port}/")
        with pytest.raises(Exception, match="HTTP 403"):
            await connect(f"ws://{HOST}:{port}/no")
        await async_wait_until(
            lambda: "connection closed" in _messages(capture, "ws_monitoring.lifecycle")
        )
    websockets_lines = _messages(capture, "websockets.server")
    # No handshake logs of ours without ws_monitoring.serve: websockets' line stays.
    assert "HTTP response sent (403 Forbidden)" in websockets_lines
    assert "connection closed" not in websockets_lines


# -- edge cases of records ------------------------------------------------------------------


class Gone:
    pass


def _dead_proxy() -> Any:
    obj = Gone()
    proxy = weakref.proxy(obj)
    del obj
    return proxy


def test_records_without_scrubbing_are_still_bounded(capture: Capture) -> None:
    capture.setup(logging.INFO, scrub=False, max_field_length=30)
    deep: dict[str, Any] = {"leaf": "x" * 50}
    for _ in range(40):
        deep = {"d": deep}
    log.info("m", extra={"obj": Unprintable(), "deep": deep, "ip": ipaddress.ip_address("::1")})
    (line,) = capture.lines()
    assert line["obj"] == "<unprintable Unprintable>"
    assert line["ip"] == "::1"
    node = line["deep"]
    while isinstance(node, dict):
        node = node["d"]
    assert node == "[depth limit]"


@pytest.mark.parametrize(("fmt", "field"), [("json", "stack_trace"), ("ecs", "error")])
def test_exc_text_without_exc_info(capture: Capture, fmt: str, field: str) -> None:
    capture.setup(fmt=fmt)
    record = logging.LogRecord("ws_monitoring.test", logging.ERROR, __file__, 1, "m", None, None)
    record.exc_text = "Traceback: from 198.51.100.7"
    log.handle(record)
    (line,) = capture.lines()
    expected = "Traceback: from 198.51.100.0"
    assert line[field] == (expected if fmt == "json" else {"stack_trace": expected})
    assert "error_type" not in line


@pytest.mark.parametrize("fmt", ["ecs", "text"])
def test_unformattable_record_in_other_formats(capture: Capture, fmt: str) -> None:
    capture.setup(fmt=fmt)
    record = logging.LogRecord("ws_monitoring.test", logging.INFO, __file__, 1, "m", None, None)
    record.created = float("nan")
    log.handle(record)
    assert json.loads(capture.text())["message"] == (
        "[log record could not be formatted: ValueError]"
    )


def test_no_opentelemetry_means_no_trace_fields(
    capture: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    capture.setup()
    monkeypatch.delitem(sys.modules, "opentelemetry.trace", raising=False)
    log.info("plain")
    assert "trace_id" not in capture.lines()[0]


def test_dead_websocket_reference(capture: Capture) -> None:
    capture.setup()
    ws_logger = logging.getLogger("websockets.server")
    ws_logger.info("connection open", extra={"websocket": _dead_proxy()})
    ws_logger.info("connection open")  # logged without a connection: kept
    ws_logger.info("something else", extra={"websocket": _dead_proxy()})
    lines = capture.lines()
    assert [line["message"] for line in lines] == [
        "connection open",
        "connection open",
        "something else",
    ]
    assert all("connection_id" not in line for line in lines)


def test_ecs_pseudonymized_client_is_an_address_not_an_ip(capture: Capture) -> None:
    capture.setup(fmt="ecs")
    p = Privacy(Config(pseudonym_key=KEY, pseudonymize_ips=True))

    async def handler(ws: ServerConnection) -> None:
        record = getattr(ws, RECORD_ATTR)
        record.client = p.client(("203.0.113.5", 1), record.request)
        log.info("inside")
        await ws.send("ok")

    async def run() -> None:
        async with (
            async_server(handler, monitoring={"metrics": False}) as s,
            connect(s.url()) as client,
        ):
            await client.recv()

    asyncio.run(run())
    (line,) = [line for line in capture.lines() if line["message"] == "inside"]
    assert line["client"] == {"address": p.anonymize_ip("203.0.113.5")}


def test_a_traceback_is_formatted_by_the_writer_thread_with_the_context_of_the_call(
    capture: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_core import conn_with_request, make_monitor
    from ws_monitoring.logging.context import current_connection

    record = make_monitor(pseudonym_key=KEY).open(conn_with_request("/rooms/7"))
    formatted_in: list[str] = []
    privacy = record.monitor.privacy
    original = privacy.format_exception

    def spy(exc: BaseException) -> str:
        formatted_in.append(threading.current_thread().name)
        return original(exc)

    monkeypatch.setattr(privacy, "format_exception", spy)
    capture.setup(background=True)
    args = ["before"]
    token = current_connection.set(record)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("crashed with %s", args)
    finally:
        current_connection.reset(token)
    args[0] = "after"  # the message is the one of the call
    [line] = capture.lines()
    assert formatted_in
    assert threading.main_thread().name not in formatted_in
    assert line["message"] == "crashed with ['before']"
    assert line["connection_id"] == record.id
    assert line["route"] == "/rooms/{id}"
    assert line["client_ip"] == "203.0.113.0"
    assert line["error_type"] == "ValueError"
    assert "raise ValueError" in line["stack_trace"]
