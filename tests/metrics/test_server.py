"""The metrics HTTP server: formats, paths, ports, slow clients, auth and TLS."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.scrape import OPENMETRICS, fetch
from tests.helpers.system import free_port, require_binary
from ws_monitoring import MetricsServer, MetricsServerError, start_metrics_server
from ws_monitoring.metrics import server as metrics_server_module

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
    assert fetch(base + "/") == (404, "text/plain; charset=utf-8", "Not Found\n")
    assert fetch(base + "/metrics/extra")[0] == 404


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
        assert fetch(server.url, headers={"Authorization": "bearer t0k3n"})[0] == 401
        assert fetch(server.url, headers={"Authorization": "Bearer t0k3n"})[0] == 200


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
        # A client that does not trust the certificate is refused...
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(server.url, timeout=10)
        # ...plain HTTP gets nothing...
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(server.url.replace("https:", "http:"), timeout=10)
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
    # The aggregate of the (here empty) multiprocess directory, not this process's registry.
    assert (status, body) == (200, "")
