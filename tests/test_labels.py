"""Bounded labels: routes, close codes and handshake statuses, unit and end to end."""

from __future__ import annotations

import asyncio
import random
import re
import string
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
from tests.helpers.servers import RawClient, async_server, close_frame, echo, settled
from ws_monitoring.config import Config
from ws_monitoring.labels import (
    ADMIT_AFTER,
    CANDIDATES,
    ERROR_TYPES,
    HANDSHAKE_FAILURES,
    MAX_LABEL_LENGTH,
    LabelTable,
    RouteMapper,
    clean_label,
    close_code_label,
    handshake_status_label,
)
from ws_monitoring.privacy import safe_path

ROOT = Path(__file__).resolve().parents[1]


async def wait_closed(ws: ServerConnection) -> None:
    await ws.wait_closed()


def routes_of(samples: Samples, name: str = "websocket_connections_total") -> dict[str, float]:
    """Each route's total, summed over its other labels (tenants)."""
    found: dict[str, float] = {}
    for labels in samples.series(name):
        found[labels["route"]] = found.get(labels["route"], 0) + samples[name, labels]
    return found


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
    routes = mapper(max_routes=4)
    # The first half of the table fills on first sight...
    assert [routes(p) for p in ("/a", "/b")] == ["/a", "/b"]
    # ... the rest on a route's third sighting: routes seen once stay out.
    assert [routes("/c") for _ in range(ADMIT_AFTER)] == ["__overflow__"] * 2 + ["/c"]
    assert [routes("/d") for _ in range(ADMIT_AFTER)] == ["__overflow__"] * 2 + ["/d"]
    # Full: nothing else gets in, however often it is seen; known routes stay.
    assert {routes("/e") for _ in range(10)} == {"__overflow__"}
    assert routes("/a") == "/a"
    assert routes.folded == 2 + 2 + 10


def test_routes_seen_once_do_not_crowd_out_steady_ones() -> None:
    routes = mapper(max_routes=10, route_from_path=True)
    for i in range(5):
        assert routes(f"/junk/{i}") == f"/junk/{i}"  # the free half: first come
    # A route in steady use, between one-off paths: a scan of 10 000 paths once it was
    # seen twice, fewer than CANDIDATES * max_routes before that.
    steady = [routes("/steady")]
    for i in range(CANDIDATES * 10 - 1):
        assert routes(f"/scan/a/{i}") == "__overflow__"
    steady.append(routes("/steady"))
    for i in range(10_000):
        assert routes(f"/scan/b/{i}") == "__overflow__"
    steady.append(routes("/steady"))
    assert steady == ["__overflow__", "__overflow__", "/steady"]
    assert routes("/steady") == "/steady"
    # A path seen twice, and a third time, is as steady as any other.
    assert [routes("/scan/b/9999") for _ in range(2)] == ["__overflow__", "/scan/b/9999"]


def test_label_table_memory_is_bounded() -> None:
    table = LabelTable(8, "many")
    for i in range(100_000):
        table(f"v{i % 50_000}")  # each value seen twice: never admitted past the half
    assert len(table) == 4
    assert len(table._candidates) == CANDIDATES * 8
    # The admitted ones' first and second sightings are the only ones not folded.
    assert table.folded == 100_000 - 8
    assert table.peek("v0") == "v0"
    assert table.peek("v9") == "many"  # peek counts no sighting
    assert table.folded == 100_000 - 8


def test_series_limit_holds_under_threads() -> None:
    routes = mapper(max_routes=50, route_from_path=True)
    barrier = threading.Barrier(8)
    results: list[set[str]] = [set() for _ in range(8)]

    def work(n: int) -> None:
        barrier.wait()
        for i in range(2000):
            results[n].add(routes(f"/t{n}/{i % 1000}"))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    labels = set().union(*results)
    # Each path is seen twice: only the free half of the table is filled.
    assert len(labels) == 25 + 1
    assert "__overflow__" in labels
    assert routes.folded == 8 * 2000 - 2 * 25


# -- the default route grouping (privacy.safe_path) ----------------------------------------

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0"
    ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)
EIGHT_KB = 8000  # websockets reads request lines of up to 8 KiB

ROUTE_TABLE = [
    ("/", "/"),
    ("", "/"),
    ("?only=query", "/"),
    ("/chat", "/chat"),
    ("/chat?token=s3cr3t&user=alice", "/chat"),
    ("/chat#fragment", "/chat"),
    ("/rooms/123", "/rooms/{id}"),
    ("/rooms/123/members", "/rooms/{id}/members"),
    ("/page/2", "/page/{id}"),
    ("/orders/4111111111111111", "/orders/{id}"),
    ("/v2/2024-01-31/report", "/v2/{id}/report"),
    ("/users/alice@example.com/feed", "/users/{id}/feed"),
    ("/users/alice%40example.com/feed", "/users/{id}/feed"),
    (f"/t/{JWT}", "/t/{id}"),
    ("/rooms/8f14e45f-ceea-467f-a0e5-7d6e1c2b9a31", "/rooms/{id}"),
    ("/rooms/8f14e45fceea467fa0e57d6e1c2b9a31", "/rooms/{id}"),
    ("/rooms/{8f14e45f-ceea-467f-a0e5-7d6e1c2b9a31}", "/rooms/{id}"),
    ("/blob/5f3a9c21", "/blob/{id}"),
    ("/blob/deadbee1", "/blob/{id}"),
    ("/rooms/room123", "/rooms/{id}"),
    ("/k/tk_Q9zLm2XvB8nR4wY7", "/k/{id}"),
    ("/k/aZbYcXdWeV", "/k/{id}"),
    ("/k/dGVzdA==", "/k/{id}"),
    ("/k/a+b", "/k/{id}"),
    ("/api/v1/feed", "/api/v1/feed"),
    ("/socket.io/", "/socket.io/"),
    ("/ws/getUserProfile", "/ws/getUserProfile"),
    ("/files/report.pdf", "/files/report.pdf"),
    ("/chat-room/~lobby", "/chat-room/~lobby"),
    ("/deadbeef", "/deadbeef"),  # letters only: a word
    # trailing slashes and empty segments
    ("/rooms/", "/rooms/"),
    ("/rooms/123/", "/rooms/{id}/"),
    ("/rooms//123", "/rooms/{id}"),
    ("//chat", "/chat"),
    ("///", "/"),
    # percent-encoding and unicode: judged once decoded, shown decoded when kept
    ("/%66eed", "/feed"),
    ("/caf%C3%A9/menu", "/{id}/menu"),
    ("/%E2%9C%93", "/{id}"),
    ("/%F0%9F%98%80/x", "/{id}/x"),
    ("/ws/user%20name", "/ws/{id}"),
    ("/a%2Fb/c", "/{id}/c"),  # an encoded "/" is no separator
    ("/r/abc%00", "/r/{id}"),
    ("/x/%zz", "/x/{id}"),
    # control characters (ANSI escapes)
    ("/\x1b[31mred", "/{id}"),
    # long segments, many segments, 8 KB paths
    ("/" + "a" * 32, "/" + "a" * 32),
    ("/" + "a" * 33, "/{id}"),
    ("/" + "a" * EIGHT_KB, "/{id}"),
    ("/x/" + "9" * EIGHT_KB, "/x/{id}"),
    ("/" + "b/" * (EIGHT_KB // 2), "/" + "b/" * 16 + "{rest}"),
    ("/" * EIGHT_KB, "/"),
    ("/" + "/".join(["segment-word"] * 12), "/" + "/".join(["segment-word"] * 9) + "/{rest}"),
]


@pytest.mark.parametrize(("path", "route"), ROUTE_TABLE)
def test_default_route_grouping(path: str, route: str) -> None:
    assert mapper().group(path) == route
    assert safe_path(path) == route
    assert len(route) <= MAX_LABEL_LENGTH


def test_route_from_path_is_the_raw_path_cleaned_and_capped() -> None:
    routes = mapper(route_from_path=True)
    assert routes.group("/users/alice@example.com/feed?x=1") == "/users/alice@example.com/feed"
    assert routes.group("/\x1b[31mred\u202e") == "/[31mred"
    long = routes.group("/" + "a" * EIGHT_KB)
    assert long == "/" + "a" * (MAX_LABEL_LENGTH - 2) + "…"
    assert len(long) == MAX_LABEL_LENGTH


@pytest.mark.parametrize(
    ("value", "label"),
    [
        ("plain", "plain"),
        ("a\x1b[31mb", "a[31mb"),
        ("tab\tnew\nline\r", "tabnewline"),
        ("\u202eevil\u200b", "evil"),
        ("\x7f\x85x", "x"),
        ("caf\u00e9 \u2713", "caf\u00e9 \u2713"),
        ("lone \udcff", "lone \ufffd"),
        ("x" * 128, "x" * 128),
        ("x" * 129, "x" * 127 + "…"),
    ],
)
def test_clean_label(value: str, label: str) -> None:
    assert clean_label(value) == label


def test_function_and_template_routes_are_cleaned_too() -> None:
    assert mapper(routes=lambda p: "\x1b[1m" + "r" * 500).group("/x") == "[1m" + "r" * 124 + "…"


def test_route_from_path_and_routes_exclude_each_other() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        Config(route_from_path=True, routes=["/x"])


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
    options = {"registry": registry, "max_routes": 4}
    async with async_server(wait_closed, monitoring=options) as srv:
        for path in ("/a", "/b", "/c", "/d", "/a", "/d", "/d", "/e", "/d"):
            async with connect(srv.url(path)):
                pass
        samples = await settled(scrape_metrics, 9)
    # /a and /b: the free half; /d on its third sighting; /c and /e seen once.
    assert routes_of(samples) == {"/a": 2, "/b": 1, "/d": 2, "__overflow__": 4}


async def test_ten_thousand_distinct_paths_keep_the_series_bounded(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    count, limit = 10_000, 20

    # Only metrics, and no keepalive: less work per connection, none of it at stake here.
    # The raw paths (unsafe): the safe default would fold /flood/<i> into /flood/{id}.
    handler = ws_monitoring.instrument(
        echo,
        registry=registry,
        max_routes=limit,
        route_from_path=True,
        tracing=False,
        log_lifecycle=False,
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
    # Each path is seen once: only the free half of the table is used.
    admitted = limit // 2
    assert len(routes) == admitted + 1
    assert routes.pop("__overflow__") == count - admitted + 1
    assert all(re.fullmatch(r"/flood/\d+", route) for route in routes)
    assert set(routes.values()) == {1}
    assert monitor.routes.folded == count - admitted + 1
    # Every route-labelled series of every metric stays within those 11 values.
    labelled = {
        labels["route"] for (_, ls) in samples.values for labels in [dict(ls)] if "route" in labels
    }
    assert len(labelled) == admitted + 1
    assert samples.total("websocket_disconnections_total", code="1000") == count + 1
    # Per route: active, total, disconnections, 4 message counters and four histograms
    # (buckets + _count + _sum); plus the handshake histogram. Nothing grows with paths.
    config = Config()
    per_route = 3 + 4
    per_route += len(config.connection_duration_buckets) + 3
    per_route += 2 * (len(config.size_buckets) + 3)
    per_route += len(config.duration_buckets) + 3 + len(config.rtt_buckets) + 3
    ours = [name for name, _ in samples.values if name.startswith("websocket_")]
    assert len(ours) == (admitted + 1) * per_route + len(config.handshake_buckets) + 3
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


# -- label length, control characters, scrape size ---------------------------------------------


def long_path(rng: random.Random, length: int = EIGHT_KB) -> str:
    alphabet = string.ascii_letters + string.digits + "-_"
    return "/x/" + "".join(rng.choices(alphabet, k=length - 3))


@pytest.mark.parametrize("raw", [False, True], ids=["default", "route_from_path"])
async def test_long_paths_keep_the_scrape_small(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples], raw: bool
) -> None:
    rng = random.Random(19)
    options = {"registry": registry, "route_from_path": raw, "tracing": False}
    async with async_server(wait_closed, monitoring=options) as srv:
        async with connect(srv.url("/x/1")):
            pass
        baseline = await settled(scrape_metrics, 1)
        for _ in range(100):
            async with connect(srv.url(long_path(rng))):
                pass
        samples = await settled(scrape_metrics, 101)
    size = len(samples.text.encode())
    routes = routes_of(samples)
    assert all(len(route) <= MAX_LABEL_LENGTH for route in routes)
    # Every line is bounded by the label cap (the name, the labels, a value).
    assert max(map(len, samples.text.splitlines())) <= 2 * MAX_LABEL_LENGTH + 100
    if raw:
        # Raw paths (unsafe): the first half of max_routes (50) gets in, each cut to
        # 128 characters; the issue measured 64 MB here before the cap.
        assert len(routes) == 50 + 1
        lines = baseline.text.splitlines()
        per_route = len(baseline.text.encode()) + sum('route="' in line for line in lines) * (
            MAX_LABEL_LENGTH * 3  # … is 3 bytes in UTF-8
        )
        assert size <= 51 * per_route
    else:
        # The safe default: one route, /x/{id}, the same series as a single connection.
        assert routes == {"/x/{id}": 101}
        assert [name for name, _ in samples.values] == [name for name, _ in baseline.values]
        assert size <= len(baseline.text.encode()) + 256
    print(f"scrape after 100 connections to 8 KB paths ({'raw' if raw else 'default'}): {size} B")


@pytest.mark.parametrize(
    ("options", "route"),
    [({}, "/{id}/tail"), ({"route_from_path": True}, "/[31mred[0m/tail")],
)
async def test_control_characters_never_reach_the_scrape(
    registry: CollectorRegistry,
    scrape_metrics: Callable[[], Samples],
    options: dict[str, object],
    route: str,
) -> None:
    async with async_server(wait_closed, monitoring={"registry": registry, **options}) as srv:
        raw = await RawClient.open(srv.port, "/\x1b[31mred\x1b[0m/tail")
        await raw.send(close_frame(1000))
        assert await raw.read_close() == (1000, "")
        await raw.aclose()
        samples = await settled(scrape_metrics, 1)
    assert routes_of(samples) == {route: 1}
    assert "\x1b" not in samples.text


# -- tenants -------------------------------------------------------------------------------------


def tenants_of(samples: Samples, name: str = "websocket_connections_total") -> dict[str, float]:
    found: dict[str, float] = {}
    for labels in samples.series(name):
        found[labels["tenant"]] = found.get(labels["tenant"], 0) + samples[name, labels]
    return found


def by_header(request: Request) -> str | None:
    return request.headers.get("X-Tenant")


async def test_tenant_allow_list_end_to_end(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    options = {"registry": registry, "tenant": by_header, "tenants": ["acme", "globex"]}
    async with async_server(echo, monitoring=options) as srv:
        for tenant in ("acme", "acme", "globex", "initech", "__other__", "ACME", None):
            headers = {} if tenant is None else {"X-Tenant": tenant}
            async with connect(srv.url("/chat"), additional_headers=headers) as client:
                await client.send("hi")
                assert await client.recv() == "hi"
        samples = await settled(scrape_metrics, 7)
    assert tenants_of(samples) == {"acme": 2, "globex": 1, "__other__": 3, "__none__": 1}
    # Every route-labelled family has the tenant label; handshake families do not.
    for name, labels in samples.values:
        if "route" in dict(labels):
            assert "tenant" in dict(labels), name
        if name.startswith("websocket_handshake"):
            assert "tenant" not in dict(labels), name
    assert (
        samples.get(
            "websocket_messages_total",
            route="/chat",
            tenant="acme",
            direction="received",
            type="text",
        )
        == 2
    )


async def test_ten_thousand_random_tenants_keep_the_series_bounded(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    count, limit = 10_000, 20

    def last_segment(request: Request) -> str:
        # /flood/<i>?q=<i>: a tenant per connection, as a client varying a header would.
        return request.path.split("?", 1)[0].rsplit("/", 1)[-1]

    handler = ws_monitoring.instrument(
        wait_closed,
        registry=registry,
        tenant=last_segment,
        max_tenants=limit,
        tracing=False,
        log_lifecycle=False,
    )
    monitor = handler.__ws_monitoring__  # type: ignore[attr-defined]
    async with async_server(handler, monitoring={}, ping_interval=None) as srv:
        flood = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.helpers.flood", str(srv.port), str(count), "16",
            cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await flood.communicate()
        assert flood.returncode == 0, out
        samples = await settled(scrape_metrics, count)
    tenants = tenants_of(samples)
    # Each tenant is seen once: the free half of max_tenants, then __other__.
    admitted = limit // 2
    assert len(tenants) == admitted + 1
    assert tenants.pop("__other__") == count - admitted
    assert set(tenants.values()) == {1}
    assert monitor.tenants.folded == count - admitted
    assert routes_of(samples) == {"/flood/{id}": count}
    labelled = {dict(ls).get("tenant") for _, ls in samples.values} - {None}
    assert len(labelled) == admitted + 1
    # Per (route, tenant): the same families as per route without tenants (see above).
    config = Config()
    per_series = 3 + 4
    per_series += len(config.connection_duration_buckets) + 3
    per_series += 2 * (len(config.size_buckets) + 3)
    per_series += len(config.duration_buckets) + 3 + len(config.rtt_buckets) + 3
    ours = [name for name, _ in samples.values if name.startswith("websocket_")]
    assert len(ours) == (admitted + 1) * per_series + len(config.handshake_buckets) + 3


def test_tenant_options_are_validated() -> None:
    with pytest.raises(ValueError, match="tenants= needs tenant="):
        Config(tenants=["acme"])
    with pytest.raises(ValueError, match="not a single string"):
        Config(tenant=by_header, tenants="acme")
    with pytest.raises(ValueError, match="reserved"):
        Config(tenant=by_header, tenants=["__other__"])
    with pytest.raises(ValueError, match="reserved"):
        Config(tenant=by_header, tenants=["x" * 65])
    with pytest.raises(ValueError, match="max_tenants must be at least 1"):
        Config(tenant=by_header, max_tenants=0)
    # A wrong type is a TypeError, as for every option (tests/test_config.py).
    with pytest.raises(TypeError, match=r"^tenant: expected a function or None"):
        Config(tenant="X-Tenant")  # type: ignore[arg-type]
    assert Config(tenant=by_header, tenants=("a", "b")).tenants == frozenset({"a", "b"})


def test_tenant_mapper_edge_cases(caplog: pytest.LogCaptureFixture) -> None:
    from websockets.datastructures import Headers

    from ws_monitoring.labels import NO_TENANT, OTHER_TENANT, TenantMapper
    from ws_monitoring.privacy import Privacy

    names: list[object] = []

    def tenant_of(request: Request) -> str | None:
        name = names.pop()
        if name == "boom":
            raise RuntimeError("bug in the user's function")
        return name  # type: ignore[return-value]

    def tenant(name: object) -> str:
        names.append(name)
        return tenants(Request("/chat", Headers()))

    config = Config(tenant=tenant_of, max_tenants=4, pseudonym_key=b"k" * 32)
    tenants = TenantMapper(config, Privacy(config))
    assert tenants(None) == NO_TENANT
    assert [tenant(name) for name in (None, 42, "")] == [NO_TENANT] * 3
    with caplog.at_level("WARNING", logger="ws_monitoring"):
        assert [tenant("boom") for _ in range(3)] == [NO_TENANT] * 3
    assert [r.getMessage() for r in caplog.records] == [
        "tenant function raised RuntimeError: tenant unknown"
    ]
    # A client cannot pose as a fixed value, nor send a name that cleans to nothing.
    assert tenant("__none__") == OTHER_TENANT
    assert tenant("\x1b\x07") == OTHER_TENANT
    # Names are scrubbed (an email becomes its pseudonym), cleaned and capped.
    email = tenant("ops@example.com")
    assert email.startswith("user:")
    assert "example" not in email
    assert tenant("\x1b[1macme" + "x" * 100) == "[1macme" + "x" * 56 + "…"
    # Full (4, the free half filled by the two above): others are __other__.
    assert tenant("acme") == OTHER_TENANT
    assert [tenant("acme") for _ in range(2)] == [OTHER_TENANT, "acme"]
    assert tenants.folded == 2  # the first two sightings of acme (refusals are not folds)
    with pytest.raises(ValueError, match=r"needs config\.tenant"):
        TenantMapper(Config(), Privacy(Config()))
