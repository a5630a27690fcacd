"""The live page's data: /live.json against a driven scenario, auth, off switch, bounds."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_fd_to_metric_families
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response

from tests.helpers.otlp import OtlpHttpReceiver
from tests.helpers.scrape import OPENMETRICS, Samples, fetch, scrape
from tests.helpers.servers import async_server, wait_until
from tests.helpers.system import free_port
from tests.metrics.test_multiprocess import Worker
from ws_monitoring import MetricsServer, start_metrics_server
from ws_monitoring.metrics import live as live_module


def live_json(server: MetricsServer, url: str | None = None, **kwargs: Any) -> dict[str, Any]:
    assert server.live_url is not None
    status, content_type, body = fetch(url or server.live_url + ".json", **kwargs)
    assert (status, content_type) == (200, "application/json"), body
    return json.loads(body)  # type: ignore[no-any-return]


def next_sample(server: MetricsServer, samples: int) -> dict[str, Any]:
    """/live.json once it holds ``samples`` samples (one is taken per INTERVAL at most)."""

    def check() -> dict[str, Any] | None:
        doc = live_json(server)
        return doc if len(doc["history"]["t"]) == samples else None

    return wait_until(check, what=f"{samples} samples")


def histogram_quantile(q: float, samples: Samples, name: str, **labels: str) -> float:
    """PromQL's histogram_quantile over the cumulative buckets of one scraped series."""
    buckets = sorted(
        (float(series["le"]), samples[name, series])
        for series in samples.series(name)
        if {k: v for k, v in series.items() if k != "le"} == labels
    )
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    raise AssertionError("unreachable")


def quiet(server: MetricsServer, open_: int, closed: int, handshakes: int) -> Samples | None:
    """A scrape once the scenario is over: so many connections open, closed, handshakes."""
    samples = scrape(server.url)
    done = (
        samples.total("websocket_connections_active") == open_
        and samples.total("websocket_disconnections_total") == closed
        and samples.total("websocket_handshake_duration_seconds_count") == handshakes
    )
    return samples if done else None


async def app(websocket: ServerConnection) -> None:
    async for message in websocket:
        if message == "boom":
            raise ValueError("secret payload 4111-1111")
        await websocket.send(message)


def forbid(connection: ServerConnection, request: Request) -> Response | None:
    if request.path == "/forbidden":
        return connection.respond(403, "no\n")
    return None


async def test_live_json_describes_a_driven_scenario(
    registry: CollectorRegistry, metrics_server: MetricsServer
) -> None:
    before = await asyncio.to_thread(live_json, metrics_server)
    assert before["totals"] == {
        "connections": 0, "opened": 0, "closed": 0, "messages_in": 0, "messages_out": 0,
        "bytes_in": 0, "bytes_out": 0, "errors": {}, "close_codes": {}, "handshake_failures": {},
    }  # fmt: skip
    options = {"registry": registry, "routes": ["/chat/{room}", "/echo"], "tracing": False}
    async with async_server(app, monitoring=options, process_request=forbid) as srv:
        held = [await connect(srv.url("/chat/a")), await connect(srv.url("/chat/b"))]
        for client in held:
            await client.send("zq")
            assert await client.recv() == "zq"
        async with connect(srv.url("/echo?user=alice")) as client:
            for message in ("one", "three", b"\x00" * 10):
                await client.send(message)
                await client.recv()
        crashing = await connect(srv.url("/chat/c"))
        await crashing.send("boom")
        with pytest.raises(ConnectionClosed):
            await crashing.recv()
        with pytest.raises(InvalidStatus):
            await connect(srv.url("/forbidden"))
        samples = await asyncio.to_thread(wait_until, lambda: quiet(metrics_server, 2, 2, 5))
        doc = await asyncio.to_thread(next_sample, metrics_server, 2)
        for client in held:
            await client.close()

    assert doc["version"] == 1
    assert doc["namespace"] == "websocket"
    assert doc["multiprocess"] is False
    assert doc["metrics_path"] == "/metrics"
    assert doc["unavailable"] == {
        "slowest": "tracing is off",
        "logging": "no log metrics in this registry",
    }
    assert doc["totals"] == {
        "connections": 2, "opened": 4, "closed": 2, "messages_in": 6, "messages_out": 5,
        "bytes_in": 2 + 2 + 3 + 5 + 10 + 4, "bytes_out": 2 + 2 + 3 + 5 + 10,
        "errors": {"handler_exception": 1},
        "close_codes": {"1000": 1, "1011": 1},
        "handshake_failures": {"403": 1},
    }  # fmt: skip
    duration = "websocket_message_duration_seconds_bucket"
    latency = {
        route: {
            f"p{round(q * 100)}": histogram_quantile(q, samples, duration, route=route)
            for q in (0.5, 0.95, 0.99)
        }
        for route in ("/chat/{room}", "/echo")
    }
    assert doc["routes"] == {
        "/chat/{room}": {
            "connections": 2, "opened": 3, "closed": 1, "messages_in": 3, "messages_out": 2,
            "bytes_in": 8, "bytes_out": 4, **latency["/chat/{room}"],
        },
        "/echo": {
            "connections": 0, "opened": 1, "closed": 1, "messages_in": 3, "messages_out": 3,
            "bytes_in": 18, "bytes_out": 18, **latency["/echo"],
        },
    }  # fmt: skip
    history = doc["history"]
    assert len(history["t"]) == 2
    assert history["dt"][0] is None
    assert history["dt"][1] >= live_module.INTERVAL * 0.95
    assert {key: history[key] for key in history if key not in ("t", "dt", "latency")} == {
        "opened": [None, 4], "closed": [None, 2], "messages_in": [None, 6],
        "messages_out": [None, 5], "bytes_in": [None, 26], "bytes_out": [None, 22],
        "errors": {"handler_exception": [None, 1]},
        "close_codes": {"1000": [None, 1], "1011": [None, 1]},
        "handshake_failures": {"403": [None, 1]},
        "connections": {"/chat/{room}": [0, 2], "/echo": [0, 0]},
    }  # fmt: skip
    assert history["latency"] == {
        route: {key: [None, value] for key, value in quantiles.items()}
        for route, quantiles in latency.items()
    }
    assert doc["partial"] is False
    # A page that polls asks for what it does not have: the second sample alone.
    since = history["t"][0]
    newer = await asyncio.to_thread(
        live_json, metrics_server, url=f"{metrics_server.live_url}.json?since={since!r}"
    )
    assert newer["partial"] is True
    assert newer["history"]["t"] == history["t"][1:]
    assert newer["history"]["opened"] == [4]
    assert newer["history"]["dt"] == history["dt"][1:]
    assert newer["history"]["latency"] == {
        route: {key: [value] for key, value in quantiles.items()}
        for route, quantiles in latency.items()
    }
    assert {k: v for k, v in newer.items() if k not in ("history", "partial")} == {
        k: v for k, v in doc.items() if k not in ("history", "partial")
    }
    # A time it does not know (or garbage): the whole history.
    for query in ("?since=12.5", "?since=x"):
        whole = await asyncio.to_thread(
            live_json, metrics_server, url=f"{metrics_server.live_url}.json{query}"
        )
        assert (whole["partial"], whole["history"]) == (False, history)
    [crash] = doc["crashes"]
    assert crash.pop("time") == pytest.approx(doc["time"], abs=30)
    assert crash == {"route": "/chat/{room}", "error_type": "ValueError", "close_code": 1011}
    assert doc["sinks"] == {
        "metrics_server": [
            {"metric": "ws_monitoring_metrics_server_dropped_total", "labels": {"reason": r},
             "value": 0}
            for r in ("deadline", "disconnected", "error", "evicted", "limit", "tls")
        ]
    }  # fmt: skip
    assert doc["slowest"] is None
    # Nothing a client sent beyond what routes make of paths: no payload, query, message.
    text = json.dumps(doc)
    for secret in ("secret", "4111", "alice", "/chat/a", "zq"):
        assert secret not in text


def test_the_page_and_its_data(metrics_server: MetricsServer) -> None:
    base = metrics_server.url.removesuffix("/metrics")
    for path in ("/", "/live"):
        status, content_type, body = fetch(base + path)
        assert (status, content_type) == (200, "text/html; charset=utf-8")
        assert "<title>ws-monitoring · live</title>" in body
        assert 'fetch("live.json"' in body
    assert metrics_server.live_url == base + "/live"


def test_live_page_off(registry: CollectorRegistry) -> None:
    with start_metrics_server(0, "127.0.0.1", registry=registry, live_page=False) as server:
        base = server.url.removesuffix("/metrics")
        for path in ("/", "/live", "/live.json"):
            assert fetch(base + path)[0] == 404
        assert server.live_url is None
        assert fetch(server.url)[0] == 200


def test_the_page_needs_the_credentials_metrics_needs(registry: CollectorRegistry) -> None:
    with start_metrics_server(0, "127.0.0.1", registry=registry, bearer_token="t0k3n") as server:
        base = server.url.removesuffix("/metrics")
        for path in ("/", "/live", "/live.json"):
            status, _, body = fetch(base + path)
            assert (status, body) == (401, "Unauthorized\n")
            assert fetch(base + path, headers={"Authorization": "Bearer t0k3n"})[0] == 200


def test_the_browser_is_asked_for_basic_credentials(registry: CollectorRegistry) -> None:
    with start_metrics_server(
        0, "127.0.0.1", registry=registry, username="ops", password="pw"
    ) as server:
        assert server.live_url is not None
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(server.live_url, timeout=10)
        assert caught.value.code == 401
        assert caught.value.headers["WWW-Authenticate"] == 'Basic realm="metrics"'
        caught.value.close()
        token = base64.b64encode(b"ops:pw").decode()
        assert fetch(server.live_url, headers={"Authorization": f"Basic {token}"})[0] == 200


async def test_the_last_20_crashes_newest_first(
    registry: CollectorRegistry, metrics_server: MetricsServer
) -> None:
    options = {"registry": registry, "tracing": False, "log_lifecycle": False}
    async with async_server(app, monitoring=options) as srv:
        for n in range(25):
            # A letter per route: the default grouping keeps words (a number is {id}).
            async with connect(srv.url(f"/crash/{chr(97 + n)}")) as client:
                await client.send("boom")
                with pytest.raises(ConnectionClosed):
                    await client.recv()
        await asyncio.to_thread(wait_until, lambda: quiet(metrics_server, 0, 25, 25))
        doc = await asyncio.to_thread(live_json, metrics_server)
    routes = [crash["route"] for crash in doc["crashes"]]
    assert routes == [f"/crash/{chr(97 + n)}" for n in reversed(range(5, 25))]
    assert [crash["time"] for crash in doc["crashes"]] == sorted(
        (crash["time"] for crash in doc["crashes"]), reverse=True
    )
    assert doc["totals"]["errors"] == {"handler_exception": 25}


def test_history_is_a_bounded_ring(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live_module, "INTERVAL", 0.0)
    monkeypatch.setattr(live_module, "HISTORY", 5)
    with start_metrics_server(0, "127.0.0.1", registry=registry) as server:
        times = [live_json(server)["time"] for _ in range(12)]
        doc = live_json(server)
    assert len(doc["history"]["t"]) == 5
    assert doc["history"]["t"][:4] == times[-4:]


def test_samples_from_before_a_gap_are_dropped(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live_module, "INTERVAL", 0.0)
    monkeypatch.setattr(live_module, "MAX_AGE", 0.2)
    with start_metrics_server(0, "127.0.0.1", registry=registry) as server:
        for _ in range(3):
            live_json(server)
        start = time.monotonic()
        wait_until(lambda: time.monotonic() - start > 0.3, what="a gap")
        doc = live_json(server)
    assert len(doc["history"]["t"]) == 1
    assert doc["history"]["dt"] == [None]


# -- tracing: the slowest recent message ------------------------------------------------------


@pytest.fixture
def fresh_provider() -> Iterator[None]:
    """OpenTelemetry's global provider is set-once: reset it around the test."""
    from opentelemetry import trace
    from opentelemetry.util._once import Once

    def reset() -> None:
        trace._TRACER_PROVIDER_SET_ONCE = Once()
        trace._TRACER_PROVIDER = None

    reset()
    yield
    reset()


async def slow_echo(websocket: ServerConnection) -> None:
    async for message in websocket:
        if message == "slow":
            await asyncio.sleep(0.05)
        await websocket.send(message)


@pytest.mark.usefixtures("fresh_provider")
async def test_the_slowest_traced_message(
    registry: CollectorRegistry, metrics_server: MetricsServer
) -> None:
    from ws_monitoring.tracing.setup import setup_tracing

    receiver = OtlpHttpReceiver()
    handle = setup_tracing(
        service_name="live-test", endpoint=receiver.url, sample_ratio=1.0, schedule_delay=0.02
    )
    try:
        async with async_server(slow_echo, monitoring={"registry": registry}) as srv:
            async with connect(srv.url("/chat")) as client:
                for message in ("fast", "slow", "fast"):
                    await client.send(message)
                    await client.recv()
            spans = await asyncio.to_thread(
                receiver.wait, lambda s: sum(x.name == "process /chat" for x in s) == 3
            )
            _, _, body = await asyncio.to_thread(fetch, metrics_server.url, accept=OPENMETRICS)
            doc = await asyncio.to_thread(live_json, metrics_server)
    finally:
        handle.shutdown(timeout=2)
        receiver.close()
    slowest = max((s for s in spans if s.name == "process /chat"), key=lambda s: s.end - s.start)
    exemplars = {
        sample.exemplar.labels["trace_id"]: sample.exemplar
        for family in text_fd_to_metric_families(io.StringIO(body))
        for sample in family.samples
        if sample.exemplar is not None
    }
    exemplar = exemplars[slowest.trace_id]
    assert "slowest" not in doc["unavailable"]
    assert doc["slowest"] == {
        "trace_id": slowest.trace_id,
        "seconds": exemplar.value,
        "route": "/chat",
        "time": pytest.approx(float(exemplar.timestamp), abs=1e-6),
    }
    assert doc["slowest"]["seconds"] >= 0.05
    tracing = {s["metric"] for s in doc["sinks"]["tracing"]}
    assert {"ws_monitoring_spans_exported_total", "ws_monitoring_spans_dropped_total"} <= tracing


# -- multiprocess mode ---------------------------------------------------------------------------


async def test_live_json_in_multiprocess_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    port = free_port()
    workers = [Worker(port, directory), Worker(port, directory)]
    try:
        with start_metrics_server(0, "127.0.0.1") as metrics:
            await asyncio.to_thread(live_json, metrics)
            for _ in range(10):
                async with connect(f"ws://127.0.0.1:{port}/chat") as client:
                    await client.send("ping")
                    await client.recv()
            held = [await connect(f"ws://127.0.0.1:{port}/room") for _ in range(3)]

            def quiet_mp() -> Samples | None:
                samples = scrape(metrics.url)
                return (
                    samples
                    if samples.total("websocket_disconnections_total") == 10
                    and samples.total("websocket_connections_active") == 3
                    and samples.total("websocket_messages_total") == 20
                    else None
                )

            samples = await asyncio.to_thread(wait_until, quiet_mp)
            doc = await asyncio.to_thread(next_sample, metrics, 2)
            for client in held:
                await client.close()
    finally:
        for worker in workers:
            worker.stop()
    assert doc["multiprocess"] is True
    assert doc["unavailable"] == {
        "crashes": "multiprocess mode: each worker keeps its own (see its logs)",
        "slowest": "multiprocess mode: exemplars do not exist there",
        "logging": "no log metrics in this registry",
    }
    assert doc["totals"] == {
        "connections": 3, "opened": 13, "closed": 10, "messages_in": 10, "messages_out": 10,
        "bytes_in": 40, "bytes_out": 40, "errors": {}, "close_codes": {"1000": 10},
        "handshake_failures": {},
    }  # fmt: skip
    assert (
        doc["routes"]["/chat"]["opened"]
        == samples["websocket_connections_total", {"route": "/chat"}]
    )
    assert doc["routes"]["/room"]["connections"] == 3
    assert doc["history"]["opened"] == [None, 13]
    assert doc["crashes"] == []
    assert doc["slowest"] is None


def test_quantile_estimates_as_promql_does() -> None:
    inf = math.inf
    buckets = [(0.1, 2.0), (0.5, 6.0), (1.0, 8.0), (inf, 10.0)]
    assert live_module.quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * 3 / 4)
    assert live_module.quantile(0.1, buckets) == pytest.approx(0.05)
    # In +Inf: the last finite bound.
    assert live_module.quantile(0.99, buckets) == 1.0
    assert live_module.quantile(0.5, [(0.1, 0.0), (inf, 0.0)]) is None
    assert live_module.quantile(0.5, []) is None
    assert live_module.quantile(0.0, [(0.1, 0.0), (0.2, 0.0), (inf, 3.0)]) == 0.1


def test_a_broken_collector_gives_500(registry: CollectorRegistry) -> None:
    class Broken:
        def collect(self) -> Iterator[Metric]:
            raise RuntimeError("collector bug")

    registry.register(Broken())  # type: ignore[arg-type]
    with start_metrics_server(0, "127.0.0.1", registry=registry) as server:
        assert server.live_url is not None
        status, _, body = fetch(server.live_url + ".json")
        assert status == 500
        assert "collector bug" in body
        # The page itself still loads (and will say so), and the server survives.
        assert fetch(server.live_url)[0] == 200


async def test_routes_sum_their_tenants(
    registry: CollectorRegistry, metrics_server: MetricsServer
) -> None:
    options = {
        "registry": registry,
        "tracing": False,
        "tenant": lambda request: request.headers.get("X-Tenant"),
        "tenants": ["acme", "globex"],
    }
    await asyncio.to_thread(live_json, metrics_server)  # the first sample: before the traffic
    async with async_server(app, monitoring=options) as srv:
        for tenant in ("acme", "globex", "acme"):
            async with connect(srv.url("/echo"), additional_headers={"X-Tenant": tenant}) as c:
                await c.send("hi")
                await c.recv()
        samples = await asyncio.to_thread(wait_until, lambda: quiet(metrics_server, 0, 3, 3))
        doc = await asyncio.to_thread(next_sample, metrics_server, 2)
    assert {s["tenant"] for s in samples.series("websocket_connections_total")} == {
        "acme",
        "globex",
    }
    entry = doc["routes"]["/echo"]
    assert (entry["opened"], entry["closed"], entry["messages_in"]) == (3, 3, 3)
    # The quantiles of the route's histogram summed over its tenants, bucket by bucket.
    duration = "websocket_message_duration_seconds_bucket"
    merged = Samples("")
    for series in samples.series(duration):
        key = (duration, frozenset({"route": "/echo", "le": series["le"]}.items()))
        merged.values[key] = merged.values.get(key, 0.0) + samples[duration, series]
    assert entry["p50"] == histogram_quantile(0.5, merged, duration, route="/echo")
