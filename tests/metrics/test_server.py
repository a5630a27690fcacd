"""The metrics HTTP server: formats, paths, ports, slow clients, limits, auth and TLS."""

from __future__ import annotations

import base64
import logging
import select
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.scrape import OPENMETRICS, Samples, fetch
from tests.helpers.servers import wait_until
from tests.helpers.system import free_port, require_binary
from ws_monitoring import MetricsServer, MetricsServerError, start_metrics_server
from ws_monitoring.metrics import server as metrics_server_module
from ws_monitoring.metrics.exposition import Prerendered, direct_exposition_format
from ws_monitoring.metrics.server import DROP_REASONS

AUTH_VARS = (
    "WS_MONITORING_METRICS_USERNAME",
    "WS_MONITORING_METRICS_PASSWORD",
    "WS_MONITORING_METRICS_TOKEN",
)


@pytest.fixture(autouse=True)
def no_auth_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*AUTH_VARS, "PROMETHEUS_MULTIPROC_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("demo_events", "Events for the scrape tests.", registry=registry).inc(3)
    return registry


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_metrics_in_prometheus_text_format(metrics_server: MetricsServer) -> None:
    status, content_type, body = fetch(metrics_server.url)
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    [family] = [f for f in text_string_to_metric_families(body) if f.name == "demo_events"]
    assert (family.type, family.samples[0].value) == ("counter", 3)
    # A query string is ignored.
    assert fetch(metrics_server.url + "?name[]=demo_events_total")[2] == body


def test_metrics_in_openmetrics_format(metrics_server: MetricsServer) -> None:
    status, content_type, body = fetch(metrics_server.url, accept=OPENMETRICS)
    assert status == 200
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith("# EOF\n")
    assert "demo_events_total 3.0" in body


def test_healthz_and_unknown_paths(metrics_server: MetricsServer) -> None:
    base = metrics_server.url.removesuffix("/metrics")
    assert fetch(base + "/healthz") == (200, "text/plain; charset=utf-8", "OK\n")
    assert fetch(base + "/metrics/extra") == (404, "text/plain; charset=utf-8", "Not Found\n")
    assert fetch(base + "/live/extra")[0] == 404


def test_head_has_no_body(metrics_server: MetricsServer) -> None:
    request = urllib.request.Request(metrics_server.url, method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) > 0
        assert response.read() == b""


def test_port_zero_reports_the_real_port(registry: CollectorRegistry) -> None:
    with start_metrics_server(0, "127.0.0.1", registry=registry) as server:
        assert server.port > 0
        assert server.host == "127.0.0.1"
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        assert fetch(server.url)[0] == 200


def test_any_address_is_shown_as_loopback(registry: CollectorRegistry) -> None:
    with start_metrics_server(0, "0.0.0.0", registry=registry) as server:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        assert fetch(server.url)[0] == 200


def test_ipv6(registry: CollectorRegistry) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        server = start_metrics_server(0, "::1", registry=registry)
    except MetricsServerError:
        pytest.skip("cannot bind ::1 here")
    with server:
        assert server.url == f"http://[::1]:{server.port}/metrics"
        assert fetch(server.url)[0] == 200


def test_port_in_use_names_the_port(registry: CollectorRegistry) -> None:
    with start_metrics_server(0, "127.0.0.1", registry=registry) as server:
        with pytest.raises(MetricsServerError, match=f"127.0.0.1:{server.port}") as caught:
            start_metrics_server(server.port, "127.0.0.1", registry=registry)
        assert isinstance(caught.value, OSError)
        assert caught.value.errno is not None


def test_close_releases_the_port(registry: CollectorRegistry) -> None:
    port = free_port()
    with start_metrics_server(port, "127.0.0.1", registry=registry):
        assert fetch(f"http://127.0.0.1:{port}/healthz")[0] == 200
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
    # The port can be bound again at once (the closed scrape connection is still in
    # TIME_WAIT), and close() may be called twice.
    server = start_metrics_server(port, "127.0.0.1", registry=registry)
    server.close()
    server.close()


def test_a_stalled_client_does_not_block_scrapes(metrics_server: MetricsServer) -> None:
    with socket.create_connection(("127.0.0.1", metrics_server.port)) as stalled:
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        for _ in range(3):
            assert fetch(metrics_server.url, timeout=5)[0] == 200


def test_a_stalled_client_is_dropped(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_server_module, "REQUEST_TIMEOUT", 0.2)
    with (
        start_metrics_server(0, "127.0.0.1", registry=registry) as server,
        socket.create_connection(("127.0.0.1", server.port)) as stalled,
    ):
        stalled.settimeout(10)
        stalled.sendall(b"GET /metr")
        # The server gives up on it and closes the connection without an answer.
        assert stalled.recv(1024) == b""


def test_close_ends_open_connections(registry: CollectorRegistry) -> None:
    server = start_metrics_server(0, "127.0.0.1", registry=registry)
    with socket.create_connection(("127.0.0.1", server.port)) as stalled:
        stalled.sendall(b"GET /metr")
        wait_until(lambda: server._server._conns, what="the connection admitted")
        server.close()
        stalled.settimeout(5)
        assert stalled.recv(1024) == b""
    # Closed by close(): not a drop.
    assert sum(server._server.stats.dropped.values()) == 0


def test_a_broken_collector_gives_500(metrics_server: MetricsServer) -> None:
    class Broken:
        def collect(self) -> Iterator[object]:
            raise RuntimeError("collector bug")

    metrics_server._server.registry.register(Broken())  # type: ignore[arg-type]
    status, _, body = fetch(metrics_server.url)
    assert status == 500
    assert "collector bug" in body
    # The server survives it.
    assert fetch(metrics_server.url.removesuffix("/metrics") + "/healthz")[0] == 200


# -- limits: clients that leave, trickle, pile up ----------------------------------------------


def dropped_in(registry: CollectorRegistry, reason: str) -> float:
    return (
        Samples(generate_latest(registry).decode()).get(
            "ws_monitoring_metrics_server_dropped_total", reason=reason
        )
        or 0.0
    )


class Big:
    """A collector whose families are one large prerendered chunk (cheap to serve again)."""

    text = "".join(f'demo_big{{n="{n}"}} 1.0\n' for n in range(300_000))

    def collect(self) -> Iterator[Metric]:
        if direct_exposition_format() is not None:
            yield Prerendered(self.text)


def test_clients_leaving_mid_response_are_logged_once_and_counted(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    registry.register(Big())  # type: ignore[arg-type]
    caplog.set_level(logging.WARNING, "ws_monitoring.metrics")
    with start_metrics_server(0, "127.0.0.1", registry=registry) as server:
        for _ in range(20):
            with socket.socket() as client:
                # A small receive buffer: the 8 MB answer cannot all be in flight at once.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client.connect(("127.0.0.1", server.port))
                client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                assert client.recv(16).startswith(b"HTTP/1.1 200")
                # A reset (RST) while the server is still writing its answer.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # A connection leaves the server's table when its thread ends, after it was
        # counted: wait for that (however loaded the machine), then count once.
        while server._server._conns:
            time.sleep(0.01)
        dropped = {reason: dropped_in(registry, reason) for reason in DROP_REASONS}
    assert dropped == {**dict.fromkeys(DROP_REASONS, 0.0), "disconnected": 20}
    assert "Traceback" not in capfd.readouterr().err
    [record] = [r for r in caplog.records if r.name == "ws_monitoring.metrics"]
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert "disconnected" in record.getMessage()
    assert 'ws_monitoring_metrics_server_dropped_total{reason="disconnected"}' in (
        record.getMessage()
    )


def test_listen_backlog(metrics_server: MetricsServer) -> None:
    """The kernel queues a burst of connects instead of dropping SYNs after the 5th.

    ``ss`` reads the listening socket's accept-queue limit (Send-Q) from the kernel.
    """
    ss = require_binary("ss", "iproute2")
    out = subprocess.run(
        [ss, "-ltnH", f"sport = :{metrics_server.port}"], check=True, capture_output=True, text=True
    ).stdout.split()
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert int(out[2]) >= min(128, somaxconn)
    assert int(out[2]) == min(metrics_server_module.LISTEN_BACKLOG, somaxconn)


def test_a_trickling_client_is_dropped_at_the_deadline(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A total deadline per request: a byte now and then does not keep the connection."""
    monkeypatch.setattr(metrics_server_module, "REQUEST_TIMEOUT", 0.5)
    with (
        start_metrics_server(0, "127.0.0.1", registry=registry) as server,
        socket.create_connection(("127.0.0.1", server.port)) as client,
    ):
        client.sendall(b"GET /metrics HTTP/1.1\r\n")
        # 100 header lines, one every 0.1 s (each well within the timeout): 10 s in all.
        for n in range(100):
            time.sleep(0.1)
            readable, _, _ = select.select([client], [], [], 0)
            if readable:
                break
            client.sendall(f"X-Trickle-{n}: 1\r\n".encode())
        else:
            pytest.fail("the server kept a trickling request for 10 s")
        # Closed without an answer (one still counted as a deadline drop).
        assert client.recv(1024) == b""
        assert dropped_in(registry, "deadline") == 1


def test_slow_clients_make_room_for_scrapes(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the connection limit, the oldest client still sending its request is closed."""
    monkeypatch.setattr(metrics_server_module, "MAX_CONNECTIONS", 4)
    with start_metrics_server(0, "127.0.0.1", registry=registry) as server:
        slow = []
        for _ in range(10):
            client = socket.create_connection(("127.0.0.1", server.port))
            client.sendall(b"GET /metr")  # never finished
            slow.append(client)
        try:
            # The 5th to 10th made room by closing the 1st to 6th (oldest first)...
            wait_until(lambda: dropped_in(registry, "evicted") == 6, what="6 evicted")
            # ...and a scrape is answered: the 7th makes room for it.
            assert fetch(server.url, timeout=5)[0] == 200
            assert dropped_in(registry, "evicted") == 7
            for client in slow[:7]:
                client.settimeout(5)
                assert client.recv(1024) == b""
            assert select.select(slow[7:], [], [], 0)[0] == []
            # Scrapes keep being answered, and connection threads stay within the limit.
            for _ in range(3):
                assert fetch(server.url, timeout=5)[0] == 200
            wait_until(
                lambda: (
                    sum(t.name == "ws-monitoring-metrics-request" for t in threading.enumerate())
                    <= 4
                ),
                what="at most 4 connection threads",
            )
        finally:
            for client in slow:
                client.close()


def test_connections_past_the_limit_are_refused_and_counted(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every slot busy answering (a slow collector): a new connection gets a 503."""
    monkeypatch.setattr(metrics_server_module, "MAX_CONNECTIONS", 2)
    entered = threading.Semaphore(0)
    release = threading.Event()

    class Slow:
        def collect(self) -> Iterator[Metric]:
            if not release.is_set():
                entered.release()
                release.wait(10)
            return iter(())

    registry.register(Slow())  # type: ignore[arg-type]
    with start_metrics_server(0, "127.0.0.1", registry=registry) as server:
        results: list[int] = []
        scrapes = [
            threading.Thread(target=lambda: results.append(fetch(server.url)[0])) for _ in range(2)
        ]
        for thread in scrapes:
            thread.start()
        for _ in scrapes:
            assert entered.acquire(timeout=10)
        status, _, body = fetch(server.url)
        assert (status, body) == (503, "Too many requests.\r\n")
        release.set()
        for thread in scrapes:
            thread.join(10)
        assert results == [200, 200]
        assert dropped_in(registry, "limit") == 1


# -- authentication -----------------------------------------------------------------------------


def test_basic_auth(registry: CollectorRegistry) -> None:
    with start_metrics_server(
        0, "127.0.0.1", registry=registry, username="prom", password="s3cret"
    ) as server:
        status, _, body = fetch(server.url)
        assert (status, body) == (401, "Unauthorized\n")
        assert fetch(server.url, headers=basic("prom", "wrong"))[0] == 401
        assert fetch(server.url, headers=basic("other", "s3cret"))[0] == 401
        assert fetch(server.url, headers={"Authorization": "Bearer s3cret"})[0] == 401
        assert fetch(server.url, headers=basic("prom", "s3cret"))[0] == 200
        # RFC 7235: the scheme is case-insensitive ("basic", "BASIC").
        token = basic("prom", "s3cret")["Authorization"].split()[1]
        for scheme in ("basic", "BASIC", "bAsIc"):
            assert fetch(server.url, headers={"Authorization": f"{scheme} {token}"})[0] == 200
        assert fetch(server.url, headers={"Authorization": f"Basic {token.lower()}"})[0] == 401
        assert fetch(server.url, headers={"Authorization": f"Basic{token}"})[0] == 401
        # The health check stays open, for load balancers.
        assert fetch(server.url.removesuffix("/metrics") + "/healthz")[0] == 200
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(server.url, timeout=10)
        assert caught.value.headers["WWW-Authenticate"] == 'Basic realm="metrics"'
        caught.value.close()


def test_bearer_token(registry: CollectorRegistry) -> None:
    with start_metrics_server(0, "127.0.0.1", registry=registry, bearer_token="t0k3n") as server:
        assert fetch(server.url)[0] == 401
        assert fetch(server.url, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert fetch(server.url, headers={"Authorization": "Bearer T0K3N"})[0] == 401
        assert fetch(server.url, headers={"Authorization": "Bearer t0k3n"})[0] == 200
        # RFC 7235: the scheme is case-insensitive, the credentials are not.
        assert fetch(server.url, headers={"Authorization": "bearer t0k3n"})[0] == 200


def test_credentials_from_the_environment(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WS_MONITORING_METRICS_USERNAME", "env-user")
    monkeypatch.setenv("WS_MONITORING_METRICS_PASSWORD", "env-pass")
    with start_metrics_server(0, "127.0.0.1", registry=registry) as server:
        assert fetch(server.url)[0] == 401
        assert fetch(server.url, headers=basic("env-user", "env-pass"))[0] == 200
    # Arguments win over the environment.
    with start_metrics_server(
        0, "127.0.0.1", registry=registry, username="arg", password="p"
    ) as server:
        assert fetch(server.url, headers=basic("env-user", "env-pass"))[0] == 401
        assert fetch(server.url, headers=basic("arg", "p"))[0] == 200
    monkeypatch.delenv("WS_MONITORING_METRICS_USERNAME")
    monkeypatch.delenv("WS_MONITORING_METRICS_PASSWORD")
    monkeypatch.setenv("WS_MONITORING_METRICS_TOKEN", "env-token")
    with start_metrics_server(0, "127.0.0.1", registry=registry) as server:
        assert fetch(server.url)[0] == 401
        assert fetch(server.url, headers={"Authorization": "Bearer env-token"})[0] == 200


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"username": "u", "password": "p", "bearer_token": "t"}, "not both"),
        ({"username": "u"}, "needs both a username and a password"),
        ({"password": "p"}, "needs both a username and a password"),
        ({"username": "a:b", "password": "p"}, "cannot contain ':'"),
        ({"keyfile": "key.pem"}, "keyfile given without certfile"),
    ],
)
def test_inconsistent_options(
    registry: CollectorRegistry, kwargs: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        start_metrics_server(0, "127.0.0.1", registry=registry, **kwargs)


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl CLI."""
    openssl = require_binary("openssl", "openssl")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls(registry: CollectorRegistry, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    context = ssl.create_default_context(cafile=str(cert))
    with start_metrics_server(
        0,
        "127.0.0.1",
        registry=registry,
        certfile=str(cert),
        keyfile=str(key),
        bearer_token="t",
    ) as server:
        assert server.url == f"https://127.0.0.1:{server.port}/metrics"
        request = urllib.request.Request(server.url, headers={"Authorization": "Bearer t"})
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            assert response.status == 200
            assert b"demo_events_total 3.0" in response.read()
        # The live page is behind the same TLS and token.
        assert server.live_url == f"https://127.0.0.1:{server.port}/live"
        live = urllib.request.Request(server.live_url + ".json", headers=request.headers)
        with urllib.request.urlopen(live, context=context, timeout=10) as response:
            assert response.headers["Content-Type"] == "application/json"
        with pytest.raises(urllib.error.HTTPError, match="401") as refused:
            urllib.request.urlopen(server.live_url, context=context, timeout=10)
        refused.value.close()
        # A client that does not trust the certificate is refused...
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(server.url, timeout=10)
        # ...plain HTTP gets nothing (a failed TLS handshake, counted)...
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(server.url.replace("https:", "http:"), timeout=10)
        wait_until(lambda: dropped_in(registry, "tls") >= 1, what="a TLS drop")
        # ...and a client stalled in the TLS handshake does not block the others.
        with (
            socket.create_connection(("127.0.0.1", server.port)),
            urllib.request.urlopen(request, context=context, timeout=10) as response,
        ):
            assert response.status == 200


# -- default registry ----------------------------------------------------------------------------


def test_default_registry_is_prometheus_clients() -> None:
    with start_metrics_server(0, "127.0.0.1") as server:
        body = fetch(server.url)[2]
    assert "python_info" in body


def test_default_registry_in_multiprocess_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with start_metrics_server(0, "127.0.0.1") as server:
        status, _, body = fetch(server.url)
    # The aggregate of the (here empty) multiprocess directory, not this process's
    # registry: only the server's and the collector's own counters.
    assert status == 200
    names = {f.name for f in text_string_to_metric_families(body)}
    assert names == {
        "ws_monitoring_metrics_server_dropped",
        "ws_monitoring_multiprocess_files_skipped",
    }
