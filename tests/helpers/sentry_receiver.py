"""A real HTTP receiver for sentry-sdk envelopes, and a fixture-friendly SDK reset.

``SentryReceiver`` listens on 127.0.0.1 (a free port) and accepts
``POST /api/<project>/envelope/``: the body (gzip or brotli ``Content-Encoding``
handled) is an envelope, newline-delimited JSON: the envelope header, then for each
item an item header and its payload (``length`` bytes when the header gives it, else
up to the next newline). Everything is kept: raw bodies (for leak checks), parsed
envelopes, and the ``event`` items as dicts.

sentry-sdk is process-global: :func:`reset_sentry` closes the current client and
installs none, so the next test starts from an uninitialised SDK.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import sentry_sdk

HOST = "127.0.0.1"


def parse_envelope(body: bytes) -> tuple[dict[str, Any], list[tuple[dict[str, Any], bytes]]]:
    """(envelope header, [(item header, payload bytes)]) of one envelope.

    Raises:
        ValueError: a malformed envelope.
    """
    header_line, _, rest = body.partition(b"\n")
    header = json.loads(header_line)
    items: list[tuple[dict[str, Any], bytes]] = []
    while rest.strip():
        item_line, _, rest = rest.partition(b"\n")
        if not item_line.strip():
            continue
        item_header = json.loads(item_line)
        length = item_header.get("length")
        if length is not None:
            payload, rest = rest[:length], rest[length:]
            if len(payload) != length:
                raise ValueError(f"item shorter than its length {length}")
            rest = rest.removeprefix(b"\n")
        else:
            payload, _, rest = rest.partition(b"\n")
        items.append((item_header, payload))
    return header, items


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        encoding = self.headers.get("Content-Encoding", "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "br":
            import brotli  # type: ignore[import-not-found]  # only if the SDK has it

            body = brotli.decompress(body)
        receiver = self.server.receiver
        parts = self.path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "api" or parts[2] != "envelope":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        header, items = parse_envelope(body)
        receiver._add(parts[1], body, header, items)
        answer = json.dumps({"id": header.get("event_id")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: SentryReceiver


class SentryReceiver:
    """Receives envelopes; ``dsn``, ``events``, ``bodies``, ``wait_for_events()``."""

    def __init__(self, project: str = "42") -> None:
        self.project = project
        self._lock = threading.Lock()
        self.bodies: list[bytes] = []
        self.envelopes: list[tuple[dict[str, Any], list[tuple[dict[str, Any], bytes]]]] = []
        self._server = _Server((HOST, 0), _Handler)
        self._server.receiver = self
        self.port: int = self._server.server_address[1]
        self.dsn = f"http://publickey@{HOST}:{self.port}/{project}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def _add(
        self,
        project: str,
        body: bytes,
        header: dict[str, Any],
        items: list[tuple[dict[str, Any], bytes]],
    ) -> None:
        with self._lock:
            self.bodies.append(body)
            self.envelopes.append((header, items))

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every ``event`` item received so far, decoded."""
        with self._lock:
            return [
                json.loads(payload)
                for _, items in self.envelopes
                for item, payload in items
                if item.get("type") == "event"
            ]

    def raw_text(self) -> str:
        """Every body received, decoded (for leak checks)."""
        with self._lock:
            return "\n".join(body.decode("utf-8", "replace") for body in self.bodies)

    def wait_for_events(
        self,
        count: int = 1,
        *,
        timeout: float = 10.0,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Poll until at least ``count`` events (matching ``predicate``) arrived.

        Raises:
            AssertionError: not within ``timeout`` seconds (shows what arrived).
        """
        deadline = time.monotonic() + timeout
        while True:
            events = [e for e in self.events if predicate is None or predicate(e)]
            if len(events) >= count:
                return events
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} Sentry event(s), got {self.events}")
            time.sleep(0.02)

    def drain(self, *alerters: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Capture a sentinel message and wait for it; returns every other event.

        The SDK's transport sends in order from one worker thread, so once the
        sentinel has arrived, every event captured before it has arrived too: this
        proves the absence of events without sleeping. ``alerters`` (``SentryAlerter``)
        are flushed first: they capture from a worker thread of their own, so what they
        were given may not have reached the transport yet.
        """
        for alerter in alerters:
            alerter.flush(timeout)
        marker = f"sentinel-{time.monotonic_ns()}"
        sentry_sdk.capture_message(marker)
        self.wait_for_events(predicate=lambda e: e.get("message") == marker, timeout=timeout)
        return [e for e in self.events if not str(e.get("message", "")).startswith("sentinel-")]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def reset_sentry(timeout: float = 2.0) -> None:
    """Close the SDK's current client and install none (process-global state)."""
    client = sentry_sdk.get_client()
    if client.is_active():
        client.close(timeout=timeout)
    # The Scope class methods: sentry-sdk 2.0 (the floor) has no sentry_sdk.get_global_scope().
    sentry_sdk.Scope.get_global_scope().set_client(None)
    sentry_sdk.Scope.get_isolation_scope().set_client(None)
    sentry_sdk.Scope.get_current_scope().set_client(None)


@contextmanager
def sentry_receiver() -> Iterator[SentryReceiver]:
    """A running :class:`SentryReceiver`; the SDK is reset before and after."""
    reset_sentry()
    receiver = SentryReceiver()
    try:
        yield receiver
    finally:
        reset_sentry()
        receiver.close()
