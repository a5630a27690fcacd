"""The metrics table, exactly as Prometheus scrapes it: names, types, labels, values."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.http11 import Request, Response

import ws_monitoring
from tests.helpers.scrape import OPENMETRICS, Samples, fetch, scrape
from tests.helpers.servers import async_server, async_wait_until, settled
from tests.helpers.system import require_binary
from ws_monitoring.adapters.instrument import build_monitor
from ws_monitoring.config import Config
from ws_monitoring.core import ConnectionRecord, HandshakeRecord
from ws_monitoring.metrics import MetricsSink
from ws_monitoring.typing import Data

TABLE = {
    "websocket_connections_active": "gauge",
    "websocket_connections": "counter",
    "websocket_connection_duration_seconds": "histogram",
    "websocket_disconnections": "counter",
    "websocket_handshake_failures": "counter",
    "websocket_handshake_duration_seconds": "histogram",
    "websocket_messages": "counter",
    "websocket_message_size_bytes": "histogram",
    "websocket_message_duration_seconds": "histogram",
    "websocket_errors": "counter",
    "websocket_ping_rtt_seconds": "histogram",
}

LABELS = {
    "websocket_connections_active_": {"route"},
    "websocket_connections_total": {"route"},
    "websocket_connection_duration_seconds_count": {"route"},
    "websocket_disconnections_total": {"route", "code"},
    "websocket_handshake_failures_total": {"status"},
    "websocket_handshake_duration_seconds_count": set(),
    "websocket_messages_total": {"route", "direction", "type"},
    "websocket_message_size_bytes_count": {"route", "direction"},
    "websocket_message_duration_seconds_count": {"route"},
    "websocket_errors_total": {"route", "type"},
    "websocket_ping_rtt_seconds_count": {"route"},
}


def families(text: str, prefix: str = "websocket_") -> dict[str, str]:
    return {
        f.name: f.type for f in text_string_to_metric_families(text) if f.name.startswith(prefix)
    }


async def app(ws: ServerConnection) -> None:
    async for message in ws:
        if message == "crash":
            raise RuntimeError("handler bug")
        await ws.send(message)


def reject_private(connection: ServerConnection, request: Request) -> Response | None:
    return connection.respond(401, "no\n") if request.path == "/private" else None


async def test_the_metrics_table(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    options = {"registry": registry, "routes": ["/chat/{room}"]}
    async with async_server(app, monitoring=options, process_request=reject_private) as srv:
        async with connect(srv.url("/chat/1?token=s")) as client:
            await client.send("a" * 100)  # 100 bytes: in the 256 bucket
            assert await client.recv() == "a" * 100
            await client.send(b"\x00" * 10)
            assert await client.recv() == b"\x00" * 10
        async with connect(srv.url("/chat/2")) as client:
            await client.send("crash")
            with pytest.raises(ConnectionClosedError):
                await client.recv()
        with pytest.raises(InvalidStatus):
            await connect(srv.url("/private"))
        samples = await settled(scrape_metrics, 2, handshakes=3)

    assert families(samples.text) == TABLE
    for name, labels in LABELS.items():
        for series in samples.series(name):
            assert set(series) == labels, name
    r = {"route": "/chat/{room}"}

    def get(name: str, **labels: str) -> float:
        return samples[name, {**r, **labels}]

    assert get("websocket_connections_active") == 0
    assert get("websocket_connections_total") == 2
    assert get("websocket_connection_duration_seconds_count") == 2
    assert get("websocket_disconnections_total", code="1000") == 1
    assert get("websocket_disconnections_total", code="1011") == 1
    assert samples["websocket_handshake_failures_total", {"status": "401"}] == 1
    assert samples["websocket_handshake_duration_seconds_count"] == 3
    assert get("websocket_messages_total", direction="received", type="text") == 2
    assert get("websocket_messages_total", direction="received", type="binary") == 1
    assert get("websocket_messages_total", direction="sent", type="text") == 1
    assert get("websocket_messages_total", direction="sent", type="binary") == 1
    assert get("websocket_message_size_bytes_count", direction="received") == 3
    assert get("websocket_message_size_bytes_sum", direction="received") == 100 + 10 + 5
    assert get("websocket_message_size_bytes_bucket", direction="received", le="64.0") == 2
    assert get("websocket_message_size_bytes_bucket", direction="received", le="256.0") == 3
    assert get("websocket_message_size_bytes_sum", direction="sent") == 110
    assert get("websocket_message_duration_seconds_count") == 3
    assert get("websocket_errors_total", type="handler_exception") == 1
    assert samples.series("websocket_errors_total") == [{**r, "type": "handler_exception"}]
    assert get("websocket_ping_rtt_seconds_count") == 0
    assert "token" not in samples.text


async def test_live_connections_are_in_the_scrape(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    async with async_server(app, monitoring={"registry": registry}) as srv:
        async with connect(srv.url("/live")) as client:
            await client.send("x")
            assert await client.recv() == "x"
            samples = scrape_metrics()
            labels = {"route": "/live", "direction": "received", "type": "text"}
            assert samples["websocket_messages_total", labels] == 1
            assert samples["websocket_connections_active", {"route": "/live"}] == 1
            assert samples.series("websocket_disconnections_total") == []
        samples = await settled(scrape_metrics, 1)
    assert samples["websocket_messages_total", labels] == 1


async def test_namespace_prefixes_every_metric(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    async with async_server(app, monitoring={"registry": registry, "namespace": "chat"}) as srv:
        async with connect(srv.url("/")) as client:
            await client.send("x")
            await client.recv()
        samples = await settled(scrape_metrics, 1, prefix="chat")
    assert families(samples.text, "chat_") == {
        name.replace("websocket_", "chat_", 1): kind for name, kind in TABLE.items()
    }
    assert families(samples.text) == {}


async def test_servers_sharing_a_registry_share_series(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    async with (
        async_server(app, monitoring={"registry": registry}) as one,
        async_server(app, monitoring={"registry": registry}) as two,
        async_server(app, monitoring={"registry": registry, "namespace": "other"}) as three,
    ):
        for srv in (one, two, three):
            async with connect(srv.url("/same")):
                pass
        await settled(scrape_metrics, 2)
        samples = await settled(scrape_metrics, 1, prefix="other")
    assert samples["websocket_connections_total", {"route": "/same"}] == 2
    assert samples["other_connections_total", {"route": "/same"}] == 1


async def test_tenants_in_the_snapshot_and_its_totals(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    options = {
        "registry": registry,
        "tenant": lambda request: request.headers.get("X-Tenant"),
        "tenants": ["acme", "globex"],
    }
    handler = ws_monitoring.instrument(app, **options)
    sink = next(s for s in handler.__ws_monitoring__.sinks if isinstance(s, MetricsSink))  # type: ignore[attr-defined]
    async with async_server(handler, monitoring={}) as srv:
        for tenant in ("acme", "globex", "acme"):
            async with connect(srv.url("/t"), additional_headers={"X-Tenant": tenant}) as client:
                await client.send("x")
                assert await client.recv() == "x"
        await settled(scrape_metrics, 3)
        async with connect(srv.url("/t"), additional_headers={"X-Tenant": "acme"}) as client:
            await client.send("live")
            assert await client.recv() == "live"
            samples = scrape_metrics()
            snap = sink.snapshot()
    # The snapshot's own fields are the totals over tenants (what they were without).
    assert snap.opened == {"/t": 4}
    assert snap.active == {"/t": 1}
    assert snap.routes["/t"].in_text == 4
    assert snap.disconnections == {("/t", "1000"): 3}
    assert snap.tenants is not None
    assert {t: part.opened for t, part in snap.tenants.items()} == {
        "acme": {"/t": 3},
        "globex": {"/t": 1},
    }
    assert snap.tenants["acme"].active == {"/t": 1}
    assert snap.tenants["globex"].routes["/t"].in_text == 1
    assert samples["websocket_connections_active", {"route": "/t", "tenant": "acme"}] == 1
    assert samples["websocket_connections_total", {"route": "/t", "tenant": "globex"}] == 1
    # Without a tenant function there is no tenant anywhere.
    plain = MetricsSink(Config(registry=CollectorRegistry()))
    assert plain.snapshot().tenants is None


def test_a_namespace_cannot_mix_tenant_labels() -> None:
    registry = CollectorRegistry()
    build_monitor(Config(registry=registry))
    with pytest.raises(ValueError, match="already registered without a tenant label"):
        build_monitor(Config(registry=registry, tenant=lambda request: "t"))
    build_monitor(Config(registry=registry, namespace="tenanted", tenant=lambda request: "t"))
    with pytest.raises(ValueError, match="already registered with a tenant label"):
        build_monitor(Config(registry=registry, namespace="tenanted"))


def test_a_namespace_cannot_change_buckets() -> None:
    registry = CollectorRegistry()
    build_monitor(Config(registry=registry))
    with pytest.raises(ValueError, match="already registered with other buckets"):
        build_monitor(Config(registry=registry, size_buckets=(1.0,)))
    # Another namespace may use other buckets.
    build_monitor(Config(registry=registry, namespace="small", size_buckets=(1.0,)))


async def test_custom_buckets_are_exposed(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    options = {
        "registry": registry,
        "size_buckets": (8, 512),
        "duration_buckets": (30,),
        "connection_duration_buckets": (3600,),
        "handshake_buckets": (30,),
        "rtt_buckets": (30,),
    }
    async with async_server(app, monitoring=options) as srv:
        async with connect(srv.url("/b")) as client:
            await client.send("0123456789")
            await client.recv()
        samples = await settled(scrape_metrics, 1)
    size = {"route": "/b", "direction": "received"}
    assert [
        samples["websocket_message_size_bytes_bucket", {**size, "le": le}]
        for le in ("8.0", "512.0", "+Inf")
    ] == [0, 1, 1]
    assert samples["websocket_message_duration_seconds_bucket", {"route": "/b", "le": "30.0"}] == 1
    assert samples["websocket_handshake_duration_seconds_bucket", {"le": "30.0"}] == 1
    assert samples.series("websocket_ping_rtt_seconds_bucket") == [
        {"route": "/b", "le": "30.0"},
        {"route": "/b", "le": "+Inf"},
    ]


async def test_metrics_off_exposes_nothing(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    handler = ws_monitoring.instrument(app, registry=registry, metrics=False)
    assert not any(
        isinstance(s, MetricsSink)
        for s in handler.__ws_monitoring__.sinks  # type: ignore[attr-defined]
    )
    async with async_server(handler, monitoring={}) as srv, connect(srv.url("/")) as client:
        await client.send("x")
        assert await client.recv() == "x"
    assert families(scrape_metrics().text) == {}


async def test_ping_rtt_is_measured(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    options = {"registry": registry}
    async with async_server(app, monitoring=options, ping_interval=0.02) as srv:
        async with connect(srv.url("/ping"), ping_interval=None):
            # The connection is live: its keepalive round trips are already in the scrape.
            await async_wait_until(
                lambda: scrape_metrics().get("websocket_ping_rtt_seconds_count", route="/ping"),
                what="a keepalive round trip",
            )
        samples = await settled(scrape_metrics, 1)
    assert samples["websocket_ping_rtt_seconds_count", {"route": "/ping"}] >= 1
    assert samples["websocket_ping_rtt_seconds_sum", {"route": "/ping"}] > 0


async def test_scrape_passes_promtool(
    registry: CollectorRegistry, scrape_metrics: Callable[[], Samples]
) -> None:
    promtool = require_binary("promtool", "prometheus")
    # Every family with samples: messages, an error, a rejected handshake.
    options = {"registry": registry}
    async with async_server(app, monitoring=options, process_request=reject_private) as srv:
        async with connect(srv.url("/p")) as client:
            await client.send("x")
            await client.recv()
            await client.send("crash")
        with pytest.raises(InvalidStatus):
            await connect(srv.url("/private"))
        samples = await settled(scrape_metrics, 1, handshakes=2)
    assert samples.series("websocket_errors_total")
    assert samples.series("websocket_handshake_failures_total")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=samples.text.encode(), capture_output=True
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode() + result.stderr.decode() == ""


class TraceSink:
    """A MessageSink that, like a tracing sink keeping a span, asks for an exemplar."""

    def handshake_finished(self, handshake: HandshakeRecord) -> None: ...
    def connection_opened(self, connection: ConnectionRecord) -> None: ...
    def handler_failed(self, connection: ConnectionRecord, exc: BaseException) -> None: ...
    def connection_closed(self, connection: ConnectionRecord) -> None: ...
    def shutdown(self, timeout: float) -> None: ...

    def message_started(self, connection: ConnectionRecord, message: Data) -> object:
        if message == "traced":
            connection.exemplar_trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        return None

    def message_finished(self, connection: ConnectionRecord, token: object, duration: float,
                         error: BaseException | None) -> None: ...  # fmt: skip
    def message_sent(self, connection: ConnectionRecord, binary: bool, size: int) -> None: ...


async def test_exemplars_in_openmetrics_only(
    registry: CollectorRegistry, metrics_server: Any, scrape_metrics: Callable[[], Samples]
) -> None:
    options: dict[str, Any] = {
        "registry": registry,
        "sinks": [TraceSink()],
        "duration_buckets": (60.0,),
    }
    async with async_server(app, monitoring=options) as srv:
        async with connect(srv.url("/ex")) as client:
            for text in ("plain", "traced", "plain"):
                await client.send(text)
                await client.recv()
        await settled(scrape_metrics, 1)
    status, content_type, body = await asyncio.to_thread(
        fetch, metrics_server.url, accept=OPENMETRICS
    )
    assert status == 200
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    [duration] = [
        f for f in openmetrics_families(body) if f.name == "websocket_message_duration_seconds"
    ]
    exemplars = {s.labels["le"]: s.exemplar for s in duration.samples if s.name.endswith("_bucket")}
    assert exemplars["+Inf"] is None
    exemplar = exemplars["60.0"]
    assert exemplar is not None
    assert exemplar.labels == {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}
    assert 0 <= exemplar.value < 60
    # The Prometheus text format has no exemplars.
    assert "4bf92f35" not in scrape(metrics_server.url).text
