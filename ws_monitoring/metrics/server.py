"""The metrics HTTP server: ``/metrics``, ``/healthz`` and the live page on a port of their own.

It runs in daemon threads, one per connection, so a client that never finishes its
request cannot hold up other scrapes, and nothing it does touches the WebSocket event
loop. Its limits keep it so under abuse: a total deadline per request
(:data:`REQUEST_TIMEOUT`, however slowly the client trickles), at most
:data:`MAX_CONNECTIONS` connections (the oldest still sending its request makes room
for a new one; a 503 when all are being answered), a real listen backlog; a client that
leaves mid-answer is logged once per kind and counted
(``ws_monitoring_metrics_server_dropped_total{reason}``), never a traceback on stderr.
The live page (``/``, ``/live``, ``/live.json``) is :mod:`ws_monitoring.metrics.live`.

prometheus_client formats a scrape one sample at a time (a dict of labels, a sort, an
escape and a float conversion per sample): with thousands of connections that was most
of a scrape's time. A collector that can write its own families as exposition text
(:class:`~ws_monitoring.metrics.MetricsSink`) does so during this server's scrapes (see
:func:`direct_exposition_format`); prometheus_client still formats every other collector
of the registry, in registration order.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import hmac
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ws_monitoring.typing import Alerter

from .exposition import encode
from .live import LivePage

__all__ = ["MetricsServer", "MetricsServerError", "start_metrics_server"]

#: Seconds a client has, from the moment its connection is accepted (or its previous
#: answer was sent), to get its whole answer: TLS handshake, request, the answer written.
#: A total deadline: a client that trickles its request a byte at a time is dropped
#: when it runs out, however steady the trickle.
REQUEST_TIMEOUT = 10.0
#: Connections served at once (one thread each). At the limit, a new connection closes
#: the oldest one still sending its request (slow clients, not scrapes in progress);
#: when every one is being answered, the new one is refused with a 503.
MAX_CONNECTIONS = 64
#: Pending connections the kernel queues before the accept loop takes them (the
#: stdlib's default of 5 made every sixth of a burst of connects wait for a SYN retry).
LISTEN_BACKLOG = 512

#: Why a connection ended without its answer (``reason`` of the self-metric).
DROP_REASONS = ("limit", "evicted", "deadline", "disconnected", "tls", "error")

logger = logging.getLogger("ws_monitoring.metrics")

_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 20\r\nConnection: close\r\n\r\nToo many requests.\r\n"
)


class MetricsServerError(OSError):
    """The metrics server could not start (for example, its port is already in use)."""


class _Conn:
    """One accepted connection: its socket (TLS-wrapped once the handshake starts)."""

    __slots__ = ("deadline", "dropped", "reading", "served", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        #: Still sending its request (or waiting for the next one): may be evicted.
        self.reading = True
        #: Requests answered: a kept-alive connection idle past its deadline is closed
        #: as HTTP servers do, not counted as dropped.
        self.served = 0
        #: Why it was closed from outside (counted there, once), or None.
        self.dropped: str | None = None


class _Stats:
    """The metrics servers' own counters, one set per registry they serve.

    Registered in that registry once (as the other ws_monitoring self-metrics are), so a
    scrape and any other reader of the registry show them; servers of one registry add up.
    """

    _instances: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, _Stats]] = (
        weakref.WeakKeyDictionary()
    )
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> _Stats:
        with cls._instances_lock:
            stats = cls._instances.get(registry)
            if stats is None:
                stats = cls._instances[registry] = cls()
                registry.register(stats)
            return stats

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._logged: set[str] = set()

    def drop(self, reason: str, detail: str = "", exc: BaseException | None = None) -> None:
        """Count one dropped connection; log the first of each reason.

        An unexpected error (``reason="error"``) is logged once per exception type, with
        its traceback: that one is a bug to see.
        """
        with self._lock:
            self.dropped[reason] += 1
            kind = f"{reason}:{detail}" if reason == "error" else reason
            first = kind not in self._logged and len(self._logged) < 64
            if first:
                self._logged.add(kind)
        if first:
            # Once per kind: a burst of resets must not flood stderr or the log queue.
            logger.warning(
                "metrics server: a connection ended without its answer (%s%s); further "
                'ones are counted in ws_monitoring_metrics_server_dropped_total{reason="%s"}',
                reason,
                f": {detail}" if detail else "",
                reason,
                # Only an unexpected error deserves its traceback.
                exc_info=exc if reason == "error" else None,
            )

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "ws_monitoring_metrics_server_dropped",
            "Metrics-server connections that ended without their answer, by reason "
            "(limit: refused, every slot busy; evicted: closed while still sending its "
            "request, to admit a newer one; deadline: not answered within the request "
            "timeout; disconnected: the client left; tls: failed TLS handshake; error).",
            labels=["reason"],
        )
        with self._lock:
            counts = dict(self.dropped)
        for reason, count in counts.items():
            family.add_metric([reason], count)
        yield family


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # SO_REUSEADDR lets a restarted process bind while connections of the previous one
    # linger in TIME_WAIT; a port with a live listener still fails (EADDRINUSE). Not on
    # Windows, where it would let two processes share the port.
    allow_reuse_address = os.name != "nt"
    request_queue_size = LISTEN_BACKLOG

    registry: CollectorRegistry
    stats: _Stats
    auth: tuple[str, bytes] | None
    ssl_context: ssl.SSLContext | None
    live: LivePage | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._conns: dict[int, _Conn] = {}
        self._conns_lock = threading.Lock()
        self._local = threading.local()
        #: Refused sockets, until when they may linger (accept loop's thread only).
        self._refused: list[tuple[socket.socket, float]] = []
        super().__init__(*args, **kwargs)

    # -- admission (the accept loop's thread) ---------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        """Admit ``request`` within :data:`MAX_CONNECTIONS`, then serve it in a thread."""
        conn = _Conn(request, time.monotonic() + REQUEST_TIMEOUT)
        with self._conns_lock:
            if len(self._conns) >= MAX_CONNECTIONS:
                # Idle kept-alive connections first, then the oldest slow request.
                victim = min(
                    (c for c in self._conns.values() if c.reading),
                    key=lambda c: (not c.served, c.deadline),
                    default=None,
                )
                if victim is None:
                    refused = True
                else:
                    refused = False
                    self._drop(victim, "evicted")
            else:
                refused = False
            if not refused:
                self._conns[id(conn)] = conn
        if refused:
            self.stats.drop("limit")
            self._refuse(request)
            return
        request.settimeout(REQUEST_TIMEOUT)
        thread = threading.Thread(
            target=self._serve, args=(conn, client_address), name="ws-monitoring-metrics-request"
        )
        thread.daemon = True
        thread.start()

    def _refuse(self, request: socket.socket) -> None:
        """A 503 (a TLS client gets a bare close), without blocking the accept loop.

        The socket lingers a moment (:meth:`_linger`): closing it with the request still
        unread would reset the connection, and the client would never read the 503.
        """
        try:
            request.setblocking(False)
            if self.ssl_context is None:
                request.send(_REFUSED)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            request.close()
            return
        if len(self._refused) >= MAX_CONNECTIONS:
            self._refused.pop(0)[0].close()
        self._refused.append((request, time.monotonic() + 1.0))

    def _linger(self, now: float) -> None:
        """Read and discard what refused clients still send; close at their EOF or in 1 s."""
        kept = []
        for sock, until in self._refused:
            try:
                while sock.recv(65536):
                    pass
            except BlockingIOError:
                if now < until:
                    kept.append((sock, until))
                    continue
            except OSError:
                pass
            sock.close()
        self._refused = kept

    def _drop(self, conn: _Conn, reason: str) -> None:
        """Close ``conn`` from outside its thread (held: ``_conns_lock``); counted once.

        Not counted: a kept-alive connection closed while idle between two requests.
        """
        del self._conns[id(conn)]
        conn.dropped = reason
        if not (conn.reading and conn.served):
            self.stats.drop(reason)
        _shutdown(conn.sock)

    def server_close(self) -> None:
        """Release the port and end every connection still open (their threads exit)."""
        super().server_close()
        for sock, _ in self._refused:
            sock.close()
        self._refused = []
        with self._conns_lock:
            for conn in list(self._conns.values()):
                conn.dropped = "closed"
                del self._conns[id(conn)]
                _shutdown(conn.sock)

    def service_actions(self) -> None:
        """Between two accepts (every poll interval): drop connections past their deadline."""
        now = time.monotonic()
        with self._conns_lock:
            for conn in [c for c in self._conns.values() if c.deadline <= now]:
                self._drop(conn, "deadline")
        if self._refused:
            self._linger(now)

    # -- one connection (its own thread) ---------------------------------------------------

    def _serve(self, conn: _Conn, client_address: Any) -> None:
        self._local.conn = conn
        try:
            if self.ssl_context is not None:
                # The handshake happens here, in the connection's own thread (a client
                # stalling in it cannot block the accept loop), under its deadline.
                conn.sock = self.ssl_context.wrap_socket(
                    conn.sock, server_side=True, do_handshake_on_connect=False
                )
                try:
                    conn.sock.do_handshake()
                except (OSError, ssl.SSLError) as exc:
                    self._ended(conn, "tls", type(exc).__name__)
                    return
            self.finish_request(conn.sock, client_address)
        except ssl.SSLError as exc:
            self._ended(conn, "tls", type(exc).__name__)
        except OSError as exc:  # reset, broken pipe, timeout: the client went away
            self._ended(conn, "disconnected", type(exc).__name__)
        except Exception as exc:
            self._ended(conn, "error", type(exc).__name__, exc)
        finally:
            with self._conns_lock:
                self._conns.pop(id(conn), None)
            self.shutdown_request(conn.sock)

    def _ended(
        self, conn: _Conn, reason: str, detail: str, exc: BaseException | None = None
    ) -> None:
        """``conn`` failed in its thread: counted, unless it was closed from outside."""
        if conn.dropped is None:
            self.stats.drop(reason, detail, exc)

    def request_read(self) -> None:
        """The handler has a request: no longer evictable (its deadline still holds)."""
        conn: _Conn = self._local.conn
        with self._conns_lock:
            conn.reading = False

    def request_done(self) -> None:
        """An answer was sent: the next request's deadline starts now."""
        conn: _Conn = self._local.conn
        with self._conns_lock:
            conn.reading = True
            conn.served += 1
            conn.deadline = time.monotonic() + REQUEST_TIMEOUT


def _shutdown(sock: socket.socket) -> None:
    """Wake the thread blocked on ``sock`` (which closes it): a plain shutdown, even for TLS."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Access logs are noise here; Prometheus reports scrape failures itself."""

    def handle_one_request(self) -> None:
        super().handle_one_request()
        self.server.request_done()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.request_read()
        return ok

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
        # RFC 7235: the scheme is case-insensitive ("basic", "BEARER"); the credentials
        # are not.
        given_scheme, _, credentials = self.headers.get("Authorization", "").strip().partition(" ")
        if given_scheme.lower() != scheme.lower():
            return False
        # Constant-time: the comparison must not reveal how much of a guess was right.
        return hmac.compare_digest(credentials.strip().encode(), expected)

    def _unauthorized(self) -> None:
        scheme = self.server.auth[0] if self.server.auth else "Basic"
        self._send(401, b"Unauthorized\n", extra={"WWW-Authenticate": f'{scheme} realm="metrics"'})

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        live = self.server.live
        if path == "/healthz":
            self._send(200, b"OK\n")
        elif path == "/metrics":
            if not self._authorized():
                self._unauthorized()
                return
            try:
                body, content_type = _without_gc(
                    self.server.registry, self.headers.get("Accept", "")
                )
            except Exception as exc:  # a broken collector must not kill the server
                self._send(500, f"error collecting metrics: {exc!r}\n".encode())
                return
            self._send(200, body, content_type)
        elif live is not None and path in ("/", "/live", "/live.json"):
            if not self._authorized():
                self._unauthorized()
                return
            if path != "/live.json":
                self._send(200, live.html(), "text/html; charset=utf-8", _PAGE_HEADERS)
                return
            try:
                body = live.json(_since(self.path))
            except Exception as exc:  # as for /metrics
                self._send(500, f"error collecting metrics: {exc!r}\n".encode())
                return
            self._send(200, body, "application/json", {"Cache-Control": "no-store"})
        else:
            self._send(404, b"Not Found\n")

    do_HEAD = do_GET


def _since(path: str) -> float | None:
    """``/live.json?since=T``: the time of the last sample the page has (else None)."""
    values = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query).get("since")
    try:
        return float(values[0]) if values else None
    except ValueError:
        return None  # the whole history, as for a first load


#: The page loads nothing from elsewhere and runs only its own inline script.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


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
        #: URL of the live page, or None when it is off (``live_page=False``).
        self.live_url = f"{scheme}://{shown}:{self.port}/live" if server.live else None

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
    live_page: bool = True,
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
        live_page: Serve the live page at ``/`` and ``/live`` and its data at
            ``/live.json`` (see :mod:`ws_monitoring.metrics.live`), behind the same
            TLS and auth as ``/metrics``; ``False``: those paths answer 404.

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
    server.stats = _Stats.for_registry(registry)
    server.auth = auth
    server.ssl_context = context
    server.live = LivePage(registry, multiprocess=_multiprocess()) if live_page else None
    thread = threading.Thread(
        target=server.serve_forever,
        # close() waits for the accept loop to notice: 0.05 s instead of the default 0.5 s.
        kwargs={"poll_interval": 0.05},
        name=f"ws-monitoring-metrics-{port}",
        daemon=True,
    )
    thread.start()
    return MetricsServer(server, thread, "https" if context else "http")


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def _default_registry() -> CollectorRegistry:
    if _multiprocess():
        from .multiprocess import MultiprocessCollector

        registry = CollectorRegistry()
        MultiprocessCollector(registry)
        return registry
    return REGISTRY
