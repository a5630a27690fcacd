"""A local receiver for what the servers export: OTLP/HTTP traces, Alertmanager alerts.

Run as ``python -m benchmarks.receiver``: prints ``{"ready": true, "port": ...}``, then
answers ``stats`` on stdin with how many spans, alerts and Sentry envelopes arrived, so
the harness can check that the exporting variants really exported.
"""

from __future__ import annotations

import gzip
import json
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["main"]

_counts: dict[str, Any] = {
    "spans": {},
    "span_requests": 0,
    "alerts": 0,
    "alert_requests": 0,
    "envelopes": 0,
}
_lock = threading.Lock()


def _count_spans(body: bytes) -> dict[str, int]:
    """Spans in one OTLP export request, by ``service.name``."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    counts: dict[str, int] = {}
    for resource_spans in request.resource_spans:
        service = "?"
        for attribute in resource_spans.resource.attributes:
            if attribute.key == "service.name":
                service = attribute.value.string_value
        n = sum(len(scope.spans) for scope in resource_spans.scope_spans)
        counts[service] = counts.get(service, 0) + n
    return counts


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        path = self.path.split("?", 1)[0]
        if path == "/v1/traces":
            spans = _count_spans(body)
            with _lock:
                for service, n in spans.items():
                    _counts["spans"][service] = _counts["spans"].get(service, 0) + n
                _counts["span_requests"] += 1
            self._answer(200, b"", "application/x-protobuf")
        elif path == "/api/v2/alerts":
            alerts = json.loads(body)
            with _lock:
                _counts["alerts"] += len(alerts)
                _counts["alert_requests"] += 1
            self._answer(200, b"", "application/json")
        elif path.endswith("/envelope/"):
            with _lock:
                _counts["envelopes"] += 1
            self._answer(200, b"{}", "application/json")
        else:
            self._answer(404, b"", "text/plain")


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = sys.stdout
    out.write(json.dumps({"ready": True, "port": server.server_address[1]}) + "\n")
    out.flush()
    for line in sys.stdin:
        if line.strip() == "stats":
            with _lock:
                out.write(json.dumps(_counts) + "\n")
            out.flush()
        elif line.strip() == "quit":
            break
    server.shutdown()


if __name__ == "__main__":
    main()
