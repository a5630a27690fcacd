"""The metrics server's own text writer against prometheus_client's, byte for byte.

During a scrape by ``start_metrics_server`` the metrics sink writes its families as text
itself (prometheus_client formats everything else); the result must be exactly what
prometheus_client writes for the same families, in every negotiated format.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode

from tests.helpers.scrape import OPENMETRICS, Samples, fetch, scrape
from tests.helpers.servers import async_server, echo, settled
from ws_monitoring import MetricsServer
from ws_monitoring.adapters.instrument import build_monitor
from ws_monitoring.config import Config
from ws_monitoring.core import ConnectionRecord
from ws_monitoring.metrics.exposition import Prerendered, direct_exposition_format, encode
from ws_monitoring.metrics.sink import MetricsSink, RouteTotals, Snapshot, _Histogram

#: Accept headers of Prometheus 2 and 3, prometheus_client's cases and odd ones.
ACCEPTS = [
    "",
    "*/*",
    "text/plain; version=0.0.4",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=underscores",
    "text/plain;version=1.0.0;escaping=dots",
    "text/plain;version=1.0.0;escaping=values",
    OPENMETRICS,
    "application/openmetrics-text",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text;version=1.0.0;escaping=dots",
    "application/openmetrics-text;version=1.0.0;escaping=values",
    "application/openmetrics-text;version=0.0.1",
    "application/openmetrics-text;version=2.0.0",
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;"
    "q=0.6,application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;"
    "escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
]

NASTY = ['a"b', "back\\slash", "new\nline", '\\"\n', "", "é ü 雪", "__overflow__", '{x="1"}']


def reference(registry: CollectorRegistry, accept: str) -> bytes:
    """What prometheus_client writes for ``registry`` (no direct writing: not a scrape)."""
    encoder, _ = choose_encoder(accept)
    body: bytes = encoder(registry)
    return body


def assert_same(registry: CollectorRegistry, accepts: list[str] = ACCEPTS) -> None:
    for accept in accepts:
        body, content_type = encode(registry, accept)
        assert content_type == choose_encoder(accept)[1]
        expected = reference(registry, accept)
        if body != expected:
            got, want = body.decode().splitlines(), expected.decode().splitlines()
            diff = next(((g, w) for g, w in zip(got, want, strict=False) if g != w), None)
            pytest.fail(f"Accept {accept!r}: first difference {diff} ({len(got)}/{len(want)})")


def fixed(sink: MetricsSink, snap: Snapshot, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``sink`` expose ``snap`` on every collection."""
    monkeypatch.setattr(sink, "snapshot", lambda: snap)


def histogram(n_bounds: int, counts: list[int], total: float) -> _Histogram:
    hist = _Histogram(n_bounds)
    hist.counts = [*counts, *hist.counts][: n_bounds + 1]
    hist.sum = total
    return hist


def route_totals(sink: MetricsSink, rng: random.Random, big: bool = False) -> RouteTotals:
    totals = RouteTotals(sink.layout.length)
    scale = 10**15 if big else 30

    def count() -> int:
        return rng.choice([0, 0, 1, rng.randrange(scale), 999_999, 1_000_000, 2**53 + 1])

    totals.in_text, totals.in_binary, totals.out_text, totals.out_binary = (
        count(),
        count(),
        count(),
        count(),
    )
    totals.in_bytes, totals.out_bytes = count(), count()
    totals.handling_sum = rng.choice([0.0, rng.random(), 1e-7, 1234567.891, 1e22])
    totals.rtt_sum = rng.choice([0.0, rng.random() * 1e6, 0.1 + 0.2])
    totals.h = [count() for _ in range(sink.layout.length)]
    return totals


def rich_snapshot(sink: MetricsSink, routes: list[str], seed: int = 0) -> Snapshot:
    rng = random.Random(seed)
    cfg = sink.config
    snap = Snapshot()
    snap.handshake_duration = histogram(
        len(cfg.handshake_buckets), [3, 0, 1, 10**7], rng.random() * 100
    )
    snap.handshake_failures = {"401": 2, "invalid_request": 10**6, "timeout": 1}
    for i, route in enumerate(routes):
        snap.opened[route] = rng.randrange(10**9)
        snap.active[route] = rng.randrange(100)
        snap.routes[route] = route_totals(sink, rng, big=i % 3 == 0)
        snap.conn_duration[route] = histogram(
            len(cfg.connection_duration_buckets), [1, 2, 0, 40], rng.random() * 1e5
        )
        snap.disconnections[route, "1000"] = rng.randrange(10**7)
        snap.disconnections[route, "4xxx"] = 1
        snap.errors[route, "handler_exception"] = rng.randrange(3)
        snap.errors[route, 'weird"type\\'] = 7
    return snap


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def sink(registry: CollectorRegistry) -> MetricsSink:
    sink = MetricsSink(Config(registry=registry))
    registry.register(sink)
    return sink


def test_no_connections(registry: CollectorRegistry, sink: MetricsSink) -> None:
    # Families without samples still get their HELP and TYPE lines.
    assert_same(registry)


def test_many_routes_with_nasty_label_values(
    registry: CollectorRegistry, sink: MetricsSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = [*NASTY, *(f"/rooms/{i}" for i in range(40)), "__unmatched__"]
    fixed(sink, rich_snapshot(sink, routes), monkeypatch)
    assert_same(registry)
    # A second scrape reuses the kept prefixes: still the same text.
    assert_same(registry, ACCEPTS[:2])


def test_tenant_label_with_nasty_values(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = MetricsSink(Config(registry=registry, tenant=lambda request: None))
    registry.register(sink)
    routes = [*NASTY, "/rooms/{id}", "__overflow__"]
    snap = rich_snapshot(sink, routes)
    snap.tenants = {
        tenant: rich_snapshot(sink, routes[i:], seed=i)
        for i, tenant in enumerate([*NASTY, "__none__", "__other__"])
    }
    fixed(sink, snap, monkeypatch)
    assert_same(registry)
    families = {f.name: f for f in text_string_to_metric_families(encode(registry, "")[0].decode())}
    active = families["websocket_connections_active"].samples
    assert {s.labels["tenant"] for s in active} == {*NASTY, "__none__", "__other__"}
    assert all(set(s.labels) == {"route", "tenant"} for s in active)
    errors = families["websocket_errors"].samples
    assert all(set(s.labels) == {"route", "tenant", "type"} for s in errors)
    assert all("tenant" not in s.labels for s in families["websocket_handshake_failures"].samples)


@pytest.mark.parametrize("seed", range(5))
def test_random_values(
    registry: CollectorRegistry, sink: MetricsSink, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    fixed(sink, rich_snapshot(sink, [f"/r{seed}/{i}" for i in range(10)], seed), monkeypatch)
    assert_same(registry, [*ACCEPTS[:2], OPENMETRICS])


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        math.inf,
        -math.inf,
        -0.0,
        -1.5,
        5e-324,
        1e-7,
        999_999,
        1_000_000,
        123_456_789,
        2**63,
        10**30,
        True,
        999_999.0,
        1e6,
        1.5e16,
    ],
)
def test_special_numbers(
    registry: CollectorRegistry, sink: MetricsSink, monkeypatch: pytest.MonkeyPatch, value: float
) -> None:
    snap = rich_snapshot(sink, ["/n"])
    totals = snap.routes["/n"]
    totals.in_text = totals.in_bytes = value  # type: ignore[assignment]
    totals.handling_sum = totals.rtt_sum = value
    totals.h[0] = totals.h[-1] = value  # type: ignore[call-overload]
    snap.active["/n"] = value  # type: ignore[assignment]
    fixed(sink, snap, monkeypatch)
    assert_same(registry, [*ACCEPTS[:1], OPENMETRICS])


@settings(max_examples=60, deadline=None)
@given(
    route=st.text(max_size=12),
    code=st.text(max_size=4),
    count=st.one_of(st.integers(0, 2**70), st.floats(allow_nan=True, allow_infinity=True)),
    total=st.floats(allow_nan=True, allow_infinity=True),
)
def test_any_label_value_and_number(route: str, code: str, count: float, total: float) -> None:
    registry = CollectorRegistry()
    sink = MetricsSink(Config(registry=registry))
    registry.register(sink)
    snap = rich_snapshot(sink, [route, route + "/x"])
    snap.disconnections[route, code] = count  # type: ignore[assignment]
    snap.routes[route].h[1] = count  # type: ignore[call-overload]
    snap.routes[route].handling_sum = total
    with pytest.MonkeyPatch.context() as monkeypatch:
        fixed(sink, snap, monkeypatch)
        assert_same(registry, ["", OPENMETRICS])


def test_exemplars_only_in_openmetrics(
    registry: CollectorRegistry, sink: MetricsSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = rich_snapshot(sink, ["/ex", '/q"uote'])
    exemplars = snap.routes["/ex"].exemplars = {
        0: ("4bf92f3577b34da6a3ce929d0e0e4736", 0.00004, 1700000000.123),
        3: ('odd"\\\nid', 0.0009, 1700000001.0),
        len(sink.config.duration_buckets): ("00f067aa0ba902b7", 42.0, 1700000002.5),
    }
    fixed(sink, snap, monkeypatch)
    assert_same(registry)
    del exemplars[3]  # escaped as prometheus_client does, which its parser cannot read
    body = encode(registry, OPENMETRICS)[0].decode()
    [duration] = [
        f for f in openmetrics_families(body) if f.name == "websocket_message_duration_seconds"
    ]
    exemplars = {
        s.labels["le"]: s.exemplar
        for s in duration.samples
        if s.name.endswith("_bucket") and s.labels["route"] == "/ex"
    }
    assert exemplars["+Inf"] is not None
    assert exemplars["+Inf"].labels == {"trace_id": "00f067aa0ba902b7"}
    assert exemplars["0.0001"] is not None
    assert exemplars["0.0001"].value == 0.00004
    assert "4bf92f35" not in encode(registry, "")[0].decode()


def test_negative_and_large_bucket_bounds(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prometheus_client drops _count and _sum of a histogram with a negative bound.
    config = Config(
        registry=registry,
        size_buckets=(1e6, 1048576, 1e300),
        duration_buckets=(-1.0, 0.0, 0.1 + 0.2),
        connection_duration_buckets=(-0.0, 1.0),
        handshake_buckets=(-5.0,),
        rtt_buckets=(5e-324, 1.0),
    )
    sink = MetricsSink(config)
    registry.register(sink)
    assert_same(registry)
    fixed(sink, rich_snapshot(sink, ["/b"]), monkeypatch)
    assert_same(registry)


def test_namespaces_and_other_collectors_keep_their_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = CollectorRegistry(target_info={"service": 'chat"1'})
    Counter("before", "Registered first.", ["x"], registry=registry).labels('a"\\\n').inc(1e6)
    one = MetricsSink(Config(registry=registry))
    registry.register(one)
    Gauge("between", 'Help with \\ and \n and ".', registry=registry).set(math.nan)

    class Custom:
        def collect(self) -> Iterator[Metric]:
            family = GaugeMetricFamily("custom", "A custom collector.", labels=["k"])
            family.add_metric(["v"], 2.5)
            yield family

    registry.register(Custom())
    two = MetricsSink(Config(registry=registry, namespace="chat"))
    registry.register(two)
    Histogram("after", "Registered last.", registry=registry).observe(0.3)
    fixed(one, rich_snapshot(one, ["/one"]), monkeypatch)
    fixed(two, rich_snapshot(two, ["/two", "/three"], seed=1), monkeypatch)
    # _created samples of prometheus_client's own metrics vary with nothing: same bytes.
    assert_same(registry)
    names = [f.name for f in text_string_to_metric_families(encode(registry, "")[0].decode())]
    assert names.index("before") < names.index("websocket_connections_active")
    assert names.index("websocket_ping_rtt_seconds") < names.index("between")
    assert names.index("custom") < names.index("chat_connections_active") < names.index("after")


def test_a_wrapping_collector_is_left_to_prometheus_client(
    registry: CollectorRegistry, sink: MetricsSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    class OnlyMessages:
        """Not a CollectorRegistry: it filters what the registry's collectors yield."""

        def collect(self) -> Iterator[Metric]:
            return (m for m in registry.collect() if m.name == "websocket_messages")

    fixed(sink, rich_snapshot(sink, ["/r"]), monkeypatch)
    for accept in ("", OPENMETRICS):
        body = encode(OnlyMessages(), accept)[0]
        assert body == choose_encoder(accept)[0](OnlyMessages())
        assert body.count(b"websocket_messages_total{") == 4


def test_collect_outside_a_scrape_gives_families(sink: MetricsSink) -> None:
    assert direct_exposition_format() is None
    families = list(sink.collect())
    assert families
    assert not any(isinstance(f, Prerendered) for f in families)


def test_scrapes_skip_prometheus_client_families(
    registry: CollectorRegistry, sink: MetricsSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_families(snap: Snapshot) -> list[Metric]:
        raise AssertionError("prometheus_client families built")

    monkeypatch.setattr(sink, "families", no_families)
    for accept in ("", OPENMETRICS, ACCEPTS[-1]):
        assert b"websocket_messages" in encode(registry, accept)[0]
    # Escapings that rewrite names are left to prometheus_client.
    with pytest.raises(AssertionError, match="families built"):
        encode(registry, "text/plain;version=1.0.0;escaping=dots")


def test_live_records_are_summed_by_columns() -> None:
    monitor = build_monitor(Config(registry=CollectorRegistry(), tracing=False))
    rng = random.Random(7)
    records = []
    for i in range(600):
        record = ConnectionRecord(monitor)
        if i % 7:  # the others never counted anything: no histogram list
            counter = monitor.frame_counter(record)
            counter.decode(Frame(Opcode.TEXT, b"x" * rng.randrange(300)))
            counter.encode(Frame(Opcode.BINARY, b"y" * rng.randrange(70_000)))
            record.add_duration(rng.random())
            record.add_rtt(rng.random() / 10)
        if i % 100 == 0:
            record.exemplars = {i % 3: (f"trace{i}", 0.1, 1.0)}
        records.append(record)
    length = monitor.layout.length
    one_by_one, at_once = RouteTotals(length), RouteTotals(length)
    for record in records:
        one_by_one.add(record)
    at_once.add_all(records)
    assert at_once.in_text == 600 - 86
    for name in RouteTotals.__slots__:
        if name.endswith("_sum"):  # float sums, maybe added in another order
            assert getattr(at_once, name) == pytest.approx(getattr(one_by_one, name)), name
        else:
            assert getattr(at_once, name) == getattr(one_by_one, name), name


# -- over HTTP, with real connections ---------------------------------------------------------


async def test_a_real_scrape_is_what_prometheus_client_writes(
    registry: CollectorRegistry, metrics_server: MetricsServer
) -> None:
    nasty = {"/q": 'quote"d', "/b": "back\\slash", "/n": "new\nline"}
    # Three routes fill the free half of the table; /overflow is seen once: folded.
    options = {"registry": registry, "routes": lambda p: nasty.get(p, p), "max_routes": 6}
    async with async_server(echo, monitoring=options) as srv:
        for path in ("/q", "/b", "/n", "/overflow"):
            async with connect(srv.url(path)) as client:
                await client.send("x" * 100)
                await client.recv()
                await client.send(b"\x00" * 70_000)
                await client.recv()
        # Nothing changes between the scrape and the reference below.
        await settled(lambda: scrape(metrics_server.url), 4)
        async with connect(srv.url("/q")) as client:
            await client.send("live")
            await client.recv()
            status, _, body = await asyncio.to_thread(fetch, metrics_server.url)
            assert status == 200
            assert body.encode() == reference(registry, "")
            status, _, body = await asyncio.to_thread(fetch, metrics_server.url, accept=OPENMETRICS)
            assert body.encode() == reference(registry, OPENMETRICS)
        samples = await settled(lambda: scrape(metrics_server.url), 5)
    assert samples["websocket_connections_total", {"route": "__overflow__"}] == 1
    assert samples["websocket_connections_total", {"route": 'quote"d'}] == 2
    # Control characters never reach a label (labels.clean_label).
    assert samples["websocket_connections_total", {"route": "newline"}] == 1
    assert Samples(reference(registry, "").decode()).values == samples.values
