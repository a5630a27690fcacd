"""The metrics HTTP server: ``/metrics`` and ``/healthz`` on a port of their own.

It runs in daemon threads, one per request, so a client that never finishes its request
cannot hold up other scrapes, and nothing it does touches the WebSocket event loop.

prometheus_client formats a scrape one sample at a time (a dict of labels, a sort, an
escape and a float conversion per sample): with thousands of connections that was most
of a scrape's time. A collector that can write its own families as exposition text
(:class:`~ws_monitoring.metrics.MetricsSink`) does so during this server's scrapes (see
:func:`direct_exposition_format`); prometheus_client still formats every other collector
of the registry, in registration order.
"""

from __future__ import annotations

import base64
import gc
import hmac
import logging
import os
import socket
import ssl
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.registry import Collector

from ws_monitoring.typing import Alerter

from .exposition import encode

__all__ = ["MetricsServer", "MetricsServerError", "start_metrics_server"]

#: Seconds a metrics client may take to send its request before it is dropped.
logger = logging.getLogger("ws_monitoring.metrics")

REQUEST_TIMEOUT = 10.0


class MetricsServerError(OSError):
    """The metrics server could not start (for example, its port is already in use)."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # SO_REUSEADDR lets a restarted process bind while connections of the previous one
    # linger in TIME_WAIT; a port with a live listener still fails (EADDRINUSE). Not on
    # Windows, where it would let two processes share the port.
    allow_reuse_address = os.name != "nt"

    registry: CollectorRegistry
    auth: tuple[str, bytes] | None
    ssl_context: ssl.SSLContext | None

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        sock.settimeout(REQUEST_TIMEOUT)
        return sock, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake happens here, in the request's own thread, so a client that
        # stalls during it cannot block the accept loop.
        if self.ssl_context is not None:
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
        super().finish_request(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Access logs are noise here; Prometheus reports scrape failures itself."""

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
              extra: dict[str, str] | None = None) -> None:  # fmt: skip
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorized(self) -> bool:
        auth = self.server.auth
        if auth is None:
            return True
        scheme, expected = auth
        given = self.headers.get("Authorization", "")
        prefix = scheme + " "
        if not given.startswith(prefix):
            return False
        # Constant-time: the comparison must not reveal how much of a guess was right.
        return hmac.compare_digest(given[len(prefix) :].strip().encode(), expected)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, b"OK\n")
        elif path == "/metrics":
            if not self._authorized():
                scheme = self.server.auth[0] if self.server.auth else "Basic"
                self._send(
                    401, b"Unauthorized\n", extra={"WWW-Authenticate": f'{scheme} realm="metrics"'}
                )
                return
            try:
                body, content_type = _without_gc(
                    self.server.registry, self.headers.get("Accept", "")
                )
            except Exception as exc:  # a broken collector must not kill the server
                self._send(500, f"error collecting metrics: {exc!r}\n".encode())
                return
            self._send(200, body, content_type)
        else:
            self._send(404, b"Not Found\n")

    do_HEAD = do_GET


def _without_gc(registry: Collector, accept: str) -> tuple[bytes, str]:
    """:func:`~ws_monitoring.metrics.exposition.encode` with the cyclic GC paused.

    A scrape of thousands of series allocates enough short-lived objects to trigger full
    collections, which walk every object of the process while holding the GIL: with
    5 000 connections that stalled the event loop for ~300 ms. Nothing a scrape
    allocates is cyclic; reference counting frees it.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return encode(registry, accept)
    finally:
        if was_enabled:
            gc.enable()


class MetricsServer:
    """A running metrics server. Stop it with :meth:`close` or a ``with`` block."""

    def __init__(self, server: _Server, thread: threading.Thread, scheme: str) -> None:
        self._server = server
        self._thread = thread
        host, port = server.server_address[:2]
        self.host: str = host if isinstance(host, str) else host.decode()
        #: The port actually bound (useful with ``port=0``).
        self.port: int = port
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in shown:
            shown = f"[{shown}]"
        #: URL of the ``/metrics`` endpoint.
        self.url = f"{scheme}://{shown}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _resolve_auth(
    username: str | None, password: str | None, bearer_token: str | None
) -> tuple[str, bytes] | None:
    username = (
        username if username is not None else os.environ.get("WS_MONITORING_METRICS_USERNAME")
    )
    password = (
        password if password is not None else os.environ.get("WS_MONITORING_METRICS_PASSWORD")
    )
    token = (
        bearer_token if bearer_token is not None else os.environ.get("WS_MONITORING_METRICS_TOKEN")
    )
    if token and (username or password):
        raise ValueError("choose basic auth (username/password) or a bearer token, not both")
    if token:
        return ("Bearer", token.encode())
    if username or password:
        if not (username and password):
            raise ValueError("basic auth needs both a username and a password")
        if ":" in username:
            raise ValueError("a basic-auth username cannot contain ':'")
        return ("Basic", base64.b64encode(f"{username}:{password}".encode()))
    return None


def start_metrics_server(
    port: int = 8001,
    addr: str = "0.0.0.0",
    *,
    registry: CollectorRegistry | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    username: str | None = None,
    password: str | None = None,
    bearer_token: str | None = None,
    alerters: Sequence[Alerter] = (),
) -> MetricsServer:
    """Serve ``GET /metrics`` and ``GET /healthz`` on ``addr:port`` from background threads.

    ``/metrics`` answers in Prometheus text format, or OpenMetrics when the ``Accept``
    header asks for it (exemplars are only shown there). Any other path gets a 404.

    Args:
        port: TCP port; ``0`` picks a free one (read it back from ``.port``).
        addr: Address to bind; keep metrics off public interfaces, or protect them.
        registry: Registry to expose; default: prometheus_client's, or a multiprocess
            aggregate when ``PROMETHEUS_MULTIPROC_DIR`` is set.
        certfile, keyfile: Serve over TLS with this certificate chain and key.
        username, password: Require HTTP basic auth on ``/metrics``
            (default: ``WS_MONITORING_METRICS_USERNAME``/``_PASSWORD``).
        bearer_token: Require ``Authorization: Bearer <token>`` on ``/metrics``
            (default: ``WS_MONITORING_METRICS_TOKEN``).
        alerters: Alerters (``SentryAlerter``, ``PrometheusAlerter``) that get a
            ``WebSocketMetricsServerDown`` alert (critical) when the address cannot be
            bound, before ``MetricsServerError`` is raised.

    Returns:
        A :class:`MetricsServer` with ``.port``, ``.url`` and ``.close()``.

    Raises:
        MetricsServerError: the address cannot be bound (the message names the port).
        TypeError: a port that is not an int.
        ValueError: a port outside 0-65535, inconsistent auth or TLS options.
    """
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port: expected an int, got {port!r} ({type(port).__name__})")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535, got {port}")
    auth = _resolve_auth(username, password, bearer_token)
    if (certfile is None) != (keyfile is None) and certfile is None:
        raise ValueError("keyfile given without certfile")
    context = None
    if certfile is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certfile, keyfile)
    if registry is None:
        registry = _default_registry()
    try:
        server = (_Server6 if ":" in addr else _Server)((addr, port), _Handler)
    except OSError as exc:
        error = MetricsServerError(
            exc.errno, f"cannot start the metrics server on {addr}:{port}: {exc.strerror or exc}"
        )
        for alerter in alerters:
            try:
                alerter.fire(
                    "WebSocketMetricsServerDown",
                    severity="critical",
                    summary=f"metrics server cannot listen on {addr}:{port}",
                    description=str(error),
                    labels=None,
                    annotations={"listen_address": f"{addr}:{port}"},
                )
            except Exception:
                logger.exception("alerter %s failed to fire", type(alerter).__name__)
        raise error from exc
    server.registry = registry
    server.auth = auth
    server.ssl_context = context
    thread = threading.Thread(
        target=server.serve_forever,
        # close() waits for the accept loop to notice: 0.05 s instead of the default 0.5 s.
        kwargs={"poll_interval": 0.05},
        name=f"ws-monitoring-metrics-{port}",
        daemon=True,
    )
    thread.start()
    return MetricsServer(server, thread, "https" if context else "http")


def _default_registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY
