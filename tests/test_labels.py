"""Bounded labels: routes, close codes and handshake statuses, unit and end to end."""

from __future__ import annotations

import asyncio
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request, Response

import ws_monitoring
from tests.helpers.scrape import Samples
from tests.helpers.servers import RawClient, async_server, close_frame, settled
from ws_monitoring.config import Config
from ws_monitoring.labels import (
    ERROR_TYPES,
    HANDSHAKE_FAILURES,
    RouteMapper,
    close_code_label,
    handshake_status_label,
)

ROOT = Path(__file__).resolve().parents[1]


async def wait_closed(ws: ServerConnection) -> None:
    await ws.wait_closed()


def routes_of(samples: Samples, name: str = "websocket_connections_total") -> dict[str, float]:
    return {labels["route"]: samples[name, labels] for labels in samples.series(name)}


# -- close codes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "label"),
    [
        (None, "1006"),
        (1000, "1000"),
        (1001, "1001"),
        (1002, "1002"),
        (1003, "1003"),
        (1005, "1005"),
        (1006, "1006"),
        (1007, "1007"),
        (1008, "1008"),
        (1009, "1009"),
        (1010, "1010"),
        (1011, "1011"),
        (1012, "1012"),
        (1013, "1013"),
        (1014, "1014"),
        (1015, "1015"),
        (3000, "3xxx"),
        (3999, "3xxx"),
        (4000, "4xxx"),
        (4999, "4xxx"),
        (0, "other"),
        (999, "other"),
        (1004, "other"),
        (1016, "other"),
        (2999, "other"),
        (5000, "other"),
        (65535, "other"),
    ],
)
def test_close_code_label(code: int | None, label: str) -> None:
    assert close_code_label(code) == label


@pytest.mark.parametrize(
    ("status", "failure", "label"),
    [
        (401, None, "401"),
        (404, None, "404"),
        (500, None, "500"),
        (100, None, "100"),
        (599, None, "599"),
        (None, "invalid_request", "invalid_request"),
        (None, "timeout", "timeout"),
        (None, "connection_lost", "connection_lost"),
        (None, "error", "error"),
        (None, "anything a client could choose", "error"),
        (None, None, "error"),
        (99, None, "error"),
        (600, "timeout", "timeout"),
    ],
)
def test_handshake_status_label(status: int | None, failure: str | None, label: str) -> None:
    assert handshake_status_label(status, failure) == label


def test_fixed_value_sets() -> None:
    assert HANDSHAKE_FAILURES == ("invalid_request", "timeout", "connection_lost", "error")
    assert set(ERROR_TYPES) == {
        "handler_exception",
        "protocol_error",
        "message_too_big",
        "invalid_payload",
        "timeout",
        "connection_reset",
        "internal_error",
    }


# -- RouteMapper ------------------------------------------------------------------------------


def mapper(**options: object) -> RouteMapper:
    return RouteMapper(Config(**options))  # type: ignore[arg-type]


def test_default_route_is_the_path_without_query() -> None:
    routes = mapper()
    assert routes("/chat?token=secret&user=42") == "/chat"
    assert routes("/chat") == "/chat"
    assert routes("") == "/"
    assert routes("?only=query") == "/"


def test_templates_first_match_wins() -> None:
    routes = mapper(routes=["/rooms/{id}", "/rooms/{id}/{sub}", "/files/{rest:path}", "/a.b"])
    assert routes("/rooms/42?x=1") == "/rooms/{id}"
    assert routes("/rooms/42/members") == "/rooms/{id}/{sub}"
    assert routes("/files/a/b/c.txt") == "/files/{rest:path}"
    assert routes("/a.b") == "/a.b"
    # Template text is literal, not a regular expression.
    assert routes("/aXb") == "__unmatched__"
    # A placeholder needs at least one character and never spans "/".
    assert routes("/rooms/") == "__unmatched__"
    assert routes("/rooms/1/2/3") == "__unmatched__"
    assert routes("/files/") == "__unmatched__"


def test_custom_unmatched_and_overflow_values() -> None:
    routes = mapper(routes=["/x"], unmatched_route="other", max_routes=1, overflow_route="many")
    assert routes("/y") == "other"
    assert routes("/x") == "many"
    assert routes.folded == 1


def test_route_function() -> None:
    def group(path: str) -> str | None:
        if path == "/boom":
            raise RuntimeError("bug in the user's function")
        if path == "/int":
            return 42  # type: ignore[return-value]
        if path == "/empty":
            return ""
        return None if path == "/none" else path.split("/")[1]

    routes = mapper(routes=group)
    assert routes("/rooms/42?t=1") == "rooms"
    for path in ("/boom", "/int", "/empty", "/none"):
        assert routes(path) == "__unmatched__"


def test_the_function_never_sees_the_query() -> None:
    seen: list[str] = []
    routes = mapper(routes=lambda path: seen.append(path) or "r")
    routes("/p?secret=1")
    assert seen == ["/p"]


def test_bad_template_is_rejected() -> None:
    with pytest.raises(
        ValueError, match=re.escape("routes: template 'rooms/{id}' must start with '/'")
    ):
        mapper(routes=["rooms/{id}"])


def test_series_limit_folds_new_routes_but_keeps_known_ones() -> None:
    routes = mapper(max_routes=3)
    assert [routes(f"/{i}") for i in range(5)] == ["/0", "/1", "/2", "__overflow__", "__overflow__"]
    assert routes("/1") == "/1"
    assert routes("/4") == "__overflow__"
    assert routes.folded == 3


def test_series_limit_holds_under_threads() -> None:
    routes = mapper(max_routes=50)
    barrier = threading.Barrier(8)
    results: list[set[str]] = [set() for _ in range(8)]

    def work(n: int) -> None:
        barrier.wait()
        for i in range(2000):
            results[n].add(routes(f"/t{n}/{i}"))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    labels = set().union(*results)
    assert len(labels) == 51
    assert "__overflow__" in labels
    assert routes.folded == 8 * 2000 - 50


# -- end to end: what the scrape shows ------------------------------------------------------------


async def test_route_templates_end_to_end(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    options = {"registry": registry, "routes": ["/rooms/{id}", "/files/{rest:path}"]}
    async with async_server(wait_closed, monitoring=options) as srv:
        for path in ("/rooms/1", "/rooms/2?token=s3cr3t", "/files/a/b", "/nope", "/rooms/1/x"):
            async with connect(srv.url(path)):
                pass
        samples = await settled(scrape_metrics, 5)
    assert routes_of(samples) == {"/rooms/{id}": 2, "/files/{rest:path}": 1, "__unmatched__": 2}
    assert "s3cr3t" not in samples.text
    assert "token" not in samples.text


async def test_route_function_end_to_end(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    def by_first_segment(path: str) -> str | None:
        return "/" + path.split("/")[1] if path.startswith("/api/") else None

    options = {"registry": registry, "routes": by_first_segment}
    async with async_server(wait_closed, monitoring=options) as srv:
        for path in ("/api/v1/x?k=1", "/api/v2", "/static/app.js"):
            async with connect(srv.url(path)):
                pass
        samples = await settled(scrape_metrics, 3)
    assert routes_of(samples) == {"/api": 2, "__unmatched__": 1}


async def test_default_route_drops_the_query_end_to_end(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    async with async_server(wait_closed, monitoring={"registry": registry}) as srv:
        for query in ("?token=a", "?token=b", ""):
            async with connect(srv.url("/feed" + query)):
                pass
        samples = await settled(scrape_metrics, 3)
    assert routes_of(samples) == {"/feed": 3}
    assert "token" not in samples.text


async def test_series_limit_end_to_end(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    async with async_server(wait_closed, monitoring={"registry": registry, "max_routes": 2}) as srv:
        for path in ("/a", "/b", "/c", "/d", "/a"):
            async with connect(srv.url(path)):
                pass
        samples = await settled(scrape_metrics, 5)
    assert routes_of(samples) == {"/a": 2, "/b": 1, "__overflow__": 2}


async def test_ten_thousand_distinct_paths_keep_the_series_bounded(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    count, limit = 10_000, 20

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    # Only metrics, and no keepalive: less work per connection, none of it at stake here.
    handler = ws_monitoring.instrument(
        echo, registry=registry, max_routes=limit, tracing=False, log_lifecycle=False
    )
    monitor = handler.__ws_monitoring__  # type: ignore[attr-defined]
    async with async_server(handler, monitoring={}, ping_interval=None) as srv:
        flood = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.helpers.flood",
            str(srv.port),
            str(count),
            "16",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await flood.communicate()
        assert flood.returncode == 0, out
        assert int(out) == count
        # The server still serves, and the newcomer's path is folded too.
        async with connect(srv.url("/after")) as client:
            await client.send("still there?")
            assert await client.recv() == "still there?"
        samples = await settled(scrape_metrics, count + 1)
    routes = routes_of(samples)
    assert len(routes) == limit + 1
    assert routes.pop("__overflow__") == count - limit + 1
    assert all(re.fullmatch(r"/flood/\d+", route) for route in routes)
    assert set(routes.values()) == {1}
    assert monitor.routes.folded == count - limit + 1
    # Every route-labelled series of every metric stays within those 21 values.
    labelled = {
        labels["route"] for (_, ls) in samples.values for labels in [dict(ls)] if "route" in labels
    }
    assert len(labelled) == limit + 1
    assert samples.total("websocket_disconnections_total", code="1000") == count + 1
    # Per route: active, total, disconnections, 4 message counters and four histograms
    # (buckets + _count + _sum); plus the handshake histogram. Nothing grows with paths.
    config = Config()
    per_route = 3 + 4
    per_route += len(config.connection_duration_buckets) + 3
    per_route += 2 * (len(config.size_buckets) + 3)
    per_route += len(config.duration_buckets) + 3 + len(config.rtt_buckets) + 3
    ours = [name for name, _ in samples.values if name.startswith("websocket_")]
    assert len(ours) == (limit + 1) * per_route + len(config.handshake_buckets) + 3
    assert "?q=" not in samples.text


async def test_close_code_labels_end_to_end(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    valid = (1000, 1001, 3000, 3999, 4000, 4999)
    # websockets refuses to send these: a raw socket does.
    invalid = (5000, 2999, 1004, 999, 1016)
    async with async_server(wait_closed, monitoring={"registry": registry}) as srv:
        for code in valid:
            async with connect(srv.url("/c")) as client:
                await client.close(code)
        for code in invalid:
            raw = await RawClient.open(srv.port, "/c")
            await raw.send(close_frame(code))
            assert await raw.read_close() == (1002, "invalid status code")
            await raw.aclose()
        raw = await RawClient.open(srv.port, "/c")
        await raw.send(close_frame(None))  # a close frame without a code
        assert await raw.read_close() == (None, "")
        await raw.aclose()
        raw = await RawClient.open(srv.port, "/c")
        await raw.aclose()  # no close frame at all
        samples = await settled(scrape_metrics, len(valid) + len(invalid) + 2)
    codes = {
        labels["code"]: samples["websocket_disconnections_total", labels]
        for labels in samples.series("websocket_disconnections_total")
    }
    # The server closed the invalid ones with 1002: that is what is counted.
    assert codes == {"1000": 1, "1001": 1, "3xxx": 2, "4xxx": 2, "1002": 5, "1005": 1, "1006": 1}
    errors = samples.series("websocket_errors_total")
    assert {e["type"] for e in errors} == {"protocol_error", "connection_reset"}
    assert samples.get("websocket_errors_total", route="/c", type="protocol_error") == 5
    assert samples.get("websocket_errors_total", route="/c", type="connection_reset") == 1


async def test_handshake_status_labels_end_to_end(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/private":
            return connection.respond(401, "who are you?\n")
        if request.path == "/gone":
            return connection.respond(404, "no such room\n")
        if request.path == "/crash":
            raise RuntimeError("bug in process_request")
        return None

    options = {"registry": registry}
    async with async_server(
        wait_closed, monitoring=options, process_request=process_request, open_timeout=0.3
    ) as srv:
        for path, status in (("/private", 401), ("/gone", 404), ("/crash", 500)):
            with pytest.raises(InvalidStatus) as caught:
                await connect(srv.url(path))
            assert caught.value.response.status_code == status
        # Plain HTTP without Upgrade: websockets answers 426 itself.
        raw = await RawClient.connect(srv.port)
        await raw.send(b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await raw.read_eof()).startswith(b"HTTP/1.1 426 ")
        # Not HTTP at all: no response, the connection is dropped.
        raw = await RawClient.connect(srv.port)
        await raw.send(b"\x16\x03\x01\x02\x00 TLS hello to a plaintext port\r\n\r\n")
        assert await raw.read_eof() == b""
        # The client goes away in the middle of its request.
        raw = await RawClient.connect(srv.port)
        await raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
        await raw.aclose()
        # The client never finishes its request: open_timeout.
        raw = await RawClient.connect(srv.port)
        await raw.send(b"GET / HTTP/1.1\r\n")
        assert await raw.read_eof() == b""
        # The health check answers 200 and is no failure.
        health = await RawClient.connect(srv.port)
        await health.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await health.read_eof()).startswith(b"HTTP/1.1 200 OK")
        async with connect(srv.url("/ok")):
            pass

        def failures() -> dict[str, float]:
            samples = scrape_metrics()
            return {
                labels["status"]: samples["websocket_handshake_failures_total", labels]
                for labels in samples.series("websocket_handshake_failures_total")
            }

        expected = {
            "401": 1,
            "404": 1,
            "500": 1,
            "426": 1,
            "invalid_request": 1,
            "connection_lost": 1,
            "timeout": 1,
        }
        deadline = asyncio.get_running_loop().time() + 10
        while failures() != expected and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert failures() == expected
        samples = await settled(scrape_metrics, 1)
    # Every handshake is timed except the health check: 7 failures and 1 success.
    assert samples["websocket_handshake_duration_seconds_count"] == 8
